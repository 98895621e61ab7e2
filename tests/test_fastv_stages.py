"""Many FastV stages in one prefill, then decoding: every layer range after a stage holds its own row set, so
a decode step's graph has as many distinct cached row sets as there are stages plus one.

Regression: the decoder once kept at most 8 masks a graph; a 9th distinct cache length reused slot 7 and left
the earlier layers' mask unfilled. Here 10 stages make 11 row sets. The reference runs the same stages in
PyTorch (fastv_reference's pieces, stage after stage) and the decode step with the kept sets fixed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import pyvtrim  # noqa: E402

from fastv_reference import FastVReference  # noqa: E402
from fixtures import IMAGE_TOKEN_ID  # noqa: E402

PROMPT = "USER: <image>\nWhat is unusual about this picture? Answer briefly. ASSISTANT:"
STAGES = list(range(1, 11))   # FastV at k = 1..10
RATIO = 0.1


@pytest.fixture(scope="module")
def setup(tiny_llava_factory):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    fx = tiny_llava_factory(n_layers=12, n_kv_heads=2, image_size=48, patch_size=6, seed=7)
    hf = LlavaForConditionalGeneration.from_pretrained(str(fx.hf_dir), dtype=torch.float32).eval()
    proc = AutoImageProcessor.from_pretrained(str(fx.hf_dir))
    with pyvtrim.Model(str(fx.gguf), n_ctx=512, kv_type="f32", n_threads=2) as m:
        yield m, FastVReference(hf, IMAGE_TOKEN_ID), proc


@torch.no_grad()
def _reference(ref: FastVReference, ids: torch.Tensor, pv, decoded: list[int]):
    """Kept rows after each stage (ranked by the last prompt row), then the last row's logits of
    prompt + decoded with those row sets."""
    n_prompt = ids.shape[1]
    is_image = (ids[0] == IMAGE_TOKEN_ID).tolist()
    h = ref.embed(ids, pv)
    pos = torch.arange(n_prompt)
    rows = list(range(n_prompt))
    kept_sets, lo = [], 0
    for k in STAGES:
        idx = torch.tensor(rows)
        x = ref._layers(h[:, idx] if lo == 0 else h, pos[idx], lo, k - 1)
        probs = ref._attention_probs(x, pos[idx], k - 1).mean(dim=0)[-1]
        h = ref._layers(x, pos[idx], k - 1, k)
        image = [j for j, r in enumerate(rows) if is_image[r]]
        n_keep = int(math.floor((1.0 - RATIO) * len(image) + 1e-6))
        top = set(sorted(image, key=lambda j: (-float(probs[j]), j))[:n_keep])
        keep = [j for j, r in enumerate(rows) if not is_image[r] or j in top]
        h = h[:, torch.tensor(keep)]
        rows = [rows[j] for j in keep]
        kept_sets.append(list(rows))
        lo = k
    # decode: every layer range [k_i, k_i+1) attends to its own kept prompt rows plus the new rows
    seq = torch.cat([ids, torch.tensor([decoded])], dim=1)
    n = seq.shape[1]
    pos = torch.arange(n)
    hs = ref.embed(seq, pv)
    bounds = [0] + STAGES + [len(ref.lm.layers)]
    sets = [list(range(n_prompt))] + kept_sets
    x = hs
    for i in range(len(bounds) - 1):
        r = torch.tensor(sets[i] + list(range(n_prompt, n)))
        if i == 0:
            x = hs[:, r]
        else:
            keep = [j for j, row in enumerate(prev) if row in set(r.tolist())]
            x = x[:, torch.tensor(keep)]
        x = ref._layers(x, pos[r], bounds[i], bounds[i + 1])
        prev = r.tolist()
    return rows, ref.model.lm_head(ref.lm.norm(x)[0, -1])


def test_eleven_row_sets_decode_like_the_reference(setup):
    m, ref, proc = setup
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    ids = m.tokenize(PROMPT)
    n_img = m.info["n_image_tokens"]
    expanded = [x for t in ids for x in ([t] * n_img if t == IMAGE_TOKEN_ID else [t])]
    pv = proc(images=[image], return_tensors="pt")["pixel_values"].to(torch.float32)

    policies = [pyvtrim.FastV(k=k, ratio=RATIO) for k in STAGES]
    m.forward(ids, [image], reduce=policies)
    stages = m.last_stats["stages"]
    assert len(stages) == len(STAGES)
    assert len({s["n_kept"] for s in stages}) == len(STAGES)   # every stage dropped rows: 11 row sets
    token = 5
    got = m.decode(token)

    rows, want = _reference(ref, torch.tensor([expanded]), pv, [token])
    kept_images = [r for r in rows if expanded[r] == IMAGE_TOKEN_ID]
    assert set(m.last_kept_image_rows()) == set(kept_images)
    diff = float(np.max(np.abs(got - want.numpy())))
    assert diff <= 1e-3, diff
