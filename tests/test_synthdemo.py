"""The shipped trained tiny VLM (pyvtrim/data/tiny-llava-synthvqa.gguf) and `pyvtrim demo` on it.

The model's fidelity figures come from tools/eval_fidelity.py (bench/results/fidelity.json); here only what must
hold for the demo to mean anything: the file is in the package, it answers from the image (well above the
same questions on a blank image), and the demo prints the questions, answers, truths and what FastV kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import pyvtrim
from pyvtrim import _ffi, synthdemo
from pyvtrim import synthvqa as sv

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

from test_api import _cli, _run  # noqa: E402

N_CHECK = 150  # questions: enough to separate ~0.8 from ~0.4 (the 95% intervals are about +-0.07 wide)


@pytest.fixture(scope="module")
def trained():
    path = synthdemo.trained_model_path()
    assert path is not None, f"{synthdemo.TRAINED_MODEL} is not in pyvtrim/data"
    with pyvtrim.Model(str(path), n_ctx=512, n_threads=2) as m:
        yield m


def _summary() -> dict:
    return json.loads(Path(_ffi.data_path(synthdemo.TRAINED_SUMMARY)).read_text())


def test_shipped_summary_records_the_training() -> None:
    s = _summary()
    for key in ("seed", "eval_seed", "final_accuracy", "blank_image_accuracy", "train_seconds"):
        assert key in s, key
    assert s["seed"] != s["eval_seed"]


def test_trained_model_reads_the_image(trained) -> None:
    """Fresh questions (a seed neither training nor its held-out checks used): the model's answers beat the
    same model on a blank image by a wide margin, and its accuracy is near the recorded one."""
    qa = sv.held_out(3000, N_CHECK)
    scenes = [s for s, _ in qa]
    got = synthdemo.ask(trained, scenes[0], [qa[0][1]])  # the helper the demo uses, on one question
    assert got[0].n_image_tokens == 144 and got[0].n_kept == 144
    ok, ok_blank = [], []
    blank = sv.blank_image()
    for s, q in qa:
        toks = trained.tokenize(sv.prompt(q.text))
        for img, acc in ((s.image, ok), (blank, ok_blank)):
            word = trained.detokenize([int(np.argmax(trained.forward(toks, [img])))], remove_leading_space=True)
            acc.append(word.strip() == q.answer)
    acc, acc_blank = float(np.mean(ok)), float(np.mean(ok_blank))
    recorded = _summary()["final_accuracy"]
    assert acc >= acc_blank + 0.2, (acc, acc_blank)
    assert abs(acc - recorded) < 0.1, (acc, recorded)  # 150 questions: sampling error ~0.04 (1 sd)


def test_patch_grid_marks_objects_and_kept_patches() -> None:
    scene = sv.sample(5, 0)
    full = synthdemo.patch_grid(scene)
    assert len(full) == 12 and all(len(r.split()) == 12 for r in full)
    lab = sv.patch_labels(scene)
    n_obj = int((lab.colour > 0).sum())
    assert sum(ch.isupper() for r in full for ch in r) == n_obj
    kept = [i for i in range(144) if i % 2 == 0]
    half = synthdemo.patch_grid(scene, kept)
    cells = [ch for r in half for ch in r.split()]
    for i, ch in enumerate(cells):
        assert (ch.isupper() or ch == "+") == (i % 2 == 0), (i, ch)


def test_cli_demo_mechanics(llava_tiny, tmp_path: Path) -> None:
    """`pyvtrim demo --model F` on a random-weight LLaVA (30 px, 5 x 5 image tokens): the three questions of the
    seed with their truths, FastV's kept count on every question and its kept map of the model's grid."""
    r = _run(_cli() + ["demo", "--model", str(llava_tiny.gguf), "--seed", "11", "--threads", "2",
                       "--fastv", "1:0.5"], tmp_path, timeout=90)
    assert r.returncode == 0, r.stderr
    scene = sv.sample(11, 0)
    for q in sv.questions(scene, 3):
        assert q.text in r.stdout and f"truth: {q.answer}" in r.stdout
    assert r.stdout.count("12/25 image tokens kept") == 3
    grids = [ln for ln in r.stdout.splitlines() if ln.startswith("   ") and len(ln.split()) == 5]
    assert len(grids) == 10  # the picture, then what FastV kept
    kept_cells = sum(ch.isupper() or ch == "+" for ln in grids[5:] for ch in ln.split())
    assert kept_cells == 12


def test_cli_demo_trained(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    r = _run(_cli() + ["demo", "--seed", "7", "--threads", "2", "--fastv", "2:0.5"], tmp_path, timeout=90)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    scene = sv.sample(7, 0)
    for q in sv.questions(scene, 3):
        assert q.text in r.stdout and f"truth: {q.answer}" in r.stdout
    assert r.stdout.count("72/144 image tokens kept") == 3
    assert "what FastV 2:0.5 kept" in r.stdout
    assert elapsed < 30, f"the demo took {elapsed:.1f} s"
