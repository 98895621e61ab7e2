"""Llama-3.2-Vision (mllama) parity: the converted GGUF run by pyvtrim against transformers'
MllamaForConditionalGeneration, fed the same token ids (pyvtrim's Llama-3 tokenizer) and images.

Tolerance: f32 GGUF with an f32 KV cache: max |logit diff| <= 1e-3 absolute; the fixtures' logits have a std
of 1.5-2 (initializer_range 0.2 and random non-zero gates, tests/fixtures_mllama.py), so this is below 1e-3
of the logit scale and what remains is float32 summation order. f16 GGUF (f16 weights and caches): 5e-2 of the
logit std, and the same argmax.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import pyvtrim  # noqa: E402

import mllama_reference as mr  # noqa: E402


def _image(h: int, w: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["mllama_tiny", "mllama_tiny_b"])
def pair(request):
    fx = request.getfixturevalue(request.param)
    hf = mr.load_model(fx.hf_dir)
    proc = mr.load_image_processor(fx.hf_dir)
    with pyvtrim.Model(str(fx.gguf), n_ctx=1024, kv_type="f32", n_threads=2) as m:
        yield request.param, fx, hf, proc, m


def _tile(m) -> int:
    return int(m.info["image_size"])


@pytest.mark.parametrize("grid", [(1, 1), (2, 1), (1, 3)])
def test_prefill_logits_by_aspect_ratio(pair, grid):
    name, _, hf, proc, m = pair
    t = _tile(m)
    img = _image(grid[0] * t - 3, grid[1] * t - 5, seed=sum(grid))
    info = m.preprocess_info(img)
    assert info["n_tiles"] == grid[0] * grid[1]
    ids = m.tokenize(m.chat_prompt("What is in this picture?", 1))
    want = mr.run_hf(hf, ids, [img], proc).last_logits[: m.n_vocab]
    got = m.forward(ids, [img])
    diff = float(np.max(np.abs(got - want)))
    print(f"{name} {grid}: max|diff| {diff:.2e}, logit std {want.std():.3f}")
    assert want.std() > 0.3
    assert diff <= 1e-3
    # info["n_image_tokens"]: the states of one image, max_tiles tiles of n_pos each; the real tiles count
    n_pos = m.info["n_image_tokens"] // len(info["aspect_ratio_mask"])
    assert m.last_stats["n_image_tokens"] == info["n_tiles"] * n_pos


def test_text_only_prompt(pair):
    _, _, hf, proc, m = pair
    ids = m.tokenize(m.chat_prompt("Tell me about llamas.", 0))
    want = mr.run_hf(hf, ids, None, proc).last_logits[: m.n_vocab]
    assert np.max(np.abs(m.forward(ids) - want)) <= 1e-3


def test_text_before_the_image(pair):
    """Rows before <|image|> see no image: HF attends uniformly over every state and drops their MLP update."""
    _, _, hf, proc, m = pair
    img = _image(40, 30, seed=9)
    ids = m.tokenize("Look closely at this photograph: <|image|>What animal is it?")
    assert ids.count(m.image_token_id) == 1 and ids.index(m.image_token_id) > 3
    want = mr.run_hf(hf, ids, [img], proc).last_logits[: m.n_vocab]
    assert np.max(np.abs(m.forward(ids, [img]) - want)) <= 1e-3


def test_greedy_16_tokens(pair):
    _, _, hf, proc, m = pair
    img = _image(50, 90, seed=4)
    ids = m.tokenize(m.chat_prompt("Describe it.", 1))
    ref = mr.run_hf(hf, ids, [img], proc, n_decode=16)
    got = m.generate(ids, [img], max_tokens=16)
    assert got == ref.tokens[: len(got)]
    assert len(got) == 16 or m.is_eog(ref.tokens[len(got)])


def test_decode_logits_follow_reference(pair):
    _, _, hf, proc, m = pair
    img = _image(33, 70, seed=5)
    ids = m.tokenize(m.chat_prompt("What colour dominates?", 1))
    ref = mr.run_hf(hf, ids, [img], proc, n_decode=5)
    logits = m.forward(ids, [img])
    for step, want in enumerate(ref.step_logits):
        assert np.max(np.abs(logits - want[: m.n_vocab])) <= 1e-3, f"step {step}"
        logits = m.decode(ref.tokens[step])


def test_f16_close(mllama_tiny):
    hf = mr.load_model(mllama_tiny.hf_dir)
    proc = mr.load_image_processor(mllama_tiny.hf_dir)
    img = _image(60, 40, seed=2)
    with pyvtrim.Model(str(mllama_tiny.gguf_f16), n_ctx=512, n_threads=2) as m:
        ids = m.tokenize(m.chat_prompt("What is it?", 1))
        want = mr.run_hf(hf, ids, [img], proc).last_logits[: m.n_vocab]
        got = m.forward(ids, [img])
    diff = float(np.max(np.abs(got - want)))
    print(f"mllama f16: max|diff| {diff:.2e}, logit std {want.std():.3f}")
    assert diff <= 5e-2 * want.std()
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_bad_inputs(pair):
    _, _, _, _, m = pair
    one = m.tokenize(m.chat_prompt("Compare.", 1))
    with pytest.raises(ValueError, match="placeholder|image"):
        m.forward(one, [_image(30, 30), _image(30, 30)])
    five = m.tokenize(m.chat_prompt("Compare them all.", 5))
    with pytest.raises(ValueError, match="at most 4"):
        m.forward(five, [_image(30, 30, seed=i) for i in range(5)])
    # smaller than one patch, and huge: both resized as MllamaImageProcessor does
    assert np.all(np.isfinite(m.forward(one, [_image(1, 1)])))
    assert np.all(np.isfinite(m.forward(one, [_image(3000, 2000)])))


def test_reduction_that_does_not_apply(pair):
    _, _, _, _, m = pair
    ids = m.tokenize(m.chat_prompt("What is it?", 1))
    with pytest.raises(ValueError, match="FastV"):
        m.forward(ids, [_image(30, 30)], reduce=pyvtrim.FastV(k=2, ratio=0.5))


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (2, 2)])
def test_chunked_vision_attention_by_aspect_ratio(mllama_tiny, grid):
    """vision_attn="chunked" against transformers: the padded tiles' rows leave the padded keys out of their
    products (HF masks padding against padding), so images of 1 and 3 tiles check that part too."""
    hf = mr.load_model(mllama_tiny.hf_dir)
    proc = mr.load_image_processor(mllama_tiny.hf_dir)
    with pyvtrim.Model(str(mllama_tiny.gguf), n_ctx=1024, kv_type="f32", n_threads=2, vision_attn="chunked",
                       image_cache_mib=0) as m:
        t = _tile(m)
        img = _image(grid[0] * t - 3, grid[1] * t - 5, seed=sum(grid))
        assert m.preprocess_info(img)["n_tiles"] == grid[0] * grid[1]
        ids = m.tokenize(m.chat_prompt("What is in this picture?", 1))
        want = mr.run_hf(hf, ids, [img], proc).last_logits[: m.n_vocab]
        got = m.forward(ids, [img])
    assert want.std() > 0.3
    assert float(np.max(np.abs(got - want))) <= 1e-3
