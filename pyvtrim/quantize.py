"""GGUF quantization on ggml's quantizers (the C library's vtrim_quantize), as llama.cpp's llama-quantize:

    pyvtrim.quantize("llava-f16.gguf", "llava-q4_K_M.gguf", "q4_K_M")      # vision tower in q8_0
    pyvtrim.quantize("mmproj-f16.gguf", "mmproj-q8_0.gguf", "q8_0")        # each file of a two-file model

The text tower's matrices follow llama.cpp's per-tensor rules for the type; the vision tower and projector
take `vision_type` ("q8_0", "f16", "same" or a type; "bf16" keeps every matrix in bf16); norms, biases and the vision embeddings are copied.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from . import _ffi
from .errors import VtrimValueError, check

TYPES = {"q8_0": 0, "q6_K": 1, "q5_K_M": 2, "q4_K_M": 3, "q4_0": 4, "bf16": 6}   # enum vtrim_quant_type
VISION_TYPES = dict(TYPES, f16=5, same=-1)


def quantize(src: "str | os.PathLike[str]", dst: "str | os.PathLike[str]", type: str = "q4_K_M", *,
             vision_type: str = "q8_0", n_threads: Optional[int] = None) -> Dict[str, int]:
    """Writes dst; returns the report (n_tensors, n_quantized, n_fallback, bytes_in, bytes_out)."""
    if type not in TYPES:
        raise VtrimValueError(f"type must be one of {sorted(TYPES)}, got {type!r}")
    if vision_type not in VISION_TYPES:
        raise VtrimValueError(f"vision_type must be one of {sorted(VISION_TYPES)}, got {vision_type!r}")
    if n_threads is not None and int(n_threads) < 1:
        raise VtrimValueError(f"n_threads must be >= 1 (None: all cores), got {n_threads}")
    ffi, lib = _ffi.get()[:2]
    p = ffi.new("struct vtrim_quantize_params *")
    lib.vtrim_quantize_params_default(p)
    p.type, p.vision_type = TYPES[type], VISION_TYPES[vision_type]
    p.n_threads = int(n_threads or 0)
    r = ffi.new("struct vtrim_quantize_report *")
    check(lib.vtrim_quantize(os.fsencode(os.fspath(src)), os.fsencode(os.fspath(dst)), p, r), os.fspath(src))
    return {k: int(getattr(r, k)) for k in ("n_tensors", "n_quantized", "n_fallback", "bytes_in", "bytes_out")}
