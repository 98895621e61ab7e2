"""The HTTP routes (FastAPI) of pyvtrim serve.

Each request runs in a worker thread of its own (a _Job): it takes a session from the pool, calls
Session.create_chat_completion and hands the result (or the chunks of a stream) to the event loop through
an asyncio queue; the worker alone gives the session back, once the generation stopped. A client that
goes away (a closed stream, or a disconnect while a non-streamed answer is computed) cancels the job:
Session.cancel() stops the prefill or decode at its next graph node and the generation at its next token,
and the session serves the next request. Errors become OpenAI-style bodies {"error": {"message", "type",
"param", "code"}}: 400 for what the request got wrong, 503 (Retry-After) when the queue is full, 500 with
the exception's type and message (never a traceback) otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from typing import Any, Dict, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import VtrimContextFullError, VtrimImageError, VtrimUnsupportedError
from .pool import QueueFull, SessionPool
from .validate import BadRequest, parse_body

log = logging.getLogger("pyvtrim.server")
MAX_BODY = 64 << 20   # bytes of one request (images as data: URLs included)


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: BaseException) -> JSONResponse:
    """The response for an exception of a request (no traceback in it; the server log has that)."""
    if isinstance(e, BadRequest):
        return JSONResponse(error_body(str(e), param=e.param), status_code=400)
    if isinstance(e, VtrimContextFullError):
        return JSONResponse(error_body(f"the prompt does not fit in the context: {e}",
                                       code="context_length_exceeded"), status_code=400)
    if isinstance(e, VtrimImageError):
        return JSONResponse(error_body(f"invalid image: {e}", param="messages", code="invalid_image"),
                            status_code=400)
    if isinstance(e, (ValueError, FileNotFoundError, VtrimUnsupportedError)):
        return JSONResponse(error_body(str(e), param="messages"), status_code=400)
    log.error("request failed", exc_info=e)
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type_="server_error"),
                        status_code=500)


class _Job:
    """One request's worker thread; items reach the event loop as (kind, value) on `queue`."""

    def __init__(self, pool: SessionPool, kwargs: Dict[str, Any], key: str, loop: asyncio.AbstractEventLoop,
                 model_name: str) -> None:
        self.pool, self.kwargs, self.key, self.loop, self.model_name = pool, kwargs, key, loop, model_name
        self.queue: "asyncio.Queue[Tuple[str, Any]]" = asyncio.Queue()
        self.session: Any = None
        self.cancelled = False
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pyvtrim-request", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        self.cancelled = True
        if self.session is not None:
            self.session.cancel()

    def _push(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def _run(self) -> None:
        session = None
        try:
            session = self.pool.acquire(self.key)
            self.session = session
            if self.cancelled:
                self._push("error", ConnectionAbortedError("the client went away"))
                return
            result = session.create_chat_completion(**self.kwargs, model_name=self.model_name)
            if not self.kwargs["stream"]:
                self._push("done", result)
                return
            self._push("started")
            try:
                for chunk in result:
                    if self.cancelled:
                        break
                    self._push("chunk", chunk)
            finally:
                result.close()   # in this thread, before the session is given back
            self._push("end")
        except BaseException as e:  # handed to the event loop, which answers with it
            self._push("error", e)
        finally:
            if session is not None:
                self.pool.release(session, cancelled=self.cancelled)
            else:
                self.pool.unreserve(cancelled=self.cancelled)
            self.finished.set()


def create_app(model: Any, pool: SessionPool, *, model_name: str) -> FastAPI:
    app = FastAPI(title="pyvtrim", docs_url=None, redoc_url=None)
    created = int(time.time())
    app.state.pool = pool

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def any_error(request: Request, e: Exception) -> JSONResponse:
        return error_response(e)

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        return {"status": "ok", "model": model_name, "sessions": len(pool.sessions), "busy": pool.busy,
                "waiting": pool.waiting, "served": pool.served, "cancelled": pool.cancelled}

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pyvtrim"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return JSONResponse(error_body(f"the request body is larger than {MAX_BODY} bytes"), status_code=413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return JSONResponse(error_body(f"the request body is not valid JSON: {e}"), status_code=400)
        try:
            kwargs = parse_body(body)
        except BadRequest as e:
            return error_response(e)
        try:
            pool.reserve()
        except QueueFull as e:
            return JSONResponse(error_body(f"the server is busy: {e}", type_="server_error", code="queue_full"),
                                status_code=503, headers={"Retry-After": "1"})
        key = hashlib.sha256(json.dumps(kwargs["messages"][0], sort_keys=True, default=str).encode()).hexdigest()
        job = _Job(pool, kwargs, key, asyncio.get_running_loop(), model_name)
        job.start()
        try:
            first = await _first(job, request)
        except asyncio.CancelledError:
            job.cancel()
            raise
        kind, value = first
        if kind == "error":
            return error_response(value)
        if kind == "done":
            return JSONResponse(value)
        return EventSourceResponse(_events(job), ping=15)

    return app


async def _first(job: _Job, request: Request) -> Tuple[str, Any]:
    """The job's first item; a client that disconnects meanwhile cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(job.queue.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()


async def _events(job: _Job) -> Any:
    """The stream's server-sent events: one chat.completion.chunk each, then [DONE]."""
    try:
        while True:
            kind, value = await job.queue.get()
            if kind == "chunk":
                yield {"data": json.dumps(value)}
            elif kind == "error":
                yield {"data": json.dumps(json.loads(error_response(value).body))}
                break
            else:
                break
        yield {"data": "[DONE]"}
    finally:
        if not job.finished.is_set():   # the client went away: stop the generation, free the session
            job.cancel()
