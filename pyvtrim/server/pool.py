"""The server's sessions: N sessions on one Model, handed to one request at a time, with a bounded queue.

A request that finds every session busy waits (at most `queue` of them wait); beyond that acquire() raises
QueueFull at once (the server answers 503 with Retry-After). A free session is chosen by affinity first:
the one that last served the same conversation (the same first message) still holds its prefix in its KV
cache, so a follow-up turn reuses it; otherwise the least recently used one.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List, Optional

from ..session import Session


class QueueFull(Exception):
    """Every session is busy and the queue is full."""


class SessionPool:
    def __init__(self, model: Any, parallel: int, *, n_ctx: Optional[int] = None, kv_type: Optional[str] = None,
                 n_threads: Optional[int] = None, queue: int = 16) -> None:
        if parallel < 1 or queue < 0:
            raise ValueError(f"parallel must be >= 1 and queue >= 0, got {parallel} and {queue}")
        self.model = model
        self.queue = queue
        # the Model's default session is the first (its KV cache would be idle otherwise)
        self.sessions: List[Session] = [model._session()] + [
            model.session(n_ctx=n_ctx, kv_type=kv_type, n_threads=n_threads) for _ in range(parallel - 1)]
        self._free: List[Session] = list(self.sessions)
        self._affinity = {id(s): None for s in self.sessions}   # the conversation key each last served
        self._used = {id(s): 0.0 for s in self.sessions}
        self._cond = threading.Condition()
        self._admitted = 0   # requests holding a session or waiting for one
        self.served = 0
        self.cancelled = 0   # requests whose client went away before the end

    @property
    def busy(self) -> int:
        with self._cond:
            return len(self.sessions) - len(self._free)

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._admitted - (len(self.sessions) - len(self._free))

    def reserve(self) -> None:
        """Admits a request (to a session now or a place in the queue), or raises QueueFull."""
        with self._cond:
            if self._admitted >= len(self.sessions) + self.queue:
                raise QueueFull(f"all {len(self.sessions)} sessions are busy and {self.queue} requests wait")
            self._admitted += 1

    def unreserve(self, cancelled: bool = False) -> None:
        """An admitted request that ended before it took a session."""
        with self._cond:
            self._admitted -= 1
            self.cancelled += int(cancelled)
            self._cond.notify()

    def acquire(self, key: Optional[str] = None) -> Session:
        """A free session for an admitted request (blocks while none is free)."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._free))
            pick = next((s for s in self._free if key is not None and self._affinity[id(s)] == key), None)
            if pick is None:
                pick = min(self._free, key=lambda s: self._used[id(s)])
            self._free.remove(pick)
            self._affinity[id(pick)] = key
            return pick

    def release(self, session: Session, cancelled: bool = False) -> None:
        """Gives the session back and ends the request's admission."""
        with self._cond:
            self.cancelled += int(cancelled)
            self._used[id(session)] = time.monotonic()
            self._free.append(session)
            self._admitted -= 1
            self.served += 1
            self._cond.notify()

    def close(self) -> None:
        for s in self.sessions:
            s.close()
