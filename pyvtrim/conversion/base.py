"""Shared pieces of the HF -> GGUF converters: errors, JSON, output types, the streaming writer.

Tensors are written one at a time (header and tensor infos first, then each tensor is loaded,
converted and written), so converting a 7B model needs the memory of its largest tensor, not
of the whole model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Pattern, Sequence, Tuple

import numpy as np

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Q8_0 blocks hold 32 values (one f16 scale + 32 int8), ggml's QK8_0.
Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 34


class ConversionError(ValueError):
    """A model directory that cannot be converted; the message names the file or tensor."""


# What a tensor is, which decides its output type (see tensor_type()).
ROLE_MATRIX = "matrix"   # 2-D weight used in mul_mat / get_rows: f16 or q8_0 when asked
ROLE_EMBED = "embed"     # conv kernel or position table: f16 at most, never quantized
ROLE_VECTOR = "vector"   # norms, biases, class embedding: always f32
ROLE_F16 = "f16"         # always f16 (llama.cpp's legacy mmproj stores the conv kernel so)


def read_json(path: Path, *, required: bool = True) -> Optional[dict]:
    path = Path(path)
    if not path.is_file():
        if required:
            raise ConversionError(f"{path}: file not found")
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def file_type_for(outtype: str) -> int:
    import gguf

    return {
        "f32": int(gguf.LlamaFileType.ALL_F32),
        "f16": int(gguf.LlamaFileType.MOSTLY_F16),
        "bf16": int(gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": int(gguf.LlamaFileType.MOSTLY_Q8_0),
    }[outtype]


def tensor_type(role: str, shape: tuple, outtype: str):
    """The ggml type a tensor is stored as, given its role and the requested outtype."""
    import gguf

    T = gguf.GGMLQuantizationType
    if outtype not in OUTTYPES:
        raise ConversionError(f"unsupported outtype {outtype!r} (choose one of {', '.join(OUTTYPES)})")
    if role == ROLE_F16:
        return T.F16
    if outtype == "f32" or role == ROLE_VECTOR:
        return T.F32
    if role == ROLE_EMBED or outtype == "f16":
        return T.F16
    if outtype == "bf16":   # every matrix; conv kernels and position tables (ROLE_EMBED) stay f16
        return T.BF16
    # q8_0: ggml quantizes along rows (the last numpy axis); rows must be whole blocks.
    if len(shape) == 2 and shape[-1] % Q8_0_BLOCK == 0:
        return T.Q8_0
    return T.F16


def _encoded(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return arr
    if qtype == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def _nbytes(shape: tuple, qtype) -> int:
    import gguf

    n = int(np.prod(shape)) if shape else 1
    if qtype == gguf.GGMLQuantizationType.F32:
        return 4 * n
    if qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return 2 * n
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return n // Q8_0_BLOCK * Q8_0_BLOCK_BYTES
    raise ConversionError(f"no size rule for {qtype!r}")


@dataclass
class PlannedTensor:
    """One output tensor: its GGUF name, numpy shape (ggml's ne reversed), type and data source."""

    name: str
    shape: tuple
    role: str
    load: Callable[[], np.ndarray]   # returns float32 data of exactly `shape`
    qtype: Any = None                # filled by write_gguf from the outtype


Progress = Callable[[int, int, str], None]  # (tensors done, tensors total, name of the next one)


def write_gguf(path, arch: str, add_kv: Callable[[Any], None], tensors: Iterable[PlannedTensor],
               outtype: str, progress: Optional[Progress] = None) -> Path:
    """Write one GGUF file: keys from add_kv(writer), then every tensor in order.

    The file appears at `path` only when complete (written to a temporary name, then renamed).
    """
    import gguf

    path = Path(path)
    tensors = list(tensors)
    seen = set()
    for t in tensors:
        if t.name in seen:
            raise ConversionError(f"tensor {t.name} planned twice")
        seen.add(t.name)
        t.qtype = tensor_type(t.role, t.shape, outtype)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"{path.parent}: cannot create the output folder: {e}") from e
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        add_kv(writer)
        for t in tensors:
            nbytes = _nbytes(t.shape, t.qtype)
            if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            if progress:
                progress(i, len(tensors), t.name)
            data = t.load()
            if tuple(data.shape) != tuple(t.shape):
                raise ConversionError(f"{t.name}: produced shape {tuple(data.shape)}, planned {tuple(t.shape)}")
            enc = _encoded(data, t.qtype)
            del data
            writer.write_tensor_data(enc)
        if progress:
            progress(len(tensors), len(tensors), "")
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def canonical_names(names: Iterable[str], prefixes: Sequence[Tuple[str, str]], ignored: Pattern[str],
                    model: str, where: str) -> Dict[str, str]:
    """canonical name -> HF name, by the first matching (HF prefix, canonical prefix); tensors matching
    `ignored` are skipped, any other unknown tensor is an error (it would be silently dropped)."""
    out: Dict[str, str] = {}
    unknown = []
    for hf in names:
        if ignored.search(hf):
            continue
        for pre, canon in prefixes:
            if hf.startswith(pre):
                c = canon + hf[len(pre):]
                if c in out:
                    raise ConversionError(f"{where}: tensors {out[c]} and {hf} are the same weight")
                out[c] = hf
                break
        else:
            unknown.append(hf)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConversionError(f"{where}: unexpected tensors for {model}: {', '.join(unknown[:5])}{more}")
    return out
