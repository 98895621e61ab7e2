"""Visual-token reduction policies, passed as ``reduce=`` to Model.forward / generate / chat.

A policy is a frozen dataclass; a list of policies is applied in order (they compose). Each run reports
what every stage did in ``Model.last_stats["stages"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, Sequence, Union

__all__ = ["FastV", "Policy", "policies_of"]

_FASTV_SCORES = {"last": 0, "mean": 1}
METHOD_NAMES = {1: "fastv"}
HOOK_NAMES = {0: "vision_encoder", 1: "decoder_layer", 2: "cross_attn", 3: "after_prefill"}


@dataclass(frozen=True)
class FastV:
    """FastV (arXiv 2403.06764): after decoder layer ``k``, drop the fraction ``ratio`` of the image tokens
    that layer k-1 attends to least.

    ``score="last"`` ranks by the last prompt token's attention (the official code), ``"mean"`` by the
    mean over the text tokens after the last image (the paper). Layers >= k run on, and cache, the kept
    tokens only; they keep their original positions.
    """

    k: int = 2
    ratio: float = 0.5
    score: str = "last"

    def to_c(self, ffi: Any, lib: Any) -> Any:
        if self.score not in _FASTV_SCORES:
            raise ValueError(f"FastV score={self.score!r}: must be one of {sorted(_FASTV_SCORES)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ValueError(f"FastV k={self.k!r}: must be an int")
        p = ffi.new("struct vtrim_reduce_params *")
        lib.vtrim_reduce_params_default(lib.VTRIM_REDUCE_FASTV, p)
        p.fastv_k = self.k
        p.fastv_ratio = float(self.ratio)
        p.fastv_score = _FASTV_SCORES[self.score]
        return p


Policy = FastV
ReduceArg = Union[None, Policy, Sequence[Policy]]


def policies_of(reduce: ReduceArg) -> List[Policy]:
    """``reduce=`` as a list of policies; a ValueError for anything else."""
    if reduce is None:
        return []
    items: Iterable[Any] = reduce if isinstance(reduce, (list, tuple)) else [reduce]
    out = []
    for r in items:
        if not isinstance(r, FastV):
            raise ValueError(f"reduce: {r!r} is not a reduction policy (pyvtrim.FastV)")
        out.append(r)
    return out


def stage_dict(stage: Any) -> dict:
    """One vtrim_reduce_stage as a dict."""
    return {
        "method": METHOD_NAMES.get(stage.method, str(stage.method)),
        "hook": HOOK_NAMES.get(stage.hook, str(stage.hook)),
        "layer": stage.layer,
        "n_in": stage.n_in,
        "n_kept": stage.n_kept,
        "kv_bytes_full": stage.kv_bytes_full,
        "kv_bytes_kept": stage.kv_bytes_kept,
        "flops_saved": stage.flops_saved,
    }
