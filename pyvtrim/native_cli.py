"""The `vtrim-cli` command of the wheel: runs the C chat program installed at pyvtrim/bin/vtrim-cli.

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


def executable() -> Path:
    """The installed C program (pyvtrim/bin/vtrim-cli, .exe on Windows)."""
    name = "vtrim-cli.exe" if sys.platform == "win32" else "vtrim-cli"
    for d in package_dirs():
        candidate = d / "bin" / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"vtrim-cli: the C program is not installed (looked for bin/{name} in "
                            + ", ".join(str(d) for d in package_dirs()) + ")")


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        exe = executable()
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 127
    if os.name == "posix":
        os.execv(str(exe), [str(exe)] + args)  # the C program's exit status and signals, unchanged
    return subprocess.call([str(exe)] + args)


if __name__ == "__main__":
    sys.exit(main())
