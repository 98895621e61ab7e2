"""Native handles and the small state a generation keeps, shared by Model and Chat."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import numpy as np

from . import _ffi
from .errors import ERR_BUFFER_TOO_SMALL, VtrimValueError, check

Tokens = Union[Sequence[int], np.ndarray]

# Why a generation ended (Model.last_stats["finish_reason"]); None while it runs or when its stream was
# closed or interrupted before the end.
FINISH_EOS = "eos"                    # the model sampled an end-of-generation token
FINISH_LENGTH = "length"              # max_tokens were generated
FINISH_CONTEXT_FULL = "context_full"  # the KV cache (n_ctx) is full
FINISH_CANCELLED = "cancelled"        # Session.cancel() stopped it


def _max_tokens(value: Any) -> int:
    n = int(value)
    if n < 0:
        raise VtrimValueError(f"max_tokens must be >= 0, got {value}")
    return n


def _struct_to_dict(ffi: Any, ptr: Any) -> Dict[str, Any]:
    """The fields of a struct (given by pointer) as a dict; char * fields become str."""
    out: Dict[str, Any] = {}
    for name, field in ffi.typeof(ptr).item.fields:
        value = getattr(ptr, name)
        if field.type.kind == "pointer":
            value = "" if value == ffi.NULL else ffi.string(value).decode("utf-8", "replace")
        out[name] = value
    return out


def _sized_call(attempt: Callable[[int], Tuple[int, int]], n_guess: int) -> int:
    """Runs attempt(capacity) -> (rc, needed), growing the capacity once the C side says how much it
    needs (VTRIM_ERR_BUFFER_TOO_SMALL). Returns the size written."""
    capacity = max(1, n_guess)
    while True:
        rc, needed = attempt(capacity)
        if rc == ERR_BUFFER_TOO_SMALL and needed > capacity:
            capacity = needed
            continue
        check(rc)
        return needed


def _token_array(tokens: Tokens) -> np.ndarray:
    try:
        arr = np.ascontiguousarray(tokens, dtype=np.int32)
    except (OverflowError, TypeError, ValueError) as e:
        raise VtrimValueError(f"tokens must be a sequence of int32 token ids: {e}") from e
    if arr.ndim != 1:
        raise VtrimValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    return arr


class _Handles:
    """The native pointers of a Model (weights, every session's context), freed once (by close() or by the garbage collector)."""

    __slots__ = ("lib", "model", "contexts")

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.model: Any = None
        self.contexts: List[Any] = []   # the sessions' (session._Ctx): freed before the model

    def free(self) -> None:
        for ctx in list(self.contexts):
            ctx.free()
        self.contexts.clear()
        if self.model is not None:
            self.lib.vtrim_model_free(self.model)
            self.model = None


class _Sampler:
    """A native sampler; its parameters are checked by vtrim_sampler_init (ValueError when invalid)."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        ffi, lib = _ffi.get()[:2]
        if not 0 <= int(seed) < 2**64:
            raise VtrimValueError(f"seed must be in [0, 2**64), got {seed}")
        p = ffi.new("struct vtrim_sampler_params *")
        lib.vtrim_sampler_params_default(p)
        p.temperature = float(temperature)
        p.top_k = int(top_k)
        p.top_p = float(top_p)
        p.seed = int(seed)
        out = ffi.new("struct vtrim_sampler **")
        check(lib.vtrim_sampler_init(p, out))
        self._lib = lib
        self._out = ffi.new("int32_t *")
        self._handle = out[0]
        self._finalizer = weakref.finalize(self, lib.vtrim_sampler_free, out[0])

    def sample(self, ctx: Any) -> int:
        check(self._lib.vtrim_sampler_sample(self._handle, ctx, self._out))
        return int(self._out[0])

    def close(self) -> None:
        self._finalizer()


class _Pending:
    """Tokens sampled but not yet in the KV cache (the last reply token, or the EOG that ended it).
    A Chat prefills them at the start of its next turn."""

    __slots__ = ("tokens", "decoded", "broken")

    def __init__(self) -> None:
        self.tokens: List[int] = []
        self.decoded: List[int] = []
        self.broken = False  # an exception inside the generation: the KV cache may hold more than `decoded`
