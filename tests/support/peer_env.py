"""The llama.cpp peer environment (llama-cpp-python built from the pinned archive by tools/bench_peers.py
--setup), where it exists: tests that load our files in a real llama.cpp use it and skip without it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def peer_python() -> Optional[str]:
    env = os.environ.get("VTRIM_PEER_PYTHON")
    if env:
        return env
    cache = Path(os.environ.get("VTRIM_CACHE_DIR") or Path.home() / ".cache" / "pyvtrim")
    py = cache / "peers" / "venv" / "bin" / "python"
    return str(py) if py.is_file() else None
