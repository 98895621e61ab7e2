"""Session.create_chat_completion: OpenAI-style chat completions, with prompt-prefix reuse (the server's path).

Prefix reuse: a session remembers what its KV cache holds (the tokens, each image placeholder with its image's
content hash). A request whose prompt starts with the same tokens and images keeps that part of the cache
(vtrim_context_truncate to the common prefix) and prefills only the rest, so a follow-up question neither
re-encodes the image nor prefills the earlier turns again. Reuse is exact: it gives what a fresh prefill of
the whole prompt gives (within float rounding of a different batch split). With a reduction, a fresh prefill
ranks the image tokens by the whole new prompt (FastV: by its last token), which the held cache did not see,
so a reduced part is never reused: while a reduction is requested, or where the held cache was reduced, only
the part before the first image is kept. Llama-3.2-Vision keeps its images outside the KV cache
(cross-attention states): a follow-up that brings no new image reuses the held conversation (the cross cache
stays; the new rows see the last image, as in a fresh prefill); one that brings an image prefills afresh,
because HF's rows before the first image attend to every image of the prompt (uniformly), so a new image
changes earlier rows. The tower's output of each image is in the model's image cache then, so an image seen
before is not encoded again.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Union

from ._native import _max_tokens, _Pending, _Sampler, FINISH_CANCELLED, FINISH_EOS
from .errors import VtrimUnsupportedError, VtrimValueError
from .messages import conversation, image_key, policy_from_dict
from .reduce import policies_of

if TYPE_CHECKING:
    from .session import Session

FINISH_OPENAI = {FINISH_EOS: "stop", "length": "length", "context_full": "length", FINISH_CANCELLED: "cancelled"}


@dataclass
class Held:
    """What a session's KV cache holds: the prompt tokens and decoded tokens, the images' keys (one per
    placeholder, in order), and up to which token index the cache is what an unreduced prefill gives."""
    seq_id: int
    tokens: List[int]
    images: List[str]
    exact_upto: int


def _reduce_arg(reduce: Any) -> List[Any]:
    items = reduce if isinstance(reduce, (list, tuple)) else ([] if reduce is None else [reduce])
    return policies_of([policy_from_dict(r) if isinstance(r, dict) else r for r in items])


def _stops(stop: Union[None, str, Sequence[str]]) -> List[str]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > 4 or not all(isinstance(s, str) and s for s in items):
        raise VtrimValueError("stop must be a non-empty string or a list of at most 4 of them")
    return items


def _held_prefix(s: "Session", tokens: List[int], keys: List[str], limit: int) -> int:
    """How many leading tokens of the new prompt the held cache already holds (images compared by key)."""
    held = s._held
    if held is None or held.seq_id != s._seq_id:
        return 0
    image_id = s.image_token_id
    n, img = 0, 0
    upto = min(len(held.tokens), len(tokens), held.exact_upto, limit)
    while n < upto and held.tokens[n] == tokens[n]:
        if tokens[n] == image_id:
            if img >= len(held.images) or held.images[img] != keys[img]:
                break
            img += 1
        n += 1
    return n


def _images_in_kv(s: "Session") -> bool:
    """Whether an image's tokens are decoder rows (LLaVA), rather than a token that cross-attends (mllama)."""
    return s.info.get("arch") != "mllama"


def _positions(s: "Session", tokens: Sequence[int]) -> int:
    """Positions tokens take in the decoder (LLaVA: an image placeholder is n_image_tokens rows)."""
    n_img = sum(1 for t in tokens if t == s.image_token_id)
    rows = int(s.info.get("n_image_tokens", 1)) if _images_in_kv(s) else 1
    return len(tokens) + n_img * (rows - 1)


def prepare(s: "Session", messages: Any, reduce: Any) -> Dict[str, Any]:
    """Under the session's lock: installs the reduction, reuses what it can and prefills the rest."""
    arch = str(s.info.get("arch"))
    text, has_bos, images = conversation(arch, messages)
    if images and s.image_token_id < 0:
        raise VtrimValueError("this model takes no images")
    policies = _reduce_arg(reduce)
    tokens = s.tokenize(text, add_special=not has_bos)
    keys = [image_key(im) for im in images]
    image_id = s.image_token_id
    first_image = next((i for i, t in enumerate(tokens) if t == image_id), len(tokens))
    s._apply_reduce(policies)
    n_keep = _held_prefix(s, tokens, keys, first_image if policies else len(tokens))
    n_keep = min(n_keep, len(tokens) - 1)   # at least one token is prefilled: it gives the logits
    n_img_kept = sum(1 for t in tokens[:n_keep] if t == image_id)
    if images[n_img_kept:] and not _images_in_kv(s):
        n_keep = 0
    kept_positions = _positions(s, tokens[:n_keep])
    if n_keep > 0:
        try:
            s._truncate(kept_positions)
        except VtrimUnsupportedError:
            n_keep, kept_positions = 0, 0
    if n_keep == 0:
        s._reset()
    n_img_kept = sum(1 for t in tokens[:n_keep] if t == image_id)
    s._held = Held(s._seq_id, tokens[:n_keep], keys[:n_img_kept], n_keep)
    s._prefill(tokens[n_keep:], images[n_img_kept:])
    exact = first_image if (policies and images[n_img_kept:]) else len(tokens)
    s._held = Held(s._seq_id, list(tokens), keys, exact)
    return {"n_prompt": _positions(s, tokens), "n_cached": kept_positions}


class _StopFilter:
    """Cuts the reply at the first stop string; holds back text that may be the start of one."""

    def __init__(self, stops: List[str]) -> None:
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        cut = min((i for i in (self.text.find(st, max(0, self.sent - len(st))) for st in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.hit = True
            out, self.sent = self.text[self.sent:cut], cut
            self.text = self.text[:cut]
            return out
        safe = len(self.text)
        for st in self.stops:
            for k in range(min(len(st) - 1, len(self.text)), 0, -1):
                if self.text.endswith(st[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        safe = max(safe, self.sent)
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def create_chat_completion(
    s: "Session",
    messages: Any,
    *,
    max_tokens: Optional[int] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    stop: Union[None, str, Sequence[str]] = None,
    stream: bool = False,
    reduce: Any = None,
    model_name: Optional[str] = None,
) -> Union[Dict[str, Any], Iterator[Dict[str, Any]]]:
    stops = _stops(stop)
    seed = secrets.randbits(63) if seed is None else seed
    sampler = _Sampler(temperature, top_k, top_p, seed)
    t0 = time.perf_counter()
    with s._lock:
        try:
            s._ctx()
            s._begin()
            n = s.n_ctx if max_tokens is None else _max_tokens(max_tokens)
            counts = prepare(s, messages, reduce)
        except BaseException:
            sampler.close()
            raise
        pending = _Pending()
        seq_id = s._seq_id
        tokens = s._sample_tokens(sampler, n, pending)
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    name = model_name or s.model.path
    ttft: List[float] = []
    n_gen = [0]

    def counted() -> Iterator[int]:
        for t in tokens:
            if not ttft:
                ttft.append((time.perf_counter() - t0) * 1000.0)
            n_gen[0] += 1
            yield t

    done_ran: List[bool] = []

    def done(_: str) -> None:
        done_ran.append(True)
        sampler.close()
        with s._lock:
            held = s._held
            if held is not None and held.seq_id == seq_id == s._seq_id and not pending.broken:
                held.tokens = held.tokens + list(pending.decoded)
            elif held is not None and held.seq_id == seq_id:
                s._held = None

    pieces = s._text_pieces(counted(), on_done=done)
    filt = _StopFilter(stops)

    def finish() -> Dict[str, Any]:
        with s._lock:
            stats = s.last_stats
        reason = "stop" if filt.hit else FINISH_OPENAI.get(stats.get("finish_reason") or "", "stop")
        usage = {
            "prompt_tokens": counts["n_prompt"], "completion_tokens": n_gen[0],
            "total_tokens": counts["n_prompt"] + n_gen[0],
            "prompt_tokens_details": {"cached_tokens": counts["n_cached"]},
            "pyvtrim": {
                "cached_tokens": counts["n_cached"],
                "prefilled_tokens": counts["n_prompt"] - counts["n_cached"],
                "ttft_ms": ttft[0] if ttft else (time.perf_counter() - t0) * 1000.0,
                **{k: stats[k] for k in ("t_encode_ms", "t_prefill_ms", "t_decode_ms", "n_images",
                                         "n_image_tokens", "n_image_tokens_kept", "kv_cache_bytes",
                                         "prefill_flops", "prefill_flops_full", "stages") if k in stats},
            },
        }
        return {"finish_reason": reason, "usage": usage}

    def run() -> Iterator[str]:
        try:
            for piece in pieces:
                out = filt.feed(piece)
                if out:
                    yield out
                if filt.hit:
                    break
            out = filt.flush()
            if out:
                yield out
        finally:
            pieces.close()
            if not done_ran:  # closed before its first piece: its own `finally` never ran
                done("")

    if not stream:
        text = "".join(run())
        end = finish()
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": end["finish_reason"]}],
                "usage": end["usage"]}

    def chunks() -> Iterator[Dict[str, Any]]:
        def chunk(delta: Dict[str, Any], reason: Optional[str] = None) -> Dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

        gen = run()
        try:
            yield chunk({"role": "assistant", "content": ""})
            for piece in gen:
                yield chunk({"content": piece})
        finally:
            gen.close()
        end = finish()
        last = chunk({}, end["finish_reason"])
        last["usage"] = end["usage"]
        yield last

    return chunks()
