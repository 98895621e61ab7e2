"""LLaVA-1.5 parity: the converted GGUF run by pyvtrim against transformers' LlavaForConditionalGeneration.

Tolerances:
  * f32 GGUF with an f32 KV cache: max |logit diff| <= 1e-3 absolute. The fixtures' logits have a std of
    order 1 (initializer_range 0.2, see tests/fixtures.py), so this is ~1e-3 relative to the logit scale;
    what remains is float32 accumulation order (ggml's blocked matmuls vs oneDNN) and libm differences.
  * f16 GGUF (f16 weights, f16 KV cache): weights rounded to 11-bit mantissas change the logits by a few
    1e-3 of their scale per layer; we allow 5e-2 of the logit std and require the same argmax.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pyvtrim  # noqa: E402

from fixtures import IMAGE_TOKEN_ID  # noqa: E402

PROMPTS = [
    "USER: <image>\nWhat is in the picture? ASSISTANT:",
    "USER: <image>\nDescribe the colours, then count the objects. ASSISTANT:",
]


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    square = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, size=(40, 90, 3), dtype=np.uint8)
    tall = np.zeros((120, 50, 3), dtype=np.uint8)
    tall[:, :, 0] = np.linspace(0, 255, 120, dtype=np.uint8)[:, None]
    tall[:, :, 2] = np.linspace(255, 0, 50, dtype=np.uint8)[None, :]
    return {"square": square, "wide": wide, "tall": tall}


class Reference:
    """transformers' model and processor for a fixture, fed the token ids pyvtrim makes."""

    def __init__(self, hf_dir: str) -> None:
        from transformers import AutoImageProcessor, LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.processor = AutoImageProcessor.from_pretrained(hf_dir)
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.n_image_tokens = side * side + (1 if cfg.vision_feature_select_strategy == "full" else 0)

    def inputs(self, ids: list[int], images: list[np.ndarray]) -> dict:
        expanded: list[int] = []
        for t in ids:
            expanded.extend([t] * self.n_image_tokens if t == IMAGE_TOKEN_ID else [t])
        out = {"input_ids": torch.tensor([expanded])}
        if images:
            pv = self.processor(images=[np.asarray(im) for im in images], return_tensors="pt")["pixel_values"]
            out["pixel_values"] = pv.to(torch.float32)
        return out

    @torch.no_grad()
    def last_logits(self, ids: list[int], images: list[np.ndarray]) -> np.ndarray:
        return self.model(**self.inputs(ids, images)).logits[0, -1].numpy()

    @torch.no_grad()
    def greedy(self, ids: list[int], images: list[np.ndarray], n: int) -> list[int]:
        inp = self.inputs(ids, images)
        out = self.model.generate(**inp, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, inp["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module", params=["llava_tiny", "llava_tiny_gqa"])
def pair(request):
    fx = request.getfixturevalue(request.param)
    ref = Reference(str(fx.hf_dir))
    with pyvtrim.Model(str(fx.gguf), n_ctx=2048, kv_type="f32", n_threads=2) as m:
        yield request.param, fx, ref, m


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("image", ["square", "wide", "tall"])
def test_prefill_logits_f32(pair, prompt, image, record_property):
    name, _, ref, m = pair
    img = _images()[image]
    ids = m.tokenize(prompt)
    assert ids.count(m.image_token_id) == 1
    want = ref.last_logits(ids, [img])
    got = m.forward(ids, [img])
    diff = float(np.max(np.abs(got - want)))
    record_property("max_abs_diff", diff)
    print(f"{name} {image} f32: max|diff| {diff:.2e}, logit std {want.std():.3f}")
    assert want.std() > 0.3, "fixture logits too flat to compare"
    assert diff <= 1e-3
    assert m.last_stats["n_image_tokens"] == ref.n_image_tokens


def test_text_only_and_two_images(pair):
    _, _, ref, m = pair
    ids = m.tokenize("USER: Tell me a story about a llama. ASSISTANT:")
    assert np.max(np.abs(m.forward(ids) - ref.last_logits(ids, []))) <= 1e-3
    imgs = [_images()["square"], _images()["tall"]]
    ids = m.tokenize("USER: <image>\n<image>\nWhat changed between the pictures? ASSISTANT:")
    assert np.max(np.abs(m.forward(ids, imgs) - ref.last_logits(ids, imgs))) <= 1e-3
    assert m.last_stats["n_image_tokens"] == 2 * ref.n_image_tokens


def test_greedy_16_tokens(pair):
    _, _, ref, m = pair
    img = _images()["wide"]
    ids = m.tokenize(PROMPTS[0])
    want = ref.greedy(ids, [img], 16)
    got = m.generate(ids, [img], max_tokens=16, temperature=0.0)
    # pyvtrim stops at an end-of-generation token; compare up to it.
    assert got == want[: len(got)]
    assert len(got) == 16 or m.detokenize([want[len(got)]]) == "" or want[len(got)] == m.info["eos_token_id"]
    assert m.last_stats["n_decoded"] == len(got) - 1 or m.last_stats["n_decoded"] == len(got)


def test_decode_steps_match_reference_logits(pair):
    """Logits after each of several decode steps, not only after the prefill."""
    _, _, ref, m = pair
    img = _images()["square"]
    ids = m.tokenize(PROMPTS[1])
    logits = m.forward(ids, [img])
    seq = list(ids)
    for step in range(4):
        nxt = int(np.argmax(logits))
        seq.append(nxt)
        logits = m.decode(nxt)
        diff = np.max(np.abs(logits - ref.last_logits(seq, [img])))
        assert diff <= 1e-3, f"decode step {step}: {diff}"


def test_f16_gguf_close(llava_tiny):
    ref = Reference(str(llava_tiny.hf_dir))
    img = _images()["tall"]
    with pyvtrim.Model(str(llava_tiny.gguf_f16), n_ctx=1024, kv_type="f16", n_threads=2) as m:
        ids = m.tokenize(PROMPTS[0])
        want = ref.last_logits(ids, [img])
        got = m.forward(ids, [img])
    diff = float(np.max(np.abs(got - want)))
    print(f"f16: max|diff| {diff:.2e}, logit std {want.std():.3f}")
    assert diff <= 5e-2 * want.std()
    assert int(np.argmax(got)) == int(np.argmax(want))


@pytest.mark.parametrize("image", ["square", "tall"])
def test_chunked_vision_attention_is_the_reference_too(llava_tiny, image):
    """vision_attn="chunked" (explicit scores by chunks of query rows; what "auto" takes on the CPU for
    towers of >= 1024 positions): the same logits as transformers within the f32 tolerance, and as flash."""
    ref = Reference(str(llava_tiny.hf_dir))
    img = _images()[image]
    got = {}
    for mode in ("chunked", "flash"):
        with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=512, kv_type="f32", n_threads=2, vision_attn=mode,
                           image_cache_mib=0) as m:
            ids = m.tokenize(PROMPTS[0])
            got[mode] = m.forward(ids, [img])
    want = ref.last_logits(ids, [img])
    assert float(np.max(np.abs(got["chunked"] - want))) <= 1e-3
    assert float(np.max(np.abs(got["chunked"] - got["flash"]))) <= 1e-4


def test_vision_attn_is_checked(llava_tiny):
    with pytest.raises(pyvtrim.VtrimValueError, match="vision_attn"):
        pyvtrim.Model(str(llava_tiny.gguf), vision_attn="fast")
