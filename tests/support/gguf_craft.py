"""GGUF files written byte by byte from the format's spec (ggml/docs/gguf.md), so that a test can put any value
anywhere: lengths, counts, dimensions and offsets no well-behaved writer would produce."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

# value types of the spec
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
GGML_F32 = 0
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}


def gguf_string(s: "str | bytes", length: "int | None" = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def value(vtype: int, v, elem: int = STRING) -> bytes:
    if vtype == STRING:
        return gguf_string(v)
    if vtype == ARRAY:
        return struct.pack("<IQ", elem, len(v)) + b"".join(value(elem, x) for x in v)
    return struct.pack(_SCALAR[vtype], v)


@dataclass
class Tensor:
    name: str
    dims: Sequence[int]
    ggml_type: int = GGML_F32
    offset: int = 0


@dataclass
class Gguf:
    kv: List[Tuple[str, int, object, int]] = field(default_factory=list)   # key, type, value, array element type
    tensors: List[Tensor] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32
    n_tensors: "int | None" = None   # to lie about the counts
    n_kv: "int | None" = None

    def add(self, key: str, vtype: int, v, elem: int = STRING) -> "Gguf":
        self.kv.append((key, vtype, v, elem))
        return self

    def tensor(self, name: str, dims: Sequence[int], offset: int = 0, ggml_type: int = GGML_F32) -> "Gguf":
        self.tensors.append(Tensor(name, dims, ggml_type, offset))
        return self

    def bytes(self) -> bytes:
        out = b"GGUF" + struct.pack("<I", 3)
        out += struct.pack("<qq", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.kv) if self.n_kv is None else self.n_kv)
        for key, vtype, v, elem in self.kv:
            out += gguf_string(key) + struct.pack("<I", vtype) + value(vtype, v, elem)
        for t in self.tensors:
            out += gguf_string(t.name) + struct.pack("<I", len(t.dims))
            out += b"".join(struct.pack("<q", d) for d in t.dims)
            out += struct.pack("<IQ", t.ggml_type, t.offset)
        out += b"\0" * (-len(out) % self.alignment)
        return out + self.data


def llama_header(g: Gguf) -> Gguf:
    """The keys a one-layer text llama needs, so that a test reaches the part it is about."""
    return (g.add("general.architecture", STRING, "llama")
             .add("llama.context_length", U32, 64).add("llama.embedding_length", U32, 8)
             .add("llama.block_count", U32, 1).add("llama.feed_forward_length", U32, 16)
             .add("llama.attention.head_count", U32, 2).add("llama.attention.head_count_kv", U32, 2)
             .add("llama.attention.layer_norm_rms_epsilon", F32, 1e-5))
