"""pyvtrim serve: an OpenAI-compatible HTTP server on one Model (pip install "pyvtrim[server]").

    pyvtrim serve model.gguf --host 127.0.0.1 --port 8080 --parallel 2

Endpoints: POST /v1/chat/completions (stream: server-sent events), GET /v1/models, GET /health.
The Model's weights are loaded once; --parallel N sessions (each its own KV cache) serve N requests at
once, further requests wait in a bounded queue (503 with Retry-After when it is full). Every request goes
through Session.create_chat_completion, the same code path as the Python API.
app.py: the routes; pool.py: the sessions and the queue; validate.py: the request body.
"""

from .pool import QueueFull, SessionPool

__all__ = ["QueueFull", "SessionPool", "create_app"]


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    from .app import create_app as make

    return make(*args, **kwargs)
