"""The Python API on a converted tiny LLaVA: tokens, info, preprocessing, generation, chat (streamed and
multi-turn), stats, and the `pyvtrim` command. Numerical parity with transformers is tested in
test_parity_llava.py; here the runtime is checked against itself (prefill vs decode, one prefill vs a
conversation built turn by turn) and against the HF config."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pyvtrim
from pyvtrim import _ffi

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:  # the C library is not built: nothing here can run
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

IMAGE = np.random.default_rng(11).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
QUESTION = "What is in the picture?"
STATS_KEYS = {"n_past", "n_prompt_tokens", "n_images", "n_image_tokens", "n_image_tokens_kept",
              "kv_cache_bytes", "t_encode_ms", "t_prefill_ms", "t_decode_ms", "n_decoded"}


@pytest.fixture(scope="module")
def model(llava_tiny):
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=1024, kv_type="f32", n_threads=2) as m:
        yield m


def _hf_config(fixture) -> dict:
    return json.loads((Path(fixture.hf_dir) / "config.json").read_text())


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _cli() -> list:
    """The installed console script, else `python -m pyvtrim`."""
    script = Path(sys.executable).with_name("pyvtrim")
    if script.is_file():
        return [str(script)]
    found = shutil.which("pyvtrim")
    return [found] if found else [sys.executable, "-m", "pyvtrim"]


def _run(cmd: list, cwd: Path, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the command outside the source tree (so the installed package is what runs), UTF-8 both ways."""
    package_parent = str(Path(pyvtrim.__file__).resolve().parents[1])  # the package this process tests
    env = dict(os.environ, PYTHONIOENCODING="utf-8",
               PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, input=stdin, capture_output=True, encoding="utf-8", timeout=timeout, cwd=cwd, env=env)


# ---- text -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["Hello world! How are you?", "héllo wörld, 世界 🙂 tab\tnew\nline", "  two spaces"])
def test_tokenize_detokenize_round_trip(model, text: str) -> None:
    ids = model.tokenize(text, add_special=False)
    assert ids and all(isinstance(t, int) for t in ids)
    assert model.detokenize(ids, remove_leading_space=True) == text
    with_bos = model.tokenize(text)
    assert with_bos[0] == model.info["bos_token_id"] and with_bos[1:] == ids
    assert model.detokenize(with_bos, remove_leading_space=True) == text  # BOS is not text


def test_special_tokens_in_text(model) -> None:
    ids = model.tokenize("USER: <image>\nhi", add_special=False)
    assert ids.count(model.image_token_id) == 1
    assert model.tokenize("", add_special=False) == []


def test_partial_utf8(model) -> None:
    """An emoji outside the vocabulary is spelled with byte tokens; a prefix of them is not text yet."""
    ids = model.tokenize("🙂 ok", add_special=False)
    assert model.detokenize_bytes(ids, remove_leading_space=True) == "🙂 ok".encode()
    first_byte = next(i for i, t in enumerate(ids) if model.detokenize_bytes([t]) == b"\xf0")
    assert model.detokenize(ids[: first_byte + 2], remove_leading_space=True).endswith("\ufffd")
    # Streaming holds partial characters back: no piece holds a replacement character.
    pieces = list(model._text_pieces(iter(ids)))
    assert "".join(pieces) == "🙂 ok" and not any("\ufffd" in p for p in pieces)


def test_chat_prompt_has_one_placeholder_per_image(model) -> None:
    for n in (0, 1, 2):
        prompt = model.chat_prompt(QUESTION, n)
        assert QUESTION in prompt
        assert model.tokenize(prompt).count(model.image_token_id) == n


# ---- what the model is ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llava_tiny", "llava_tiny_gqa"])
def test_info_matches_the_hf_config(request, name: str) -> None:
    fixture = request.getfixturevalue(name)
    cfg = _hf_config(fixture)
    text, vision = cfg["text_config"], cfg["vision_config"]
    with pyvtrim.Model(fixture.gguf, n_ctx=128, n_threads=2) as m:
        info = m.info
        ffi = _ffi.get().ffi
        assert set(info) == {f for f, _ in ffi.typeof("struct vtrim_model_info").fields}
        assert info["arch"] == "llava"
        assert m.n_vocab == info["n_vocab"] == text["vocab_size"]
        assert info["n_embd"] == text["hidden_size"]
        assert info["n_layer"] == text["num_hidden_layers"]
        assert info["n_head"] == text["num_attention_heads"]
        assert info["n_head_kv"] == text["num_key_value_heads"]
        layer = cfg.get("vision_feature_layer", -2)
        assert info["n_vision_layer"] == (vision["num_hidden_layers"] + 1 + layer if layer < 0 else layer)
        assert info["image_size"] == vision["image_size"]
        assert info["n_image_tokens"] == (vision["image_size"] // vision["patch_size"]) ** 2
        assert m.image_token_id == info["image_token_id"] == cfg.get("image_token_id", cfg.get("image_token_index"))
        assert (info["bos_token_id"], info["eos_token_id"]) == (1, 2)
        assert info["n_params"] > 0 and info["n_bytes"] >= 4 * info["n_params"]  # the fixtures are f32
        assert m.is_eog(info["eos_token_id"]) and not m.is_eog(info["bos_token_id"])


def test_preprocess(model, llava_tiny) -> None:
    side = model.info["image_size"]
    px = model.preprocess(IMAGE)
    assert px.dtype == np.float32 and px.shape == (1, 3, side, side)
    assert np.isfinite(px).all()
    # A uniform image stays uniform through resize and crop: each channel is (v/255 - mean) / std.
    pp = json.loads((Path(llava_tiny.hf_dir) / "preprocessor_config.json").read_text())
    gray = model.preprocess(np.full((50, 50, 3), 100, dtype=np.uint8))
    expected = (100 / 255 - np.array(pp["image_mean"])) / np.array(pp["image_std"])
    np.testing.assert_allclose(gray[0].reshape(3, -1), np.repeat(expected[:, None], side * side, 1), atol=1e-5)


def test_every_image_kind_gives_the_same_pixels(model, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "img.png"
    png = _png(IMAGE)
    path.write_bytes(png)
    ref = model.preprocess(IMAGE)
    for image in (str(path), path, png, bytearray(png), memoryview(png), Image.fromarray(IMAGE),
                  Image.fromarray(IMAGE).convert("RGBA")):
        np.testing.assert_array_equal(model.preprocess(image), ref, err_msg=repr(image))
    assert model.preprocess(Image.fromarray(IMAGE).convert("L")).shape == ref.shape


# ---- running ----------------------------------------------------------------------------------

def test_forward(model) -> None:
    tokens = model.tokenize(model.chat_prompt(QUESTION, 1))
    a = model.forward(tokens, [IMAGE])
    assert a.dtype == np.float32 and a.shape == (model.n_vocab,) and np.isfinite(a).all()
    b = model.forward(tokens, IMAGE)  # one image needs no list; each forward is a fresh sequence
    np.testing.assert_array_equal(a, b)
    c = model.forward(tokens, [np.ascontiguousarray(IMAGE[::-1])])
    assert not np.array_equal(a, c)  # the image reaches the logits


def test_generate_is_greedy_and_consistent_with_forward(model) -> None:
    prompt = model.tokenize(model.chat_prompt(QUESTION, 1))
    out = model.generate(prompt, [IMAGE], max_tokens=6)
    assert 0 < len(out) <= 6 or model.is_eog(int(model.forward(prompt, [IMAGE]).argmax()))
    assert not any(model.is_eog(t) for t in out)
    assert model.generate(prompt, [IMAGE], max_tokens=6) == out
    # Decoding token by token picks what one prefill over the same tokens picks (f32 KV cache).
    for i, token in enumerate(out):
        assert int(model.forward(prompt + out[:i], [IMAGE]).argmax()) == token
    if len(out) < 6:  # it stopped at an end-of-generation token
        assert model.is_eog(int(model.forward(prompt + out, [IMAGE]).argmax()))
    stats = model.last_stats
    assert model.generate(prompt, [IMAGE], max_tokens=0) == []
    assert model.generate(prompt, [IMAGE], max_tokens=3) == out[:3]
    assert stats["n_decoded"] == 0  # the last call was a forward


def test_generate_sampling_is_seeded(model) -> None:
    prompt = model.tokenize("Once upon a time")
    kw = dict(max_tokens=8, temperature=1.5, top_k=0, top_p=1.0)
    a = model.generate(prompt, seed=1, **kw)
    assert model.generate(prompt, seed=1, **kw) == a
    others = [model.generate(prompt, seed=s, **kw) for s in range(2, 6)]
    assert any(o != a for o in others)


def test_generate_length_and_decodes(model) -> None:
    """At most max_tokens, never an EOG; every returned token but a last one cut by max_tokens is
    decoded into the sequence (a stop at EOG decodes them all)."""
    prompt = model.tokenize(model.chat_prompt(QUESTION, 1))
    for max_tokens in (1, 5, 17):
        out = model.generate(prompt, [IMAGE], max_tokens=max_tokens)
        assert len(out) <= max_tokens and not any(model.is_eog(t) for t in out)
        n_decoded = model.last_stats["n_decoded"]
        assert n_decoded == (max_tokens - 1 if len(out) == max_tokens else len(out))


def test_chat_and_stream(model) -> None:
    answer = model.chat(IMAGE, QUESTION, max_tokens=12)
    assert isinstance(answer, str)
    stats = model.last_stats
    pieces = list(model.chat(IMAGE, QUESTION, max_tokens=12, stream=True))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == answer
    # The answer is the detokenized greedy generation of the same prompt.
    prompt = model.tokenize(model.chat_prompt(QUESTION, 1))
    assert model.detokenize(model.generate(prompt, [IMAGE], max_tokens=12), remove_leading_space=True) == answer
    assert model.last_stats["n_past"] == stats["n_past"]


def test_stream_errors_raise_before_iteration(model, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        model.chat(tmp_path / "missing.png", QUESTION, stream=True)  # not deferred to the first next()


def test_last_stats(model, llava_tiny) -> None:
    cfg = _hf_config(llava_tiny)["vision_config"]
    n_image_tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2
    prompt = model.tokenize(model.chat_prompt(QUESTION, 1))
    out = model.generate(prompt, [IMAGE], max_tokens=5)
    s = model.last_stats
    assert set(s) >= STATS_KEYS
    assert s["n_images"] == 1
    assert s["n_image_tokens"] == s["n_image_tokens_kept"] == n_image_tokens
    assert s["n_prompt_tokens"] == len(prompt) - 1 + n_image_tokens
    assert s["n_decoded"] == (4 if len(out) == 5 else len(out))
    assert s["n_past"] == s["n_prompt_tokens"] + s["n_decoded"]
    info = model.info
    kv_per_token = 2 * info["n_layer"] * info["n_embd"] // info["n_head"] * info["n_head_kv"] * 4  # f32 K and V
    assert s["kv_cache_bytes"] >= s["n_past"] * kv_per_token
    assert s["t_encode_ms"] > 0 and s["t_prefill_ms"] > 0 and s["t_decode_ms"] >= 0

    model.forward(model.tokenize("no image"))
    s = model.last_stats
    assert (s["n_images"], s["n_image_tokens"], s["t_encode_ms"]) == (0, 0, 0)


def test_multi_turn_chat(model) -> None:
    chat = model.start_chat(max_tokens=6)
    first = chat.ask(QUESTION, IMAGE)
    s1 = model.last_stats
    second = chat.ask("And what colour is it?")
    s2 = model.last_stats
    assert isinstance(first, str) and isinstance(second, str)
    assert [q for q, _ in chat.history] == [QUESTION, "And what colour is it?"]
    # The second turn prefills only its own tokens; the sequence grows.
    assert s2["n_prompt_tokens"] < s1["n_past"]
    assert s2["n_images"] == 0
    assert s2["n_past"] == s1["n_past"] + s2["n_prompt_tokens"] + s2["n_decoded"]

    # The conversation built turn by turn equals one prefill of the whole conversation.
    whole = chat._tokens[: len(chat._tokens) - s2["n_decoded"]]
    expected = model.generate(whole, [IMAGE], max_tokens=6)
    assert model.detokenize(expected, remove_leading_space=True) == second

    # Another call in between: the next turn rebuilds the conversation and answers the same.
    again = model.start_chat(max_tokens=6)
    assert again.ask(QUESTION, IMAGE) == first
    model.forward(model.tokenize("interruption"))
    assert again.ask("And what colour is it?") == second


def test_multi_turn_separator_follows_the_template(model) -> None:
    chat = model.start_chat(max_tokens=3)
    chat.ask(QUESTION, IMAGE)
    n_before = len(chat._tokens)
    chat.ask("Why?")
    turn = chat._tokens[n_before: len(chat._tokens) - model.last_stats["n_decoded"]]
    eos = model.info["eos_token_id"]
    assert eos in turn[:2]  # the reply is closed by EOS ("... ASSISTANT: a</s>USER: ...")
    assert turn[turn.index(eos) + 1:] == model.tokenize(model.chat_prompt("Why?", 0), add_special=False)


def test_chat_stream_partial_read(model) -> None:
    chat = model.start_chat(max_tokens=8)
    stream = chat.ask(QUESTION, IMAGE, stream=True)
    next(iter(stream), None)
    answer = chat.ask("Again?")  # the unfinished stream is closed, the conversation goes on
    assert isinstance(answer, str) and len(chat.history) == 2


# ---- the command ------------------------------------------------------------------------------

def test_cli_chat_with_prompt(model, llava_tiny, tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    image.write_bytes(_png(IMAGE))
    cmd = _cli() + ["chat", str(llava_tiny.gguf), "--image", str(image), "--prompt", QUESTION,
                    "--max-tokens", "8", "--threads", "2", "--n-ctx", "1024", "--kv-type", "f32"]
    r = _run(cmd, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == model.chat(str(image), QUESTION, max_tokens=8) + "\n"
    assert "prefill" in r.stderr and "decode" in r.stderr


def test_cli_chat_interactive(llava_tiny, tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    image.write_bytes(_png(IMAGE))
    cmd = _cli() + ["chat", str(llava_tiny.gguf), "--image", str(image), "--max-tokens", "4", "--threads", "2",
                    "--n-ctx", "1024"]
    r = _run(cmd, tmp_path, stdin="What is it?\nAnd then?\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2  # two answers (random weights may also emit newlines)
    assert r.stderr.count("prefill") == 2


def test_cli_info(llava_tiny, tmp_path: Path) -> None:
    r = _run(_cli() + ["info", str(llava_tiny.gguf)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "image_token_id" in r.stdout and "llava" in r.stdout


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = _run(_cli() + ["chat", str(tmp_path / "x.gguf"), "--image", "x.png", "--prompt", "hi"], tmp_path)
    assert r.returncode == 1
    assert "x.gguf" in r.stderr and "Traceback" not in r.stderr


def test_cli_demo(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    r = _run(_cli() + ["demo", "--random-weights", "--max-tokens", "4", "--threads", "2"], tmp_path, timeout=90)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "image tokens" in r.stdout and "gibberish" in r.stdout
    assert elapsed < 30, f"the demo took {elapsed:.1f} s"
