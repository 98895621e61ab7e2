"""`pyvtrim serve`: its options and its command (the server's packages are imported only when it runs)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF file (text + vision, or the text part with --mmproj)")
    p.add_argument("--mmproj", help="llama.cpp's separate vision GGUF")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", type=int, default=1, help="sessions (KV caches) serving requests at once")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for a session; beyond: 503")
    p.add_argument("--model-name", help="the model id /v1/models reports (default: the file's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"pyvtrim serve: {e.name} is missing: pip install \"pyvtrim[server]\"", file=sys.stderr)
        return 1
    if args.parallel < 1 or args.queue < 0:
        print("pyvtrim serve: error: --parallel must be >= 1 and --queue >= 0", file=sys.stderr)
        return 2
    from ..model import Model
    from .app import create_app
    from .pool import SessionPool

    # the cores shared out among the sessions, which compute at the same time
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    model: Any = Model(args.model, mmproj=args.mmproj, n_ctx=args.n_ctx, n_threads=threads, device=args.device,
                       kv_type=args.kv_type, rpc=args.rpc, use_mmap=args.use_mmap)
    try:
        pool = SessionPool(model, args.parallel, n_ctx=args.n_ctx, kv_type=args.kv_type, n_threads=threads,
                           queue=args.queue)
        name = args.model_name or os.path.basename(args.model)
        app = create_app(model, pool, model_name=name)
        print(f"pyvtrim serve: {name} on http://{args.host}:{args.port}/v1 ({args.parallel} session(s), "
              f"{threads} thread(s) each)", file=sys.stderr, flush=True)
        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                # Ctrl-C / SIGTERM: running generations stop at their next step (uvicorn would wait for them)
                for session in pool.sessions:
                    session.cancel()
                super().handle_exit(sig, frame)

        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)).run()
    finally:
        model.close()
    return 0
