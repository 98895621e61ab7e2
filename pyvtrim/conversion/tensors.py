"""Where converters get their input tensors: safetensors files (read lazily) or plain numpy arrays.

The safetensors format is small enough to read directly (8-byte header length, JSON header,
raw little-endian data), which gives lazy memory-mapped access and bf16 support without torch:
bf16 is the top half of an f32, so widening is a 16-bit shift.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Union

import numpy as np

from .base import ConversionError, read_json

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened in _to_f32
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class TensorSource:
    """Named float tensors. Subclasses implement names(), shape(name) and load(name) -> float32."""

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple:
        raise NotImplementedError

    def load(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ArraySource(TensorSource):
    """Tensors given as arrays, or as callables that make them on demand (keeps memory low)."""

    def __init__(self, tensors: Mapping[str, Union[np.ndarray, Callable[[], np.ndarray]]],
                 shapes: Mapping[str, tuple] = None):
        self._tensors = dict(tensors)
        self._shapes = dict(shapes or {})
        for k, v in self._tensors.items():
            if k not in self._shapes:
                if callable(v):
                    raise ConversionError(f"{k}: a lazy tensor needs its shape")
                self._shapes[k] = tuple(np.shape(v))

    def names(self):
        return list(self._tensors)

    def shape(self, name):
        return tuple(self._shapes[name])

    def load(self, name):
        v = self._tensors[name]
        arr = v() if callable(v) else v
        return np.asarray(arr, dtype=np.float32)


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ConversionError(f"{path}: truncated safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > 100 * 1024 * 1024:
                    raise ConversionError(f"{path}: implausible safetensors header size {n}")
                header = json.loads(f.read(n).decode("utf-8"))
            size = path.stat().st_size
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: cannot read safetensors header: {e}") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: Dict[str, tuple] = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise ConversionError(f"{path}: malformed header entry for {name}") from e
            if dtype not in _DTYPES:
                raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            want = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize  # prod(()) == 1: scalars
            if end - begin != want or self.data_start + end > size:
                raise ConversionError(f"{path}: tensor {name} has inconsistent data offsets")
            self.entries[name] = (dtype, shape, begin, end)
        self._mmap = None

    def load(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self.data_start + begin:self.data_start + end]
        arr = raw.view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            return bf16_to_f32(arr)
        return arr.astype(np.float32)

    def close(self):
        self._mmap = None


class SafetensorsSource(TensorSource):
    """All tensors of a model directory's *.safetensors files (sharded or not)."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no weight_map")
            files = sorted({model_dir / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise ConversionError(f"{f}: shard listed in {index.name} is missing")
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            extra = ""
            if any(model_dir.glob("pytorch_model*.bin")):
                extra = " (pytorch_model.bin is not supported: re-save with save_pretrained(safe_serialization=True))"
            raise ConversionError(f"{model_dir}: no *.safetensors weights found{extra}")
        self._files = [_SafetensorsFile(f) for f in files]
        self._where: Dict[str, _SafetensorsFile] = {}
        for sf in self._files:
            for name in sf.entries:
                if name in self._where:
                    raise ConversionError(f"tensor {name} is in both {self._where[name].path} and {sf.path}")
                self._where[name] = sf

    def names(self):
        return list(self._where)

    def shape(self, name):
        return tuple(self._where[name].entries[name][1])

    def load(self, name):
        return self._where[name].load(name)

    def close(self):
        for sf in self._files:
            sf.close()
