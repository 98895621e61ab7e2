"""Exceptions of pyvtrim: one base class, VtrimError, carrying the C status code and message.

Every negative VTRIM_ERR_* code returned by libvtrim becomes a VtrimError subclass that also derives
from the built-in exception a Python caller would expect, so both ``except VtrimError`` and
``except ValueError`` (or ``FileNotFoundError``, ``MemoryError``) work:

    VTRIM_ERR_INVALID_ARG       VtrimValueError          (VtrimError, ValueError)
    VTRIM_ERR_IO                VtrimIOError             (VtrimError, OSError)
        ... missing file        VtrimFileNotFoundError   (VtrimIOError, FileNotFoundError)
    VTRIM_ERR_FORMAT            VtrimFormatError         (VtrimError)
    VTRIM_ERR_UNSUPPORTED       VtrimUnsupportedError    (VtrimError)
    VTRIM_ERR_OUT_OF_MEMORY     VtrimMemoryError         (VtrimError, MemoryError)
    VTRIM_ERR_CONTEXT_FULL      VtrimContextFullError    (VtrimError, ValueError)
    VTRIM_ERR_BACKEND           VtrimBackendError        (VtrimError)
    VTRIM_ERR_IMAGE             VtrimImageError          (VtrimError, ValueError)
    VTRIM_ERR_STATE             VtrimStateError          (VtrimError)
    VTRIM_ERR_ABORTED           VtrimAbortedError        (VtrimError)

A malformed file (FORMAT) and a valid file this runtime cannot run (UNSUPPORTED: an unknown
architecture, a GPU asked for in a CPU-only build) are deliberately *not* ValueErrors: the caller's
arguments were fine, the file or the build is the problem. Catch VtrimError for those.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

# The values of enum vtrim_status in vtrim.h (the header is the source; test_c_header checks these).
OK = 0
ERR_INVALID_ARG = -1
ERR_IO = -2
ERR_FORMAT = -3
ERR_UNSUPPORTED = -4
ERR_OUT_OF_MEMORY = -5
ERR_CONTEXT_FULL = -6
ERR_BACKEND = -7
ERR_IMAGE = -8
ERR_STATE = -9
ERR_BUFFER_TOO_SMALL = -10
ERR_ABORTED = -11


class VtrimError(RuntimeError):
    """A failed libvtrim call (or a misuse caught on the Python side). ``code`` is the VTRIM_ERR_* value."""

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class VtrimValueError(VtrimError, ValueError):
    """An argument out of range: bad sampling parameters, mismatched image count, bad token ids."""


class VtrimIOError(VtrimError, OSError):
    """A file could not be read."""


class VtrimFileNotFoundError(VtrimIOError, FileNotFoundError):
    """A model, mmproj or image file does not exist."""


class VtrimFormatError(VtrimError):
    """A file is not a valid GGUF, is truncated, or lacks a key or tensor the model needs."""


class VtrimUnsupportedError(VtrimError):
    """Valid input this build cannot run: an unknown architecture or tensor type, a missing GPU backend."""


class VtrimMemoryError(VtrimError, MemoryError):
    """An allocation failed."""


class VtrimContextFullError(VtrimError, ValueError):
    """The prompt (with images expanded) or the generated tokens do not fit in n_ctx."""


class VtrimBackendError(VtrimError):
    """ggml failed to allocate or compute a graph."""


class VtrimImageError(VtrimError, ValueError):
    """A corrupt, empty or undecodable image, or image data of the wrong shape or type."""


class VtrimStateError(VtrimError):
    """A call in the wrong order, or on a closed Model."""


class VtrimClosedError(VtrimStateError):
    """The Model (or Chat) was closed; its native memory is gone."""


class VtrimAbortedError(VtrimError):
    """A prefill or decode stopped by Session.cancel() (the C abort flag); the sequence is as before it."""


class VtrimLibraryError(VtrimError, OSError):
    """libvtrim (the shared library of the package) could not be found or loaded."""


_BY_CODE: dict[int, type[VtrimError]] = {
    ERR_INVALID_ARG: VtrimValueError,
    ERR_IO: VtrimIOError,
    ERR_FORMAT: VtrimFormatError,
    ERR_UNSUPPORTED: VtrimUnsupportedError,
    ERR_OUT_OF_MEMORY: VtrimMemoryError,
    ERR_CONTEXT_FULL: VtrimContextFullError,
    ERR_BACKEND: VtrimBackendError,
    ERR_IMAGE: VtrimImageError,
    ERR_STATE: VtrimStateError,
    ERR_ABORTED: VtrimAbortedError,
}

_DEFAULT_MESSAGE: dict[int, str] = {
    ERR_CONTEXT_FULL: "prompt longer than n_ctx",
}


def error_for(code: int, message: str, path: Optional[str] = None) -> VtrimError:
    """The exception for a negative status ``code``. ``path``: the file the call was about, if any;
    an I/O error on a path that does not exist becomes VtrimFileNotFoundError."""
    message = message or _DEFAULT_MESSAGE.get(code, f"libvtrim call failed with status {code}")
    if code == ERR_IO and path is not None and not os.path.exists(path):
        return file_not_found(path, message)
    return _BY_CODE.get(code, VtrimError)(message, code)


def file_not_found(path: "str | os.PathLike[str]", message: Optional[str] = None) -> VtrimFileNotFoundError:
    """A FileNotFoundError that is also a VtrimError, with errno and filename set like the built-in one."""
    text = os.fspath(path)
    err = VtrimFileNotFoundError(message or f"no such file: {text!r}", ERR_IO)
    err.errno = errno.ENOENT
    err.strerror = os.strerror(errno.ENOENT)
    err.filename = text
    return err


def check(rc: int, path: Optional["str | os.PathLike[str]"] = None) -> int:
    """Returns ``rc`` when it is >= 0, else raises the matching VtrimError with vtrim_last_error()."""
    if rc >= 0:
        return rc
    from ._ffi import last_error  # late: importing errors must not load the library

    raise error_for(rc, last_error(), None if path is None else os.fspath(path))
