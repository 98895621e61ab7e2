"""The `vtrim-cli` command of the wheel: runs the C chat program installed at pyvtrim/bin/vtrim-cli (and
`pyvtrim rpc-server`, ggml's rpc-server at pyvtrim/bin/vtrim-rpc-server, the same way).

The C program needs no Python; this entry point only finds it, since an install scheme puts scripts and
packages in places whose relative path differs from scheme to scheme (venv, --user, system packages).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from ._ffi import package_dirs


def executable(program: str = "vtrim-cli") -> Path:
    """An installed C program (pyvtrim/bin/<program>, .exe on Windows), or the one next to $VTRIM_LIBRARY."""
    name = program + ".exe" if sys.platform == "win32" else program
    lib = os.environ.get("VTRIM_LIBRARY")
    if lib and (Path(lib).parent / name).is_file():   # a build folder: its programs lie next to its library
        return Path(lib).parent / name
    for d in package_dirs():
        candidate = d / "bin" / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{program}: the C program is not installed (looked for bin/{name} in "
                            + ", ".join(str(d) for d in package_dirs()) + ")")


def run(program: str, args: List[str]) -> int:
    try:
        exe = executable(program)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 127
    if os.name == "posix":
        os.execv(str(exe), [str(exe)] + args)  # the C program's exit status and signals, unchanged
    return subprocess.call([str(exe)] + args)


def main(argv: Optional[List[str]] = None) -> int:
    return run("vtrim-cli", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
