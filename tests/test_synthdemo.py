"""`pyvtrim demo` on a synthvqa model (`--model`): the picture's per-token map, the three questions with their
truths, and what FastV kept. A random-weight LLaVA stands in for a trained one: the mechanics do not depend on
the answers being right."""

from __future__ import annotations

from pathlib import Path

import pytest

import pyvtrim
from pyvtrim import _ffi, synthdemo
from pyvtrim import synthvqa as sv

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

from test_api import _cli, _run  # noqa: E402

# The shipped model's accuracy on test_shipped_model_reads_the_image's 60 questions must reach this
# (issue 14's target for a shipped model is >= 90% held out).
ACC_MIN = 0.8


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


def test_shipped_model_reads_the_image() -> None:
    """The shipped trained model (pyvtrim/data/tiny-llava-synthvqa.gguf, when this installation has one) in the
    runtime: most of 60 questions of a seed it was not trained or checked on (2000) right, far fewer with a blank
    image. The thresholds sit below the shipping target (>= 90% held out, README "A trained tiny VLM for
    fidelity"), so a runtime change that breaks the vision path or the prompt's layout fails here."""
    path = synthdemo.trained_model_path()
    if path is None:
        pytest.skip("this installation ships no trained model")
    qa = sv.held_out(2000, 60)
    with pyvtrim.Model(str(path), n_ctx=512, n_threads=2) as m:
        def accuracy(blank: bool) -> float:
            ok = 0
            for scene, q in qa:
                image = sv.blank_image() if blank else scene.image
                ans = synthdemo.ask(m, sv.Scene(scene.seed, scene.index, image, scene.objects, scene.object_map),
                                    [q])[0]
                ok += ans.correct
            return ok / len(qa)

        seen, blank = accuracy(False), accuracy(True)
    assert seen >= ACC_MIN, seen
    assert blank <= seen - 0.3, (seen, blank)
