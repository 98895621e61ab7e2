"""FiCoCo-V in the runtime against the PyTorch reference in ficoco_reference.py (on transformers' LLaVA).

The fixture's tower is 7 x 7 patches (42 px, 6 px patches): an odd grid, so the local penalty's narrow edge
windows are exercised end to end (and in the C unit test). Tolerance: f32 GGUF, f32 KV cache: last logits
within 1e-3 absolute (logit std ~1, see fixtures.py), as for FastV; kept patches compared as sets, exactly.
Scores and merge targets are ranked by pre-softmax logits; a near-tie closer than the float error of the two
implementations (~1e-6 here) could flip a choice on another seed: these seeds have none (the sets agree).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import pyvtrim  # noqa: E402

from ficoco_reference import FiCoCoVReference  # noqa: E402
from fixtures import IMAGE_TOKEN_ID  # noqa: E402

ONE_IMAGE = "USER: <image>\nWhat is unusual about this picture? Answer briefly. ASSISTANT:"
TWO_IMAGES = "USER: <image>\nand <image>\nWhich of the two is brighter? ASSISTANT:"
N = 49                       # 7 x 7 patches
TOKENS = [round(N / 2), round(N / 4), round(N / 9)]     # 24, 12, 5


def _image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup(tiny_llava_factory):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    # 5 vision layers, feature layer -2: layers 0..3 run, f = 3.
    fx = tiny_llava_factory(n_layers=4, n_kv_heads=2, image_size=42, patch_size=6, vision_layers=5, seed=7)
    hf = LlavaForConditionalGeneration.from_pretrained(str(fx.hf_dir), dtype=torch.float32).eval()
    proc = AutoImageProcessor.from_pretrained(str(fx.hf_dir))
    with pyvtrim.Model(str(fx.gguf), n_ctx=1024, kv_type="f32", n_threads=2) as m:
        assert m.info["n_image_tokens"] == N
        yield m, hf, proc


def _inputs(m, proc, prompt: str, images: list[np.ndarray], per_image: int):
    ids = m.tokenize(prompt)
    expanded: list[int] = []
    starts: list[int] = []
    for t in ids:
        if t == IMAGE_TOKEN_ID:
            starts.append(len(expanded) + len(starts) * (N - per_image))
            expanded.extend([t] * per_image)
        else:
            expanded.append(t)
    pv = proc(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
    return ids, torch.tensor([expanded]), pv, starts


def _want_rows(ref_images, starts) -> set[int]:
    return {s + p for im, s in zip(ref_images, starts) for p in im.kept_patches}


def test_reference_at_all_tokens_is_transformers(setup):
    m, hf, proc = setup
    ref = FiCoCoVReference(hf, IMAGE_TOKEN_ID, tokens=N, start_layer=1)
    _, ids, pv, _ = _inputs(m, proc, ONE_IMAGE, [_image(1, 40, 60)], N)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pv).logits[0, -1]
    got = ref.forward_logits(ids, pv)
    assert float((got - want).abs().max()) <= 1e-4


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("start_layer", [1, 2])
@pytest.mark.parametrize("n_images", [1, 2])
def test_ficoco_v_logits_and_kept_patches(setup, tokens, start_layer, n_images):
    m, hf, proc = setup
    ref = FiCoCoVReference(hf, IMAGE_TOKEN_ID, tokens=tokens, start_layer=start_layer)
    images = [_image(10 + i, 40 + 9 * i, 60 - 7 * i) for i in range(n_images)]
    prompt = ONE_IMAGE if n_images == 1 else TWO_IMAGES
    ids, hf_ids, pv, starts = _inputs(m, proc, prompt, images, tokens)
    want = ref.forward_logits(hf_ids, pv)

    got = m.forward(ids, images, reduce=pyvtrim.FiCoCoV(tokens=tokens, start_layer=start_layer))
    st = m.last_stats
    assert st["n_image_tokens"] == n_images * N
    assert st["n_image_tokens_kept"] == n_images * tokens
    assert set(m.last_kept_image_rows()) == _want_rows(ref.images(pv), starts)
    diff = float(np.max(np.abs(got - want.numpy())))
    assert diff <= 1e-3, diff
    stage = st["stages"][0]
    assert len(st["stages"]) == 1
    assert (stage["method"], stage["hook"], stage["layer"]) == ("ficoco_v", "vision_encoder", start_layer)
    assert (stage["n_in"], stage["n_kept"]) == (n_images * N, n_images * tokens)


def test_ficoco_v_greedy_16(setup):
    m, hf, proc = setup
    ref = FiCoCoVReference(hf, IMAGE_TOKEN_ID, tokens=12, start_layer=1)
    images = [_image(3, 50, 50)]
    ids, hf_ids, pv, _ = _inputs(m, proc, ONE_IMAGE, images, 12)
    want = ref.greedy_alone(hf_ids, pv, n_new=16)
    got = m.generate(ids, images, max_tokens=16, reduce=pyvtrim.FiCoCoV(tokens=12, start_layer=1))
    assert got == want[: len(got)] and len(got) >= 8


@pytest.mark.parametrize("n_images", [1, 2])
def test_ficoco_v_with_fastv(setup, n_images):
    m, hf, proc = setup
    tokens, k, ratio = 24, 2, 0.5
    ref = FiCoCoVReference(hf, IMAGE_TOKEN_ID, tokens=tokens, start_layer=1)
    images = [_image(20 + i, 45, 45 + 10 * i) for i in range(n_images)]
    prompt = ONE_IMAGE if n_images == 1 else TWO_IMAGES
    ids, hf_ids, pv, starts = _inputs(m, proc, prompt, images, tokens)
    want = ref.run(hf_ids, pv, k=k, ratio=ratio)        # FastV on the reduced prompt's rows

    got = m.forward(ids, images, reduce=[pyvtrim.FiCoCoV(tokens=tokens, start_layer=1),
                                         pyvtrim.FastV(k=k, ratio=ratio)])
    st = m.last_stats
    assert st["n_image_tokens_kept"] == len(want.kept_image_rows)
    # want.kept_image_rows index the reduced prompt; map them back through the kept patches
    reduced_to_full = {}
    row = 0
    patches = [p for im in ref.images(pv) for p in im.kept_patches]
    image_no = 0
    for i, t in enumerate(hf_ids[0].tolist()):
        if t == IMAGE_TOKEN_ID:
            reduced_to_full[i] = starts[image_no] + patches[row]
            row += 1
            if row % tokens == 0:
                image_no += 1
    assert set(m.last_kept_image_rows()) == {reduced_to_full[r] for r in want.kept_image_rows}
    assert float(np.max(np.abs(got - want.logits.numpy()))) <= 1e-3
    assert [s["method"] for s in st["stages"]] == ["ficoco_v", "fastv"]


def test_all_tokens_is_bit_identical(setup):
    m, _, _ = setup
    images = [_image(5, 40, 40)]
    ids = m.tokenize(ONE_IMAGE)
    base = m.forward(ids, images)
    for start_layer in (0, 3):
        same = m.forward(ids, images, reduce=pyvtrim.FiCoCoV(tokens=N, start_layer=start_layer))
        assert np.array_equal(base, same)
    assert m.generate(ids, images, max_tokens=6) == m.generate(
        ids, images, max_tokens=6, reduce=pyvtrim.FiCoCoV(tokens=N, start_layer=1))


def test_stats_kv_bytes_and_flops(setup):
    m, _, _ = setup
    info = m.info
    images = [_image(6, 40, 40)]
    ids = m.tokenize(ONE_IMAGE)
    tokens = 12
    m.forward(ids, images)
    full = m.last_stats
    m.forward(ids, images, reduce=pyvtrim.FiCoCoV(tokens=tokens, start_layer=1))
    st = m.last_stats
    n_full = len(ids) - 1 + N
    n_kept_rows = n_full - N + tokens
    head_dim = info["n_embd"] // info["n_head"]
    row_bytes = 2 * info["n_head_kv"] * head_dim * 4          # K and V, f32 cache
    assert st["n_prompt_tokens"] == n_kept_rows
    assert st["kv_cache_bytes"] == info["n_layer"] * n_kept_rows * row_bytes
    assert full["kv_cache_bytes"] == info["n_layer"] * n_full * row_bytes
    stage = st["stages"][0]
    assert stage["kv_bytes_kept"] == info["n_layer"] * n_kept_rows * row_bytes
    assert stage["kv_bytes_full"] == info["n_layer"] * n_full * row_bytes
    decoder_saved = st["prefill_flops_full"] - st["prefill_flops"]
    assert decoder_saved > 0
    assert stage["flops_saved"] > decoder_saved * 1.0001       # the tower's own savings on top
    assert st["n_image_tokens_kept"] == tokens


def test_multi_turn_after_reduced_first_turn(setup):
    m, hf, proc = setup
    images = [_image(7, 40, 40)]
    tokens = 12
    chat = m.start_chat(max_tokens=6, reduce=pyvtrim.FiCoCoV(tokens=tokens, start_layer=1))
    chat.ask("What is this?", image=images[0])
    first = m.last_stats
    assert first["n_image_tokens_kept"] == tokens
    n_past = first["n_past"]
    chat.ask("And the colours?")
    assert m.last_stats["n_past"] > n_past
    # The second reply, greedy, is the reference's continuation of the whole conversation (the image reduced
    # once, in the first turn; the second turn's prefill continues after it).
    reply = list(chat._turns[-1].reply)
    conversation = list(chat._tokens)
    chat.close()
    assert len(reply) >= 3
    prompt = conversation[: len(conversation) - len(reply)]
    expanded = [t for tok in prompt for t in ([tok] * tokens if tok == IMAGE_TOKEN_ID else [tok])]
    pv = proc(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
    ref = FiCoCoVReference(hf, IMAGE_TOKEN_ID, tokens=tokens, start_layer=1)
    assert ref.greedy_alone(torch.tensor([expanded]), pv, n_new=len(reply)) == reply


@pytest.mark.parametrize("bad", [dict(tokens=0), dict(tokens=N + 1), dict(start_layer=-1), dict(start_layer=4),
                                 dict(lam=1.5), dict(eps=-0.1), dict(tokens=2.5)])
def test_invalid_parameters(setup, bad):
    m, _, _ = setup
    ids = m.tokenize(ONE_IMAGE)
    args = dict(tokens=12, start_layer=1)
    args.update(bad)
    with pytest.raises(ValueError):
        m.forward(ids, [_image(8, 30, 30)], reduce=pyvtrim.FiCoCoV(**args))


def test_not_on_mllama(mllama_tiny):
    with pyvtrim.Model(str(mllama_tiny.gguf), n_ctx=512, n_threads=2) as m:
        ids = m.tokenize("<|image|>What is this?")
        with pytest.raises(ValueError, match="Llama-3.2-Vision because"):
            m.forward(ids, [_image(9, 40, 40)], reduce=pyvtrim.FiCoCoV(tokens=4, start_layer=0))
