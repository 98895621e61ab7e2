"""The body of POST /v1/chat/completions -> keyword arguments of Session.create_chat_completion.

Fields: messages (required), model (any string; one model is served), max_tokens / max_completion_tokens,
temperature (default 1.0, as OpenAI), top_p (default 1.0), seed, stop, stream, n (1 only), and the
extension object "pyvtrim": {"reduce": [{"method": "fastv", "k": 2, "ratio": 0.5}], "top_k": K}.
Other OpenAI fields (stream_options, user, ...) are accepted and ignored. A bad field raises BadRequest
naming it; the messages themselves are checked by pyvtrim.messages (ValueError) in the session.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional


class BadRequest(ValueError):
    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


def _number(body: Dict[str, Any], name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"'{name}' must be a number", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise BadRequest(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _int(body: Dict[str, Any], name: str, lo: int, hi: int) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{name}' must be an integer", name)
    if not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return v


def parse_body(body: Any) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    n = body.get("n", 1)
    if n not in (1, None):
        raise BadRequest("'n' must be 1 (one choice per request)", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    max_tokens = _int(body, "max_completion_tokens", 0, 1 << 24)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 0, 1 << 24)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and
                                                            all(isinstance(s, str) for s in stop))):
        raise BadRequest("'stop' must be a string or an array of strings", "stop")
    ext = body.get("pyvtrim") or {}
    if not isinstance(ext, dict):
        raise BadRequest("'pyvtrim' must be an object", "pyvtrim")
    reduce = ext.get("reduce")
    if reduce is not None and not (isinstance(reduce, list) and all(isinstance(r, dict) for r in reduce)):
        raise BadRequest("'pyvtrim.reduce' must be an array of objects such as "
                         "{\"method\": \"fastv\", \"k\": 2, \"ratio\": 0.5}", "pyvtrim.reduce")
    top_k = _int(ext, "top_k", 0, 1 << 20)
    return {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        "top_k": 0 if top_k is None else top_k,
        "seed": _int(body, "seed", 0, (1 << 63) - 1),
        "stop": stop,
        "stream": stream,
        "reduce": reduce,
    }
