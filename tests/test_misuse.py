"""Defects a new user met, each with its regression test: arguments out of range, why a generation stopped,
a conversation that outgrows n_ctx, images only Pillow decodes, and mmproj files that do not belong."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from interactive import first_turn_positions

import pyvtrim
from pyvtrim import _ffi

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:  # the C library is not built: nothing here can run
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

IMAGE = np.random.default_rng(9).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def model(llava_tiny):
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=1024, n_threads=2) as m:
        yield m


# ---- arguments ----------------------------------------------------------------------------------

def test_negative_max_tokens_is_refused(model) -> None:
    prompt = model.tokenize("hello")
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate(prompt, max_tokens=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        model.chat(IMAGE, QUESTION, max_tokens=-5)
    with pytest.raises(ValueError, match="max_tokens"):
        model.start_chat(max_tokens=-1)
    chat = model.start_chat(max_tokens=2)
    with pytest.raises(ValueError, match="max_tokens"):
        chat.ask(QUESTION, IMAGE, max_tokens=-2)
    assert model.generate(prompt, max_tokens=0) == []
    assert model.last_stats["finish_reason"] == "length"


def test_an_impossible_image_count_is_refused_before_any_allocation(model) -> None:
    # Found by the chat_format fuzz target: 2^31 - 1 placeholders used to be allocated (~17 GB) and printed
    # before the length check; now the size is computed first and the call fails at once.
    with pytest.raises(pyvtrim.VtrimValueError, match="2\\^31"):
        model.chat_prompt(QUESTION, 2**31 - 1)
    with pytest.raises(pyvtrim.VtrimValueError):
        model.chat_prompt(QUESTION, -1)
    # a possible count is still formatted in full
    assert model.chat_prompt(QUESTION, 3).count("<image>") == 3


def test_n_ctx(llava_tiny) -> None:
    with pytest.raises(ValueError, match="n_ctx"):
        pyvtrim.Model(llava_tiny.gguf, n_ctx=-5)
    with pytest.raises(ValueError, match="n_threads"):
        pyvtrim.Model(llava_tiny.gguf, n_threads=0)
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=0, n_threads=2) as m:  # 0: the model's trained context
        assert m.n_ctx == m.info["n_ctx_train"] > 0
        prompt = m.tokenize("word " * (m.n_ctx - 2))
        m.forward(prompt)  # it really holds n_ctx_train positions
        assert m.last_stats["n_past"] == len(prompt)


# ---- why a generation stopped -------------------------------------------------------------------

def test_finish_reason_length_and_context_full(model, llava_tiny) -> None:
    model.chat(IMAGE, QUESTION, max_tokens=3)
    s = model.last_stats
    assert s["finish_reason"] in ("length", "eos")
    if s["finish_reason"] == "length":
        assert s["n_decoded"] == 2  # the last token is sampled, not decoded

    with pyvtrim.Model(llava_tiny.gguf, n_ctx=64, n_threads=2) as m:
        prompt = m.tokenize("word " * 50)
        out = m.generate(prompt, max_tokens=200)
        assert m.last_stats["finish_reason"] in ("context_full", "eos")
        if m.last_stats["finish_reason"] == "context_full":
            assert m.last_stats["n_past"] == 64 and len(out) == 64 - len(prompt) + 1


def test_finish_reason_is_none_for_a_stream_closed_early(model) -> None:
    stream = model.chat(IMAGE, QUESTION, max_tokens=20, stream=True)
    next(stream)
    stream.close()
    assert model.last_stats["finish_reason"] is None


def test_finish_reason_eos(llava_tiny, tmp_path: Path) -> None:
    """A copy of the model whose output row for EOS is 4x the row of the first reply token: greedy decoding
    then picks EOS first (its logit is 4x the largest, positive, logit), and the reply is empty."""
    import shutil

    from gguf import GGUFReader

    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as m:
        prompt = m.tokenize(m.chat_prompt(QUESTION, 1))
        logits = m.forward(prompt, [IMAGE])
        first, eos = int(np.argmax(logits)), int(m.info["eos_token_id"])
        assert logits[first] > 0
    patched = tmp_path / "eos-first.gguf"
    shutil.copy(llava_tiny.gguf, patched)
    reader = GGUFReader(patched, "r+")
    out = next(t for t in reader.tensors if t.name == "output.weight").data
    out[eos] = 4 * out[first]
    out.flush()
    del reader, out
    with pyvtrim.Model(patched, n_ctx=1024, n_threads=2) as m:
        assert m.chat(IMAGE, QUESTION, max_tokens=10) == ""
        assert m.last_stats["finish_reason"] == "eos"


# ---- a conversation longer than n_ctx -----------------------------------------------------------

def test_chat_drops_the_oldest_turns_when_the_context_is_full(llava_tiny) -> None:
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=2) as probe:
        first_len = first_turn_positions(probe, QUESTION)
    n_ctx = first_len + 60
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=n_ctx, n_threads=2) as m:
        chat = m.start_chat(max_tokens=12)
        chat.ask(QUESTION, IMAGE)
        answers = [chat.ask(f"And question {i}?") for i in range(12)]
        assert len(chat.history) == 13 and all(isinstance(a, str) for a in answers)
        assert chat.turns_dropped >= 1  # the image turn went first
        # What the context holds is exactly the kept turns, as one fresh prefill would hold them.
        s = m.last_stats
        assert s["n_past"] <= n_ctx
        kept = chat._tokens[: len(chat._tokens) - s["n_decoded"]]
        m2_reply = chat.history[-1][1]
        with pyvtrim.Model(llava_tiny.gguf, n_ctx=n_ctx, n_threads=2) as fresh:
            images = [IMAGE] if kept.count(fresh.image_token_id) else []
            again = fresh.generate(kept, images, max_tokens=12)
            assert fresh.detokenize(again, remove_leading_space=True) == m2_reply


def test_chat_turn_that_cannot_fit_raises_and_the_chat_goes_on(llava_tiny) -> None:
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=48, n_threads=2) as m:
        chat = m.start_chat(max_tokens=4)
        chat.ask("Hi?")
        with pytest.raises(pyvtrim.VtrimContextFullError):
            chat.ask("word " * 80)
        assert isinstance(chat.ask("Still there?"), str)


def test_interrupted_generation_rebuilds_the_conversation(model) -> None:
    """An exception inside a generation step (Ctrl-C lands between a decode and its record) leaves the KV
    cache unknown: the next turn rebuilds the conversation from what was recorded, and answers as one
    fresh prefill of that conversation does."""
    chat = model.start_chat(max_tokens=8)
    real_sample, calls = chat._sampler.sample, []

    def sample(ctx):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_sample(ctx)

    chat._sampler.sample = sample
    with pytest.raises(KeyboardInterrupt):
        chat.ask(QUESTION, IMAGE)
    assert chat._seq_id is None
    chat._sampler.sample = real_sample
    second = chat.ask("And then?")
    s = model.last_stats
    assert s["n_images"] == 1  # rebuilt from the first turn, image included
    whole = chat._tokens[: len(chat._tokens) - s["n_decoded"]]
    expected = model.generate(whole, [IMAGE], max_tokens=8)
    assert model.detokenize(expected, remove_leading_space=True) == second


# ---- images Pillow decodes for libvtrim ---------------------------------------------------------

@pytest.mark.parametrize("fmt", ["WEBP", "TIFF"])
def test_webp_and_tiff_by_path_and_bytes(model, tmp_path: Path, fmt: str) -> None:
    from PIL import Image

    pil = Image.fromarray(IMAGE)
    path = tmp_path / f"img.{fmt.lower()}"
    save = dict(lossless=True) if fmt == "WEBP" else {}
    pil.save(path, format=fmt, **save)
    decoded = np.asarray(Image.open(path).convert("RGB"))
    if fmt == "WEBP":
        np.testing.assert_array_equal(decoded, IMAGE)  # lossless: the exact pixels come back
    expected = model.preprocess(decoded)
    np.testing.assert_array_equal(model.preprocess(str(path)), expected)
    np.testing.assert_array_equal(model.preprocess(path.read_bytes()), expected)
    assert isinstance(model.chat(str(path), QUESTION, max_tokens=2), str)


def test_a_damaged_native_format_still_fails(model, tmp_path: Path) -> None:
    """Files of libvtrim's own formats that it rejects are not handed to a more lenient decoder."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(IMAGE).save(buf, format="JPEG")
    damaged = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(pyvtrim.VtrimImageError):
        model.preprocess(damaged)
    with pytest.raises(pyvtrim.VtrimImageError):
        model.preprocess(b"not an image at all")


# ---- mmproj files that do not belong ------------------------------------------------------------

def test_mmproj_with_a_single_file_model(llava_tiny) -> None:
    with pytest.raises(ValueError, match="already holds its vision tower") as e:
        pyvtrim.Model(llava_tiny.gguf, mmproj=llava_tiny.mmproj_path())
    assert "appears twice" not in str(e.value)
    assert str(llava_tiny.mmproj_path()) in str(e.value)


def test_mmproj_of_another_model(llava_tiny, tiny_llava_factory) -> None:
    other = tiny_llava_factory(n_kv_heads=4, text_hidden=96, seed=4)
    text = llava_tiny.gguf_path("f32", "llama.cpp")
    with pytest.raises(pyvtrim.VtrimError, match="not from the same model") as e:
        pyvtrim.Model(text, mmproj=other.mmproj_path())
    assert "96-wide" in str(e.value) and "64 wide" in str(e.value)
    assert str(other.mmproj_path()) in str(e.value)
