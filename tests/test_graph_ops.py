"""The ggml ops of the runtime's graphs (docs/DESIGN.md, rule 1: stock ops only, so every ggml backend runs them).

The graphs that prefill, decode and the reductions run on the tiny fixtures (LLaVA with f32 / f16 / q8_0
weights and both KV types, with and without FastV, FiCoCo-L and VL-Cache; Llama-3.2-Vision with and without Trimmed
Llama) report their ops through vtrim_graph_ops. Their union must equal core/graph_ops.txt, the list we keep: a new op is
a decision, made by adding it there. Every listed op must be one the pinned ggml's Metal and CUDA backends
declare (a `case` of their supports_op): nothing in our graphs is CPU-only. Being declared is necessary, not
sufficient (supports_op also checks types and shapes); the CUDA build is tested where a GPU is lent.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import pyvtrim

import fixtures

OPS_LIST = Path(__file__).resolve().parents[1] / "core" / "graph_ops.txt"
BACKENDS = {
    "Metal": ("ggml/src/ggml-metal/ggml-metal-device.m", "ggml_metal_device_supports_op"),
    "CUDA": ("ggml/src/ggml-cuda/ggml-cuda.cu", "ggml_backend_cuda_device_supports_op"),
}


def _listed() -> set[str]:
    lines = (ln.split("#", 1)[0].strip() for ln in OPS_LIST.read_text().splitlines())
    return {ln for ln in lines if ln}


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _run_llava(path: Path, kv_type: str) -> set[str]:
    with pyvtrim.Model(str(path), n_ctx=512, kv_type=kv_type, n_threads=2) as m:
        ids = m.tokenize(m.chat_prompt("What is in the picture?", 2))
        images = [_image(1, 40, 60), _image(2, 50, 30)]
        m.forward(ids, images)
        m.decode(int(np.argmax(m.logits())))
        m.forward(ids, images, reduce=pyvtrim.FastV(k=1, ratio=0.5))
        m.decode(int(np.argmax(m.logits())))
        m.forward(ids, images, reduce=pyvtrim.FiCoCoL(tokens=8, start_layer=1))
        m.forward(ids, images, reduce=[pyvtrim.FastV(k=1, ratio=0.5), pyvtrim.VLCache(budget=0.2)])
        m.decode(int(np.argmax(m.logits())))
        return set(m.graph_ops)


def _run_mllama(path: Path, kv_type: str) -> set[str]:
    with pyvtrim.Model(str(path), n_ctx=512, kv_type=kv_type, n_threads=2) as m:
        t = int(m.info["image_size"])
        ids = m.tokenize(m.chat_prompt("What is in the picture?", 1))
        image = [_image(3, 2 * t - 3, t - 5)]
        for reduce in (None, pyvtrim.TrimCrossAttn(k_ratio=0.25), pyvtrim.TrimCrossAttn(mode="budget", keep=0.5,
                                                                                      trim_first_layer=True)):
            m.forward(ids, image, reduce=reduce)
            m.decode(int(np.argmax(m.logits())))
        return set(m.graph_ops)


@pytest.fixture(scope="module")
def used_ops(llava_tiny_gqa, mllama_tiny) -> set[str]:
    ops: set[str] = set()
    for path in (llava_tiny_gqa.gguf, llava_tiny_gqa.gguf_f16, llava_tiny_gqa.gguf_q8):
        for kv_type in ("f32", "f16"):
            ops |= _run_llava(path, kv_type)
    for path in (mllama_tiny.gguf, mllama_tiny.gguf_f16):
        ops |= _run_mllama(path, "f16")
    return ops


def test_graph_ops_are_the_listed_ones(used_ops):
    listed = _listed()
    assert used_ops, "no graph reported any op"
    assert all(re.fullmatch(r"GGML_(OP|UNARY_OP|GLU_OP)_[A-Z0-9_]+", op) for op in used_ops), sorted(used_ops)
    assert used_ops - listed == set(), f"ops in the graphs but not in {OPS_LIST.name}: add them deliberately"
    assert listed - used_ops == set(), f"ops in {OPS_LIST.name} that no graph uses any more: remove them"


def test_graph_ops_reset_and_query_size(llava_tiny):
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=256, n_threads=2) as m:
        assert m.graph_ops == []            # nothing has run yet
        m.forward(m.tokenize("Hello"))
        text_ops = set(m.graph_ops)
        assert {"GGML_OP_MUL_MAT", "GGML_OP_SOFT_MAX", "GGML_OP_GET_ROWS", "GGML_OP_RMS_NORM"} <= text_ops
        assert "GGML_OP_IM2COL" not in text_ops   # the vision tower has not run
        m.forward(m.tokenize(m.chat_prompt("Hi", 1)), [_image(4, 32, 32)])
        assert {"GGML_OP_IM2COL", "GGML_OP_FLASH_ATTN_EXT"} <= set(m.graph_ops)
        ffi, lib = m._ffi, m._lib
        n_out = ffi.new("int32_t *")
        assert lib.vtrim_graph_ops(m._ctx(), ffi.NULL, 0, n_out) == pyvtrim.errors.ERR_BUFFER_TOO_SMALL
        assert n_out[0] == len(",".join(m.graph_ops))


def _supports_op_cases(path: Path, func: str) -> set[str]:
    src = path.read_text(errors="replace")
    head = re.search(rf"\b{func}\s*\([^;{{]*\)\s*{{", src)
    assert head, f"{func} not found in {path}"
    depth, i = 1, head.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
    return set(re.findall(r"case\s+(GGML_(?:OP|UNARY_OP|GLU_OP)_\w+)\s*:", src[head.end():i]))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_listed_ops_are_declared_by_backend(backend):
    import os

    root = os.environ.get("VTRIM_GGML_SOURCE")
    tree = Path(root) if root else fixtures.cache_root() / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    rel, func = BACKENDS[backend]
    if not (tree / rel).is_file():
        pytest.skip(f"the pinned ggml sources are not at {tree} (set VTRIM_GGML_SOURCE)")
    declared = _supports_op_cases(tree / rel, func)
    assert len(declared) > 30, f"parsed only {len(declared)} cases of {func}: the parser needs a look"
    missing = sorted(_listed() - declared)
    assert not missing, f"{backend} does not declare {missing}"
