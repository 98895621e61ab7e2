"""The installed C program `vtrim-cli` (the wheel's command, which runs pyvtrim/bin/vtrim-cli): it starts from
the install, answers like the Python API (greedy decoding is deterministic), runs an interactive
conversation, reports why an answer stopped, recovers from a full context, and rejects bad values."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from interactive import first_turn_positions, interrupt_first_answer

import pyvtrim
from pyvtrim import _ffi

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:  # the C library is not built: nothing here can run
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

IMAGE = np.random.default_rng(5).integers(0, 256, size=(44, 52, 3), dtype=np.uint8)
QUESTION = "What is in the picture?"


def _vtrim_cli() -> str:
    """The command the wheel installed next to this Python (not a build-tree binary)."""
    script = Path(sys.executable).with_name("vtrim-cli")
    found = str(script) if script.is_file() else shutil.which("vtrim-cli")
    if not found:
        pytest.fail("vtrim-cli is not installed next to this Python (pip install . installs it)")
    return found


def _run(args: list, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_vtrim_cli()] + args, input=stdin, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=timeout)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    from PIL import Image

    p = tmp_path_factory.mktemp("cli") / "img.png"
    Image.fromarray(IMAGE).save(p)
    return p


def test_installed_binary_starts() -> None:
    """The installed C program finds libvtrim (it could not: exit 127 'cannot open shared object')."""
    r = _run(["--help"])
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--n-predict" in r.stdout and "--ctx-size" in r.stdout and "--ficoco-l" in r.stdout
    r = _run(["--version"])
    assert r.returncode == 0 and _ffi.version() in r.stdout


@pytest.mark.parametrize("args, what", [
    (["-n", "-5"], "-n -5"), (["-n", "abc"], "-n abc"), (["-t", "0"], "-t 0"), (["-c", "-1"], "-c -1"),
    (["--temp", "x"], "--temp x"), (["--top-p", "2"], "--top-p 2"), (["--bogus", "1"], "--bogus"),
    (["-p"], "-p needs a value"),
])
def test_bad_values_are_refused(llava_tiny, args: list, what: str) -> None:
    """Each used to run with a silent default (e.g. -n -5 and -n abc gave 0 tokens and exit 0)."""
    r = _run(["-m", str(llava_tiny.gguf), "-p", "hi"] + args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert what in r.stderr and r.stdout == ""


def test_the_model_is_required() -> None:
    r = _run(["-p", "hi"])
    assert r.returncode == 2 and "-m MODEL.gguf is required" in r.stderr


def test_one_shot_answers_as_the_python_api(llava_tiny, image_path: Path) -> None:
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "-n", "8", "-t", "2",
              "-c", "1024"])
    assert r.returncode == 0, r.stderr
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        expected = m.chat(str(image_path), QUESTION, max_tokens=8)
        reason = m.last_stats["finish_reason"]
    assert r.stdout == expected + "\n"
    assert f"stopped: {reason}" in r.stderr and "prefill" in r.stderr


def test_vlcache_answers_as_the_python_api(llava_tiny, image_path: Path) -> None:
    args = ["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "-n", "8", "-t", "2", "-c", "1024"]
    r = _run(args + ["--vlcache", "0.1"])
    assert r.returncode == 0, r.stderr
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        expected = m.chat(str(image_path), QUESTION, max_tokens=8, reduce=pyvtrim.VLCache(budget=0.1))
        kv_mib = m.last_stats["kv_cache_bytes"] / 1048576.0
    assert r.stdout == expected + "\n"
    assert f"KV {kv_mib:.1f} MiB" in r.stderr
    r = _run(args + ["--vlcache", "0"])
    assert r.returncode == 1 and "VL-Cache budget=0" in r.stderr, r.stderr


def test_interactive_conversation_matches_the_python_chat(llava_tiny, image_path: Path) -> None:
    """Two turns: the second turn follows the first reply with its closing token, as Chat does."""
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-n", "6", "-t", "2", "-c", "1024"],
             stdin="What is it?\nAnd then?\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("stopped:") == 2
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        chat = m.start_chat(max_tokens=6)
        expected = chat.ask("What is it?", str(image_path)) + "\n" + chat.ask("And then?") + "\n"
    assert r.stdout == expected


def test_print_tokens_gives_the_ids_generate_returns(llava_tiny, image_path: Path) -> None:
    """--print-tokens (what tools/cross_aarch64.sh compares across CPUs): one line of ids per answer on stderr,
    those of the Python API's generate() on the same prompt; the answers on stdout are unchanged."""
    args = ["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "-n", "8", "-t", "2", "-c", "1024"]
    plain = _run(args)
    r = _run(args + ["--print-tokens"])
    assert r.returncode == 0 and plain.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    assert "tokens:" not in plain.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("tokens:")]
    assert len(lines) == 1, r.stderr
    ids = [int(t) for t in lines[0].split()[1:]]
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        prompt = m.tokenize(m.chat_prompt(QUESTION, 1))
        assert ids == m.generate(prompt, [str(image_path)], max_tokens=8)
        assert r.stdout == m.chat(str(image_path), QUESTION, max_tokens=8) + "\n"
        assert r.stdout.strip() == m.detokenize(ids).strip()   # detokenize() drops SentencePiece's first space
    i = _run(args[:4] + ["-n", "5", "-t", "2", "-c", "1024", "--print-tokens"], stdin="What is it?\nAnd then?\n\n")
    assert i.returncode == 0, i.stderr
    # interactive: each line follows the "> " prompt on stderr
    turns = re.findall(r"^(?:> )?tokens:((?: \d+)*)$", i.stderr, re.M)
    assert len(turns) == 2 and all(len(t.split()) == 5 for t in turns), i.stderr


def test_length_and_full_context(llava_tiny, image_path: Path) -> None:
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "-n", "3", "-t", "2"])
    assert r.returncode == 0 and "stopped: length" in r.stderr, r.stderr
    with pyvtrim.Model(llava_tiny.gguf, n_threads=2) as m:
        n_prompt = first_turn_positions(m, QUESTION)
    n_ctx = n_prompt + 5
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "-n", "100", "-t", "2",
              "-c", str(n_ctx)])
    assert r.returncode == 0, r.stderr
    assert "stopped: context_full" in r.stderr or "stopped: eos" in r.stderr


def test_interactive_recovers_from_a_full_context(llava_tiny, image_path: Path) -> None:
    """A turn that no longer fits clears the conversation (the image stays) instead of failing every later turn."""
    with pyvtrim.Model(llava_tiny.gguf, n_threads=2) as m:
        n_prompt = first_turn_positions(m, QUESTION)
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-n", "40", "-t", "2",
              "-c", str(n_prompt + 45)], stdin=f"{QUESTION}\n{QUESTION}\n{QUESTION}\n\n")
    assert r.returncode == 0, r.stderr
    assert "the conversation was cleared; the image stays" in r.stderr
    assert r.stderr.count("stopped:") == 3
    assert "vtrim-cli: prompt" not in r.stderr


def test_ctrl_c_stops_the_answer_not_the_session(llava_tiny, image_path: Path) -> None:
    # One thread: see tests/test_cli.py's Ctrl-C test.
    rc, err = interrupt_first_answer(
        [_vtrim_cli(), "-m", str(llava_tiny.gguf), "--image", str(image_path), "-n", "400", "-t", "1",
         "-c", "2048"], then=QUESTION + "\n\n")
    assert rc == 0, err
    assert "stopped: interrupted" in err and err.count("stopped:") == 2



def test_on_the_demo_model(image_path: Path) -> None:
    """The README's C path on the model `pyvtrim demo` writes: one answer, then a two-turn conversation,
    each equal to the Python API's."""
    from pyvtrim.demo import write_demo_model

    demo = write_demo_model()
    r = _run(["-m", str(demo), "--image", str(image_path), "-p", QUESTION, "-n", "6", "-t", "2", "-c", "2048"])
    assert r.returncode == 0, r.stderr
    i = _run(["-m", str(demo), "--image", str(image_path), "-n", "4", "-t", "2", "-c", "2048"],
             stdin=f"{QUESTION}\nWhy?\n")
    assert i.returncode == 0, i.stderr
    with pyvtrim.Model(demo, n_ctx=2048, n_threads=2) as m:
        assert r.stdout == m.chat(str(image_path), QUESTION, max_tokens=6) + "\n"
        chat = m.start_chat(max_tokens=4)
        assert i.stdout == chat.ask(QUESTION, str(image_path)) + "\n" + chat.ask("Why?") + "\n"
    assert "576 image tokens" in r.stderr


def test_ficoco_v_flag(llava_tiny, image_path: Path) -> None:
    """--ficoco-v N:L answers as the Python API with FiCoCoV(tokens=N, start_layer=L)."""
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "-n", "8", "-t", "2",
              "-c", "1024", "--ficoco-v", "8:0"])
    assert r.returncode == 0, r.stderr
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        expected = m.chat(str(image_path), QUESTION, max_tokens=8, reduce=pyvtrim.FiCoCoV(tokens=8, start_layer=0))
    assert r.stdout == expected + "\n"
    assert "(8 kept)" in r.stderr
    for bad in ("0", "8:", "8:-1", "x"):
        b = _run(["-m", str(llava_tiny.gguf), "-p", "hi", "--ficoco-v", bad])
        assert b.returncode == 2 and "--ficoco-v" in b.stderr, (bad, b.stderr)
    far = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", "hi", "--ficoco-v", "8"])
    assert far.returncode == 1 and "start_layer=12" in far.stderr, far.stderr
def test_ficoco_l_answers_as_the_python_api(llava_tiny, image_path: Path) -> None:
    """--ficoco-l N:L is pyvtrim.FiCoCoL(tokens=N, start_layer=L) (the tiny model has 2 layers: L = 1)."""
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "-n", "8", "-t", "2",
              "-c", "1024", "--ficoco-l", "6:1"])
    assert r.returncode == 0, r.stderr
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        expected = m.chat(str(image_path), QUESTION, max_tokens=8,
                          reduce=pyvtrim.FiCoCoL(tokens=6, start_layer=1))
        assert m.last_stats["n_image_tokens_kept"] == 6
    assert r.stdout == expected + "\n"


@pytest.mark.parametrize("value, what", [("0", "--ficoco-l 0"), ("x", "--ficoco-l x"), ("6:", "--ficoco-l"),
                                         ("6:1:2", "--ficoco-l")])
def test_ficoco_l_bad_values(llava_tiny, value: str, what: str) -> None:
    r = _run(["-m", str(llava_tiny.gguf), "-p", "hi", "--ficoco-l", value])
    assert r.returncode == 2 and what in r.stderr and r.stdout == "", r.stderr


def test_ficoco_l_refused_by_the_model(llava_tiny, image_path: Path) -> None:
    """The default start layer (4) does not fit the 2-layer model: the library's reason, before any answer."""
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "--ficoco-l", "6"])
    assert r.returncode != 0 and "start_layer=4" in r.stderr and r.stdout == "", r.stderr


def test_fastv_flag(llava_tiny, image_path: Path) -> None:
    """--fastv K:R answers as the Python API with FastV(k=K, ratio=R)."""
    r = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", QUESTION, "-n", "8", "-t", "2",
              "-c", "1024", "--fastv", "1:0.5"])
    assert r.returncode == 0, r.stderr
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        expected = m.chat(str(image_path), QUESTION, max_tokens=8, reduce=pyvtrim.FastV(k=1, ratio=0.5))
        kept = m.last_stats["n_image_tokens_kept"]
    assert r.stdout == expected + "\n"
    assert f"({kept} kept)" in r.stderr
    for bad in ("2", "0:0.5", "x:0.5", "2:", "2:y"):
        b = _run(["-m", str(llava_tiny.gguf), "-p", "hi", "--fastv", bad])
        assert b.returncode == 2 and "--fastv" in b.stderr, (bad, b.stderr)
    far = _run(["-m", str(llava_tiny.gguf), "--image", str(image_path), "-p", "hi", "--fastv", "9:0.5"])
    assert far.returncode == 1 and "--fastv" in far.stderr, far.stderr


def test_trim_flag(mllama_tiny, tmp_path: Path) -> None:
    """--trim K_RATIO answers as the Python API with TrimCrossAttn(k_ratio=K_RATIO); LLaVA refuses it."""
    import numpy as np
    from PIL import Image

    img = tmp_path / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(28, 56, 3), dtype=np.uint8)).save(img)
    r = _run(["-m", str(mllama_tiny.gguf), "--image", str(img), "-p", QUESTION, "-n", "6", "-t", "2",
              "-c", "1024", "--trim", "0.5"])
    assert r.returncode == 0, r.stderr
    with pyvtrim.Model(mllama_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        expected = m.chat(str(img), QUESTION, max_tokens=6, reduce=pyvtrim.TrimCrossAttn(k_ratio=0.5))
    assert r.stdout == expected + "\n"
    bad = _run(["-m", str(mllama_tiny.gguf), "--image", str(img), "-p", "hi", "--trim", "0"])
    assert bad.returncode == 1 and "--trim" in bad.stderr, bad.stderr
