"""pyvtrim: vision-language models (LLaVA-1.5, Llama-3.2-Vision) on ggml, with visual-token reduction.

    import pyvtrim
    with pyvtrim.Model("llava.gguf") as m:
        print(m.chat("cat.jpg", "What is on the table?"))

Importing the package does not load the native library; the first Model() does (and says clearly
when it is missing).
"""

from __future__ import annotations

from ._ffi import backends, data_path, version
from .errors import (
    VtrimAbortedError,
    VtrimBackendError,
    VtrimClosedError,
    VtrimContextFullError,
    VtrimError,
    VtrimFileNotFoundError,
    VtrimFormatError,
    VtrimImageError,
    VtrimIOError,
    VtrimLibraryError,
    VtrimMemoryError,
    VtrimStateError,
    VtrimUnsupportedError,
    VtrimValueError,
)
from .chat import Chat
from .model import Model
from .quantize import quantize
from .reduce import FastV, FiCoCoL, FiCoCoV, TrimCrossAttn, VLCache
from .session import Session

__version__ = "0.1.0"

__all__ = [
    "Chat",
    "FastV",
    "FiCoCoV",
    "FiCoCoL",
    "Model",
    "Session",
    "TrimCrossAttn",
    "VLCache",
    "VtrimAbortedError",
    "VtrimBackendError",
    "VtrimClosedError",
    "VtrimContextFullError",
    "VtrimError",
    "VtrimFileNotFoundError",
    "VtrimFormatError",
    "VtrimIOError",
    "VtrimImageError",
    "VtrimLibraryError",
    "VtrimMemoryError",
    "VtrimStateError",
    "VtrimUnsupportedError",
    "VtrimValueError",
    "backends",
    "quantize",
    "data_path",
    "version",
]
