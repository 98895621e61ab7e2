"""Helpers for tests that drive an interactive chat program (`pyvtrim chat`, `vtrim-cli`) as a person would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import List, Optional, Tuple


def interrupt_first_answer(cmd: List[str], then: str, env: Optional[dict] = None,
                           timeout: float = 120) -> Tuple[int, str]:
    """Starts `cmd`, asks a question whose answer is long, sends SIGINT (Ctrl-C) once the answer has begun,
    then types `then` (more lines, ending with an empty one to quit). Returns (status, stderr)."""
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        p.stdin.write(b"Tell me a long story.\n")
        p.stdin.flush()
        os.set_blocking(p.stdout.fileno(), False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not p.stdout.read(1):  # the answer has started
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        p.stdin.write(then.encode())
        p.stdin.flush()
        _, err = p.communicate(timeout=timeout)
    finally:
        p.kill()
    return p.returncode, err.decode("utf-8", "replace")


def first_turn_positions(model, question: str) -> int:
    """KV positions the first turn with one image takes (the placeholder expands to n_image_tokens)."""
    return len(model.tokenize(model.chat_prompt(question, 1))) + model.info["n_image_tokens"] - 1
