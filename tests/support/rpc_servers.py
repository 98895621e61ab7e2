"""ggml rpc-server processes (vtrim-rpc-server, built from the pinned archive) on loopback ports, for the RPC
tests and tools/bench_rpc.py."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Tuple

from pyvtrim import native_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_rpc_server(threads: int = 1) -> Tuple[subprocess.Popen, str]:
    """A server listening on a free loopback port: (process, "127.0.0.1:PORT"). The caller terminates it."""
    exe = str(native_cli.executable("vtrim-rpc-server"))
    for _ in range(5):   # a port taken between the probe and the bind: try another
        port = free_port()
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return proc, f"127.0.0.1:{port}"
            except OSError:
                time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError("vtrim-rpc-server did not start")
