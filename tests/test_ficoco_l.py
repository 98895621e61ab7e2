"""FiCoCo-L in the runtime against the PyTorch reference in ficoco_l_reference.py (on transformers' LLaVA).

Tolerance: f32 GGUF, f32 KV cache: last logits within 1e-3 absolute (logit std ~1, see fixtures.py), as for
FastV and the unreduced parity tests; kept image rows compared as sets. The redundancy scores that pick the
dropped rows are means of f32 logits of order 1, which the runtime and the reference sum in different orders;
each case first checks that no step's cut has a tie closer than 1e-6 (the closest seen here, 2.5e-6, agreed).
The fixture: 4 decoder layers (4 heads, 2 KV heads), a 48 px image in 6 px patches: N = 64 image rows.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import pyvtrim  # noqa: E402

from ficoco_l_reference import FiCoCoLReference  # noqa: E402
from fixtures import IMAGE_TOKEN_ID  # noqa: E402

ONE_IMAGE = "USER: <image>\nWhat is unusual about this picture? Answer briefly. ASSISTANT:"
TWO_IMAGES = "USER: <image>\nand <image>\nWhich of the two is brighter? ASSISTANT:"
N = 64
TOKENS = [round(N / 2), round(N / 4), round(N / 9)]   # 32, 16, 7
MIN_GAP = 1e-6


def _image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup(tiny_llava_factory):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    fx = tiny_llava_factory(n_layers=4, n_kv_heads=2, image_size=48, patch_size=6, seed=5)
    hf = LlavaForConditionalGeneration.from_pretrained(str(fx.hf_dir), dtype=torch.float32).eval()
    proc = AutoImageProcessor.from_pretrained(str(fx.hf_dir))
    with pyvtrim.Model(str(fx.gguf), n_ctx=1024, kv_type="f32", n_threads=2) as m:
        assert m.info["n_image_tokens"] == N
        yield m, hf, proc, FiCoCoLReference(hf, IMAGE_TOKEN_ID, N)


def _expand(ids: list[int]) -> list[int]:
    out: list[int] = []
    for t in ids:
        out.extend([t] * N if t == IMAGE_TOKEN_ID else [t])
    return out


def _pixels(proc, images):
    return proc(images=images, return_tensors="pt")["pixel_values"].to(torch.float32) if images else None


def _hf_inputs(m, proc, prompt: str, images: list[np.ndarray]):
    ids = m.tokenize(prompt)
    return ids, torch.tensor([_expand(ids)]), _pixels(proc, images)


def _check_gaps(decisions) -> None:
    gaps = [s.min_gap for s in decisions.steps if s.dropped]
    assert not gaps or min(gaps) > MIN_GAP, f"a near tie ({min(gaps):.2e}) would decide the kept set"


def test_reference_at_n_tokens_is_transformers(setup):
    m, hf, proc, ref = setup
    _, ids, pv = _hf_inputs(m, proc, ONE_IMAGE, [_image(1, 40, 60)])
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pv).logits[0, -1]
    got = ref.run(ids, pv, tokens=N, start_layer=2)
    assert all(not s.dropped and not s.merges for s in got.decisions.steps)
    assert float((got.logits - want).abs().max()) <= 1e-4


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("start_layer", [1, 2])
@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_kept_set_and_stats(setup, tokens, start_layer, n_images):
    m, _, proc, ref = setup
    images = [_image(10 + i, 40 + 9 * i, 60 - 7 * i) for i in range(n_images)]
    ids, hf_ids, pv = _hf_inputs(m, proc, ONE_IMAGE if n_images == 1 else TWO_IMAGES, images)
    want = ref.run(hf_ids, pv, tokens=tokens, start_layer=start_layer)
    _check_gaps(want.decisions)
    assert len(want.kept_image_rows) == tokens * n_images

    got = m.forward(ids, images, reduce=pyvtrim.FiCoCoL(tokens=tokens, start_layer=start_layer))
    st = m.last_stats
    assert st["n_image_tokens"] == N * n_images
    assert st["n_image_tokens_kept"] == tokens * n_images
    assert set(m.last_kept_image_rows()) == set(want.kept_image_rows)
    diff = float(np.max(np.abs(got - want.logits.numpy())))
    assert diff <= 1e-3, diff
    [stage] = st["stages"]
    assert (stage["method"], stage["hook"], stage["layer"]) == ("ficoco_l", "decoder_layer", start_layer)
    assert (stage["n_in"], stage["n_kept"]) == (N * n_images, tokens * n_images)


def test_greedy_16(setup):
    m, _, proc, ref = setup
    images = [_image(3, 50, 50)]
    ids, hf_ids, pv = _hf_inputs(m, proc, ONE_IMAGE, images)
    policy = dict(tokens=16, start_layer=2)
    made = ref.run(hf_ids, pv, **policy).decisions
    _check_gaps(made)
    want = ref.greedy(hf_ids, pv, [made], 16, **policy)
    got = m.generate(ids, images, max_tokens=16, reduce=pyvtrim.FiCoCoL(**policy))
    assert got == want[: len(got)] and len(got) >= 8


def test_n_tokens_is_bit_identical_to_unreduced(setup):
    m, _, _, _ = setup
    images = [_image(5, 40, 40), _image(6, 30, 50)]
    ids = m.tokenize(TWO_IMAGES)
    base = m.forward(ids, images)
    for start_layer in (1, 3):
        same = m.forward(ids, images, reduce=pyvtrim.FiCoCoL(tokens=N, start_layer=start_layer))
        assert np.array_equal(base, same)
        [stage] = m.last_stats["stages"]
        assert stage["n_kept"] == stage["n_in"] == 2 * N and stage["flops_saved"] == 0
        assert stage["kv_bytes_kept"] == stage["kv_bytes_full"]


def test_kv_bytes_and_flops(setup):
    m, _, _, _ = setup
    info = m.info
    ids = m.tokenize(ONE_IMAGE)
    m.forward(ids, [_image(6, 40, 40)], reduce=pyvtrim.FiCoCoL(tokens=16, start_layer=2))
    st = m.last_stats
    n_full = len(ids) - 1 + N
    # R = 48 over the steps at layers 2 and 3: 24 each; layer 2 holds n_full - 24 rows, layer 3 n_full - 48
    row_bytes = 2 * info["n_head_kv"] * (info["n_embd"] // info["n_head"]) * 4   # K and V, f32 cache
    assert st["kv_cache_bytes"] == (2 * n_full + (n_full - 24) + (n_full - 48)) * row_bytes
    [stage] = st["stages"]
    assert stage["kv_bytes_full"] == 2 * n_full * row_bytes
    assert stage["kv_bytes_kept"] == (2 * n_full - 72) * row_bytes
    assert stage["flops_saved"] > 0
    assert st["prefill_flops"] == pytest.approx(st["prefill_flops_full"] - stage["flops_saved"], rel=1e-9)


def test_multi_turn_after_a_reduced_first_turn(setup):
    """Turn 1 (an image, reduced), 3 decoded tokens, turn 2 with a new image (reduced on its own rows; the
    first turn's rows are in the cache, not candidates), then turn 3 without one: each prefill's logits and
    the kept rows against the reference, with the earlier turns' decisions replayed."""
    m, _, proc, ref = setup
    policy = dict(tokens=16, start_layer=2)
    reduce = pyvtrim.FiCoCoL(**policy)
    img1, img2 = _image(20, 40, 40), _image(21, 36, 44)
    t1 = m.tokenize(ONE_IMAGE)
    t2 = m.tokenize(" USER: <image>\nAnd this one? ASSISTANT:", add_special=False)
    t3 = m.tokenize(" USER: Why? ASSISTANT:", add_special=False)

    logits = m.forward(t1, [img1], reduce=reduce)
    seq = _expand(t1)
    made1 = ref.run(torch.tensor([seq]), _pixels(proc, [img1]), **policy).decisions
    _check_gaps(made1)
    for _ in range(3):
        tok = int(np.argmax(logits))
        seq.append(tok)
        logits = m.decode(tok)

    got2 = m.prefill(t2, [img2], reduce=reduce)
    lo = len(seq)
    seq += _expand(t2)
    pv = _pixels(proc, [img1, img2])
    want2, made2, alive = ref.forward(torch.tensor([seq]), pv, [made1], range(lo, len(seq)), **policy)
    _check_gaps(made2)
    kept2 = [r - lo for r in alive if r >= lo and seq[r] == IMAGE_TOKEN_ID]
    assert len(kept2) == 16 and set(m.last_kept_image_rows()) == set(kept2)
    assert float(np.max(np.abs(got2 - want2.numpy()))) <= 1e-3
    assert m.last_stats["n_past"] == len(seq)       # positions count the full sequence

    got3 = m.prefill(t3, reduce=reduce)
    seq += t3
    want3, _, _ = ref.forward(torch.tensor([seq]), pv, [made1, made2], None, **policy)
    assert float(np.max(np.abs(got3 - want3.numpy()))) <= 1e-3
    assert m.last_stats["stages"] == []             # no image, nothing to reduce


def test_with_fastv_before_it(setup):
    """FastV at layer 1 (half the image rows), FiCoCo-L from layer 2 on the rest: FastV's kept rows are
    FiCoCo-L's candidates (FastV alone keeps them), FiCoCo-L brings each image down to `tokens`."""
    m, _, proc, ref = setup
    images = [_image(30, 40, 40)]
    ids = m.tokenize(ONE_IMAGE)
    m.forward(ids, images, reduce=pyvtrim.FastV(k=1, ratio=0.5))
    fastv_kept = set(m.last_kept_image_rows())
    m.forward(ids, images, reduce=[pyvtrim.FastV(k=1, ratio=0.5), pyvtrim.FiCoCoL(tokens=8, start_layer=2)])
    st = m.last_stats
    fastv, ficoco = st["stages"]
    assert (fastv["method"], fastv["n_in"], fastv["n_kept"]) == ("fastv", N, N // 2)
    assert (ficoco["method"], ficoco["n_in"], ficoco["n_kept"]) == ("ficoco_l", N // 2, 8)
    assert st["n_image_tokens_kept"] == 8 and set(m.last_kept_image_rows()) <= fastv_kept
    with pytest.raises(ValueError, match="increasing layer order"):
        m.forward(ids, images, reduce=[pyvtrim.FastV(k=2), pyvtrim.FiCoCoL(tokens=8, start_layer=2)])
    with pytest.raises(ValueError, match="increasing layer order"):
        m.forward(ids, images, reduce=[pyvtrim.FiCoCoL(tokens=8, start_layer=2), pyvtrim.FastV(k=1)])


@pytest.mark.parametrize("bad", [dict(tokens=0), dict(tokens=N + 1), dict(start_layer=0), dict(start_layer=4),
                                 dict(beta=-0.1), dict(beta=1.5), dict(eps=-0.5), dict(eps=2.0),
                                 dict(tokens=16.0), dict(start_layer=True)])
def test_invalid_parameters(setup, bad):
    m, _, _, _ = setup
    ids = m.tokenize(ONE_IMAGE)
    with pytest.raises(ValueError):
        m.forward(ids, [_image(8, 30, 30)], reduce=pyvtrim.FiCoCoL(**dict(dict(start_layer=2), **bad)))
    assert m.forward(ids, [_image(8, 30, 30)]).shape == (m.n_vocab,)    # nothing was left installed


def test_refused_on_llama_3_2_vision(mllama_tiny):
    with pyvtrim.Model(str(mllama_tiny.gguf_path()), n_ctx=512, n_threads=2) as m:
        ids = m.tokenize(m.chat_prompt("What is this?", 1))
        t = int(m.info["image_size"])
        with pytest.raises(ValueError, match="cross-attended, not decoder rows"):
            m.forward(ids, [_image(9, t, t)], reduce=pyvtrim.FiCoCoL(tokens=4, start_layer=1))
