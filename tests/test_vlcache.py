"""VL-Cache in the runtime against the PyTorch reference in vlcache_reference.py (on transformers' LLaVA).

Tolerance: f32 GGUF, f32 KV cache: logits within 1e-3 absolute (logit std ~1, see fixtures.py), as for the
unreduced parity tests, for the prefill and 8 teacher-forced decode steps after the compaction. Kept
positions per (layer, KV head) are compared as sets; they are chosen from attention probabilities whose
float order differs between ggml and torch, so the test first checks that no score tie closer than 1e-6
decides a choice (then a flip would be a real disagreement, not rounding).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import pyvtrim  # noqa: E402

from fixtures import IMAGE_TOKEN_ID  # noqa: E402
from vlcache_reference import VLCacheReference  # noqa: E402

ONE_IMAGE = "USER: <image>\nWhat is unusual about this picture? Answer briefly. ASSISTANT:"
TWO_IMAGES = "USER: <image>\nand <image>\nWhich of the two is brighter? ASSISTANT:"
DECODE = [17, 250, 3, 99, 421, 8, 64, 130]          # teacher-forced tokens
N_LAYER = 4


def _image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup(tiny_llava_factory):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    fx = tiny_llava_factory(n_layers=N_LAYER, n_kv_heads=2, image_size=48, patch_size=6, seed=5)
    hf = LlavaForConditionalGeneration.from_pretrained(str(fx.hf_dir), dtype=torch.float32).eval()
    proc = AutoImageProcessor.from_pretrained(str(fx.hf_dir))
    ref = VLCacheReference(hf, IMAGE_TOKEN_ID)
    with pyvtrim.Model(str(fx.gguf), n_ctx=1024, kv_type="f32", n_threads=2) as m:
        yield m, proc, ref


def _inputs(m, proc, prompt: str, images: list[np.ndarray], add_special: bool = True):
    ids = m.tokenize(prompt, add_special=add_special)
    n_img = m.info["n_image_tokens"]
    expanded: list[int] = []
    for t in ids:
        expanded.extend([t] * n_img if t == IMAGE_TOKEN_ID else [t])
    pv = proc(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
    return ids, torch.tensor([expanded]), pv


def _runtime_positions(m) -> list:
    info = m.info
    return [[m.kv_positions(il, g) for g in range(info["n_head_kv"])] for il in range(info["n_layer"])]


def _check_run(m, proc, ref, prompt, images, budget, fastv=None):
    ids, hf_ids, pv = _inputs(m, proc, prompt, images)
    policies = ([pyvtrim.FastV(k=fastv[0], ratio=fastv[1])] if fastv else []) + [pyvtrim.VLCache(budget=budget)]
    base = m.forward(ids, images, reduce=policies[:-1] or None)
    got = m.forward(ids, images, reduce=policies)
    assert np.array_equal(got, base)                      # the prefill's logits never change
    st, want = ref.prefill(hf_ids, pv, budget, fastv=fastv)
    assert ref.last_margin > 1e-6                         # no near-tie decides a kept set (see the top)
    assert float(np.max(np.abs(got - want.numpy()))) <= 1e-3
    want_pos = ref.positions(st)
    got_pos = _runtime_positions(m)
    for il in range(len(want_pos)):
        counts = {len(p) for p in got_pos[il]}
        assert len(counts) == 1                           # every KV head of a layer holds as many rows
        for g in range(len(want_pos[il])):
            assert set(got_pos[il][g]) == set(want_pos[il][g]), (il, g)
    for t in DECODE:
        d_got = m.decode(t)
        d_want = ref.step(st, [t])
        assert float(np.max(np.abs(d_got - d_want.numpy()))) <= 1e-3
    return st, got_pos


def test_reference_without_compaction_is_transformers(setup):
    m, proc, ref = setup
    _, hf_ids, pv = _inputs(m, proc, ONE_IMAGE, [_image(1, 40, 60)])
    with torch.no_grad():
        want = ref.model(input_ids=hf_ids, pixel_values=pv).logits[0, -1]
    _, got = ref.prefill(hf_ids, pv, None)
    assert float((got - want).abs().max()) <= 1e-4


@pytest.mark.parametrize("budget", [0.1, 0.3, 1.0])
def test_vlcache_decode_and_kept_positions(setup, budget):
    m, proc, ref = setup
    _, got_pos = _check_run(m, proc, ref, ONE_IMAGE, [_image(10, 40, 60)], budget)
    n = m.last_stats["n_past"] - len(DECODE)
    kept = [len(got_pos[il][0]) for il in range(N_LAYER)]
    assert all(1 <= k <= n for k in kept)
    if budget <= 0.3:
        assert sum(kept) < 0.5 * N_LAYER * n            # the cache really shrank
    # the most recent positions are kept by every head
    for il in range(N_LAYER):
        for pos in got_pos[il]:
            assert n - 1 in pos


def test_two_images(setup):
    m, proc, ref = setup
    _check_run(m, proc, ref, TWO_IMAGES, [_image(11, 40, 60), _image(12, 52, 36)], 0.2)


def test_composed_after_fastv(setup):
    m, proc, ref = setup
    _, got_pos = _check_run(m, proc, ref, ONE_IMAGE, [_image(13, 44, 44)], 0.3, fastv=(2, 0.5))
    stages = m.last_stats["stages"]
    assert [s["method"] for s in stages] == ["fastv", "vlcache"]
    assert stages[1]["hook"] == "after_prefill"


def test_large_budget_is_unreduced(setup):
    m, proc, _ = setup
    images = [_image(14, 40, 40)]
    ids = m.tokenize(ONE_IMAGE)
    base = [m.forward(ids, images)] + [m.decode(t) for t in DECODE]
    base_bytes = m.last_stats["kv_cache_bytes"]
    got = [m.forward(ids, images, reduce=pyvtrim.VLCache(budget=N_LAYER))] + [m.decode(t) for t in DECODE]
    for a, b in zip(base, got):
        assert np.array_equal(a, b)
    assert m.last_stats["kv_cache_bytes"] == base_bytes


def test_kv_bytes_match_arithmetic(setup):
    m, proc, _ = setup
    info = m.info
    ids = m.tokenize(ONE_IMAGE)
    m.forward(ids, [_image(15, 40, 40)], reduce=pyvtrim.VLCache(budget=0.1))
    st = m.last_stats
    n = len(ids) - 1 + info["n_image_tokens"]
    row_bytes = 2 * info["n_head_kv"] * (info["n_embd"] // info["n_head"]) * 4   # K and V, f32 cache
    kept = [len(m.kv_positions(il, 0)) for il in range(info["n_layer"])]
    assert st["kv_cache_bytes"] == sum(kept) * row_bytes
    stage = st["stages"][0]
    assert stage["method"] == "vlcache" and stage["hook"] == "after_prefill"
    assert stage["n_in"] == n
    assert stage["n_kept"] == math.floor(sum(kept) / len(kept) + 0.5)
    assert stage["kv_bytes_full"] == info["n_layer"] * n * row_bytes
    assert stage["kv_bytes_kept"] == sum(kept) * row_bytes
    assert stage["kv_bytes_kept"] <= 0.2 * stage["kv_bytes_full"]


def test_second_turn_after_compaction(setup):
    m, proc, ref = setup
    images = [_image(16, 40, 60)]
    ids, hf_ids, pv = _inputs(m, proc, ONE_IMAGE, images)
    m.forward(ids, images, reduce=pyvtrim.VLCache(budget=0.2))
    st, _ = ref.prefill(hf_ids, pv, 0.2)
    for t in DECODE[:3]:
        m.decode(t)
        ref.step(st, [t])
    turn2 = m.tokenize(" USER: And the colours? ASSISTANT:", add_special=False)
    got = m.prefill(turn2, reduce=pyvtrim.VLCache(budget=0.2))
    stage = m.last_stats["stages"][0]
    assert stage["n_kept"] == stage["n_in"] and stage["kv_bytes_kept"] == stage["kv_bytes_full"]   # no image
    want = ref.step(st, turn2)
    assert float(np.max(np.abs(got - want.numpy()))) <= 1e-3
    for t in DECODE[3:]:
        assert float(np.max(np.abs(m.decode(t) - ref.step(st, [t]).numpy()))) <= 1e-3
    got_pos = _runtime_positions(m)
    for il, per_head in enumerate(ref.positions(st)):
        for g, pos in enumerate(per_head):
            assert got_pos[il][g] == pos


def test_second_turn_with_an_image_compacts_again(setup):
    """The second turn's rows come after every head's rows; VL-Cache then scores the whole cache, whose heads
    already hold different positions, and compacts each head again."""
    m, proc, ref = setup
    img1, img2 = _image(17, 40, 60), _image(18, 52, 44)
    ids, hf_ids, pv = _inputs(m, proc, ONE_IMAGE, [img1])
    m.forward(ids, [img1], reduce=pyvtrim.VLCache(budget=0.3))
    st, _ = ref.prefill(hf_ids, pv, 0.3)
    for t in DECODE[:2]:
        m.decode(t)
        ref.step(st, [t])
    turn2, hf_turn2, pv2 = _inputs(m, proc, " USER: <image>\nAnd this one? ASSISTANT:", [img2], add_special=False)
    got = m.prefill(turn2, [img2], reduce=pyvtrim.VLCache(budget=0.3))
    want = ref.turn(st, hf_turn2, pv2, 0.3)
    assert ref.last_margin > 1e-6
    assert float(np.max(np.abs(got - want.numpy()))) <= 1e-3
    got_pos = _runtime_positions(m)
    for il, per_head in enumerate(ref.positions(st)):
        for g, pos in enumerate(per_head):
            assert set(got_pos[il][g]) == set(pos), (il, g)
    for t in DECODE[2:]:
        assert float(np.max(np.abs(m.decode(t) - ref.step(st, [t]).numpy()))) <= 1e-3


def test_prompt_without_image_does_nothing(setup):
    m, _, _ = setup
    ids = m.tokenize("USER: Hello there. ASSISTANT:")
    base = m.forward(ids)
    base_bytes = m.last_stats["kv_cache_bytes"]
    got = m.forward(ids, reduce=pyvtrim.VLCache(budget=0.1))
    st = m.last_stats
    assert np.array_equal(base, got) and st["kv_cache_bytes"] == base_bytes
    stage = st["stages"][0]
    assert stage["method"] == "vlcache" and stage["n_in"] == len(ids) == stage["n_kept"]
    assert stage["kv_bytes_kept"] == stage["kv_bytes_full"] == base_bytes


@pytest.mark.parametrize("bad", [dict(budget=0.0), dict(budget=-1.0), dict(budget=N_LAYER + 0.5),
                                 dict(threshold=-0.1), dict(threshold=1.0), dict(recent=-0.1), dict(recent=1.5),
                                 dict(budget="0.1")])
def test_invalid_parameters(setup, bad):
    m, _, _ = setup
    ids = m.tokenize(ONE_IMAGE)
    with pytest.raises(ValueError):
        m.forward(ids, [_image(8, 30, 30)], reduce=pyvtrim.VLCache(**bad))


def test_c_validate_says_the_same(setup):
    """The C side refuses what the dataclass refuses, with its own message (here past the Python checks)."""
    m, _, _ = setup
    ffi, lib = m._ffi, m._lib
    for budget, threshold, recent in [(0.0, 0.01, 0.1), (N_LAYER + 1.0, 0.01, 0.1), (0.1, 1.0, 0.1),
                                      (0.1, 0.01, 1.5)]:
        p = ffi.new("struct vtrim_vlcache_params *")
        lib.vtrim_vlcache_default(p)
        p.budget, p.threshold, p.recent = budget, threshold, recent
        assert lib.vtrim_reduce_add_vlcache(m._ctx(), p) == lib.VTRIM_ERR_INVALID_ARG
        assert "VL-Cache" in ffi.string(lib.vtrim_last_error()).decode()
    lib.vtrim_reduce_clear(m._ctx())


def test_one_per_context(setup):
    m, _, _ = setup
    with pytest.raises(ValueError):
        m.forward(m.tokenize(ONE_IMAGE), [_image(9, 30, 30)],
                  reduce=[pyvtrim.VLCache(budget=0.1), pyvtrim.VLCache(budget=0.2)])


def test_mllama_refuses_with_the_reason(mllama_tiny):
    """Llama-3.2-Vision's images are cross-attended states, not decoder rows: VL-Cache says so."""
    with pyvtrim.Model(str(mllama_tiny.gguf), n_ctx=256, kv_type="f32", n_threads=2) as m:
        ids = m.tokenize(m.chat_prompt("What is this?"))
        with pytest.raises(ValueError, match="cross-attention"):
            m.forward(ids, [_image(2, 40, 40)], reduce=pyvtrim.VLCache())


def test_long_second_turn_in_chunks(tiny_llava_factory, setup):
    """A turn after the compaction longer than n_batch runs in chunks; the chunks before the last want no
    output of the last layer, only its K and V, so that layer's mask (its own, since the heads' rows differ
    per layer) is read by no node. Found by fuzz_prefill."""
    _, proc, ref = setup
    fx = tiny_llava_factory(n_layers=N_LAYER, n_kv_heads=2, image_size=48, patch_size=6, seed=5)
    images = [_image(19, 40, 60)]
    with pyvtrim.Model(str(fx.gguf), n_ctx=1024, n_batch=16, kv_type="f32", n_threads=2) as m:
        ids, hf_ids, pv = _inputs(m, proc, ONE_IMAGE, images)
        m.forward(ids, images, reduce=pyvtrim.VLCache(budget=0.2))
        st, _ = ref.prefill(hf_ids, pv, 0.2)
        turn2 = m.tokenize(" USER: Now describe the colours, the shapes and where each of them sits in the"
                           " picture, one by one, from left to right. ASSISTANT:", add_special=False)
        assert len(turn2) > 2 * 16
        got = m.prefill(turn2)
        want = ref.step(st, turn2)
        assert float(np.max(np.abs(got - want.numpy()))) <= 1e-3
