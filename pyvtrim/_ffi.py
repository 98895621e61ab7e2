"""The cffi binding, in ABI mode: no compiler at install or import time.

The declarations come from the public header itself (the text between "/* cffi-begin */" and
"/* cffi-end */" of vtrim.h, which the wheel ships next to the library), so there is no second,
hand-kept copy of the C API. The library is loaded on first use, not at import: ``import pyvtrim``
works without it, and the first Model() raises VtrimLibraryError saying where it looked.

Where things are looked for, first match wins:
  library: $VTRIM_LIBRARY, then libvtrim.{so,dylib}/vtrim.dll next to this file, then in the installed
           pyvtrim distribution (so tests run from a source checkout still find the built wheel's library)
  header:  $VTRIM_HEADER, then vtrim.h next to the library, then core/include/vtrim.h of a source checkout
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, List, NamedTuple, Optional

import cffi

from .errors import VtrimLibraryError

PACKAGE_DIR = Path(__file__).resolve().parent
HEADER_NAME = "vtrim.h"
CFFI_BEGIN = "/* cffi-begin */"
CFFI_END = "/* cffi-end */"


class Binding(NamedTuple):
    ffi: cffi.FFI
    lib: Any
    library_path: Path
    header_path: Path


_binding: Optional[Binding] = None
_lock = threading.Lock()


def library_filename() -> str:
    """The file name CMake gives the shared library on this platform."""
    if sys.platform == "win32":
        return "vtrim.dll"
    if sys.platform == "darwin":
        return "libvtrim.dylib"
    return "libvtrim.so"


def package_dirs() -> List[Path]:
    """This package's folder, then the installed distribution's when that is another one (a source
    checkout on sys.path shadows the installed package but holds no built library)."""
    dirs = [PACKAGE_DIR]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            installed = Path(str(distribution("pyvtrim").locate_file("pyvtrim"))).resolve()
        except PackageNotFoundError:
            installed = None
        if installed is not None and installed.is_dir() and installed not in dirs:
            dirs.append(installed)
    except Exception:  # broken metadata must not break the import path
        pass
    return dirs


def find_library() -> Path:
    env = os.environ.get("VTRIM_LIBRARY")
    if env:
        return Path(env)
    name = library_filename()
    candidates = [d / name for d in package_dirs()]
    for c in candidates:
        if c.is_file():
            return c
    raise VtrimLibraryError(
        f"libvtrim is missing: looked for {', '.join(map(str, candidates))}. "
        "Install the package with `pip install .` (it builds the library), or set VTRIM_LIBRARY."
    )


def find_header(library: Path) -> Path:
    env = os.environ.get("VTRIM_HEADER")
    candidates = [Path(env)] if env else []
    candidates += [library.parent / HEADER_NAME, PACKAGE_DIR / HEADER_NAME,
                   PACKAGE_DIR.parent / "core" / "include" / HEADER_NAME]
    for c in candidates:
        if c.is_file():
            return c
    raise VtrimLibraryError(f"vtrim.h is missing: looked for {', '.join(map(str, candidates))}")


def cdef_source(header_text: str) -> str:
    """The declarations between the cffi markers of vtrim.h, with the VTRIM_API export macro removed."""
    begin = header_text.find(CFFI_BEGIN)
    end = header_text.find(CFFI_END)
    if begin < 0 or end < begin:
        raise VtrimLibraryError(f"vtrim.h lacks the {CFFI_BEGIN!r} ... {CFFI_END!r} section")
    return re.sub(r"\bVTRIM_API\b", "", header_text[begin + len(CFFI_BEGIN):end])


def make_ffi(header: Path) -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(cdef_source(header.read_text(encoding="utf-8")))
    return ffi


def get() -> Binding:
    """The loaded binding; loads the library on the first call (thread-safe)."""
    global _binding
    if _binding is not None:
        return _binding
    with _lock:
        if _binding is None:
            library = find_library()
            header = find_header(library)
            ffi = make_ffi(header)
            # RTLD_NODELETE: cffi dlcloses the library when its Lib object dies at interpreter exit, which
            # would unmap OpenMP's (libgomp's) code under ggml's still-spinning worker threads: a segfault.
            flags = ffi.RTLD_NOW | getattr(ffi, "RTLD_NODELETE", 0)
            try:
                lib = ffi.dlopen(str(library), flags)
            except OSError as e:
                raise VtrimLibraryError(f"cannot load {library}: {e}") from e
            _binding = Binding(ffi, lib, library, header)
    return _binding


def is_loaded() -> bool:
    return _binding is not None


def last_error() -> str:
    """This thread's last libvtrim message ("" when the library was never loaded)."""
    if _binding is None:
        return ""
    return _binding.ffi.string(_binding.lib.vtrim_last_error()).decode("utf-8", "replace")


def version() -> str:
    b = get()
    return b.ffi.string(b.lib.vtrim_version()).decode()


def backends() -> List[str]:
    """The ggml backends compiled into libvtrim, e.g. ["CPU"] or ["CUDA", "CPU"]."""
    b = get()
    text = b.ffi.string(b.lib.vtrim_backends()).decode()
    return [name for name in text.split(",") if name]


def data_path(name: str) -> str:
    """The path of a file shipped in pyvtrim/data (the Llama vocabularies and their test vectors).
    The first package folder that has it wins; if none has it, the path it would have here."""
    for d in package_dirs():
        p = d / "data" / name
        if p.exists():
            return str(p)
    return str(PACKAGE_DIR / "data" / name)
