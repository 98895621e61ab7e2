"""Visual-token reduction policies, passed as ``reduce=`` to Model.forward / generate / chat.

A policy is a frozen dataclass; a list of policies is applied in order (they compose). Each run reports
what every stage did in ``Model.last_stats["stages"]``. ``to_c`` returns the C function that adds the
method (``vtrim_reduce_add_<method>``) and its params struct, so a new method brings its own pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Union

__all__ = ["FastV", "TrimCrossAttn", "FiCoCoV", "FiCoCoL", "VLCache", "Policy", "policies_of"]

_FASTV_SCORES = {"last": 0, "mean": 1}
_TRIM_MODES = {"union": 0, "budget": 1}
METHOD_NAMES = {1: "fastv", 2: "trim", 3: "ficoco_v", 4: "ficoco_l", 5: "vlcache"}
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
        p = ffi.new("struct vtrim_fastv_params *")
        lib.vtrim_fastv_default(p)
        p.k = self.k
        p.ratio = float(self.ratio)
        p.score = _FASTV_SCORES[self.score]
        return lib.vtrim_reduce_add_fastv, p


@dataclass(frozen=True)
class TrimCrossAttn:
    """Trimmed Llama (arXiv 2504.00557) for Llama-3.2-Vision: at the first cross-attention layer, rank each
    image's visual features by the attention of the text that sees it, and let every later cross-attention
    layer compute and cache K/V for the kept features only.

    ``mode="union"``: each head keeps its top ``k_ratio`` of the features, the union is kept (the kept share
    adapts to the input). ``mode="budget"``: exactly ``keep`` (a fraction) by the head-mean score.
    ``trim_first_layer`` also restricts the first cross-attention layer to the kept features.
    Padding tiles are never kept.
    """

    k_ratio: float = 0.25
    mode: str = "union"
    keep: Optional[float] = None
    trim_first_layer: bool = False

    def to_c(self, ffi: Any, lib: Any) -> Any:
        if self.mode not in _TRIM_MODES:
            raise ValueError(f"TrimCrossAttn mode={self.mode!r}: must be one of {sorted(_TRIM_MODES)}")
        if self.mode == "budget" and self.keep is None:
            raise ValueError("TrimCrossAttn(mode='budget') needs keep= (the fraction of features kept)")
        p = ffi.new("struct vtrim_trim_params *")
        lib.vtrim_trim_default(p)
        p.k_ratio = float(self.k_ratio)
        p.mode = _TRIM_MODES[self.mode]
        if self.keep is not None:
            p.keep = float(self.keep)
        p.first_layer = bool(self.trim_first_layer)
        return lib.vtrim_reduce_add_trim, p


def _ficoco_to_c(policy: Any, method: str, weight: str, ffi: Any, lib: Any) -> Any:
    """FiCoCo-V's and FiCoCo-L's params (they differ in the name of the redundancy weight)."""
    for name in ("tokens", "start_layer"):
        v = getattr(policy, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{type(policy).__name__} {name}={v!r}: must be an int")
    p = ffi.new(f"struct vtrim_{method}_params *")
    getattr(lib, f"vtrim_{method}_default")(p)
    p.tokens = policy.tokens
    p.start_layer = policy.start_layer
    setattr(p, weight, float(getattr(policy, weight)))
    p.eps = float(policy.eps)
    return getattr(lib, f"vtrim_reduce_add_{method}"), p


@dataclass(frozen=True)
class FiCoCoV:
    """FiCoCo-V (arXiv 2411.17686) for LLaVA: merge patch tokens inside the CLIP vision tower.

    In each vision layer from ``start_layer`` to the last that runs, after the layer's attention, the most
    redundant patches (``lam`` weighs their similarity to the other patches against the CLS token's
    attention, with a 2x2 local penalty) are dropped and each is merged into the kept patches it resembles
    most (``eps`` sets how many), until ``tokens`` patches per image remain; they keep their order, and the
    decoder sees ``tokens`` rows per image. ``tokens`` = all patches is the unreduced model.
    """

    tokens: int = 64
    start_layer: int = 12
    lam: float = 0.35
    eps: float = 0.998

    def to_c(self, ffi: Any, lib: Any) -> Any:
        return _ficoco_to_c(self, "ficoco_v", "lam", ffi, lib)


@dataclass(frozen=True)
class FiCoCoL:
    """FiCoCo-L (arXiv 2411.17686) for LLaVA: filter-correlate-compress of the image rows inside the decoder.

    At each hook between decoder layers l-1 and l, for l = ``start_layer`` .. n_layer-1, the image rows of
    each image are scored by layer l-1's head-mean attention logits (``beta`` weighs their similarity with
    the other rows of their image against the attention the text after the images pays them); the most
    redundant go, each merged into the kept rows of its image it resembles most (the top ``1 - eps`` of
    them), until ``tokens`` rows per image are left after the last step. Later layers run on, and cache,
    the kept rows at their original positions. ``tokens`` = N changes nothing.
    """

    tokens: int = 64
    start_layer: int = 4
    beta: float = 0.6
    eps: float = 0.998

    def to_c(self, ffi: Any, lib: Any) -> Any:
        return _ficoco_to_c(self, "ficoco_l", "beta", ffi, lib)


@dataclass(frozen=True)
class VLCache:
    """VL-Cache (arXiv 2410.23317): after the prefill of a prompt with images, shrink the KV cache that
    decoding reads. The attention of the text after the last image gives each layer a share of the budget
    (by its attention density) and each KV head its own rows: the most recent ``recent`` share of the
    layer's budget plus the best-scoring others.

    ``budget``: the mean fraction of the cache kept per layer, in (0, n_layer]; ``threshold``: an attention
    weight below threshold * its row's maximum counts as sparse, in [0, 1); ``recent`` in [0, 1].
    Decoding and later turns append after the kept rows. LLaVA-style models only (a ValueError on
    Llama-3.2-Vision, whose images are cross-attended). Composes after FastV in one ``reduce=`` list.
    """

    budget: float = 0.1
    threshold: float = 0.01
    recent: float = 0.1

    def to_c(self, ffi: Any, lib: Any) -> Any:
        for name in ("budget", "threshold", "recent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"VLCache {name}={v!r}: must be a number")
        # The ranges the C validate checks too, said here before the library is asked.
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"VLCache threshold={self.threshold!r}: must be in [0, 1)")
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"VLCache recent={self.recent!r}: must be in [0, 1]")
        if not self.budget > 0.0:
            raise ValueError(f"VLCache budget={self.budget!r}: must be in (0, n_layer]")
        p = ffi.new("struct vtrim_vlcache_params *")
        lib.vtrim_vlcache_default(p)
        p.budget = float(self.budget)
        p.threshold = float(self.threshold)
        p.recent = float(self.recent)
        return lib.vtrim_reduce_add_vlcache, p


_POLICIES = (FastV, TrimCrossAttn, FiCoCoV, FiCoCoL, VLCache)
Policy = Union[FastV, TrimCrossAttn, FiCoCoV, FiCoCoL, VLCache]
ReduceArg = Union[None, Policy, Sequence[Policy]]


def policies_of(reduce: ReduceArg) -> List[Policy]:
    """``reduce=`` as a list of policies; a ValueError for anything else."""
    if reduce is None:
        return []
    items: Iterable[Any] = reduce if isinstance(reduce, (list, tuple)) else [reduce]
    out = []
    for r in items:
        if not isinstance(r, _POLICIES):
            raise ValueError(f"reduce: {r!r} is not a reduction policy (pyvtrim.FastV, pyvtrim.TrimCrossAttn, "
                             "pyvtrim.FiCoCoV, pyvtrim.FiCoCoL, pyvtrim.VLCache)")
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
        "t_ms": stage.t_ms,
    }
