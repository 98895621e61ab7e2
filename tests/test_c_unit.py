"""The C unit tests (tests/c/test_unit.c): the mask builder, the sampler on plain arrays, the policy list and
the methods' apply, compiled here with the system C compiler from their sources (they need no ggml); and the
KV cache primitives (positions, truncation, per-head compaction on ggml's CPU backend), run from the CMake
build's vtrim-unit-tests, looked for in $VTRIM_UNIT_TESTS, next to $VTRIM_LIBRARY, then in the CI build folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "core" / "src"
PURE_SOURCES = ["kv/mask.c", "runtime/sampling.c", "api/error.c", "reduce/reduce.c", "reduce/fastv.c",
                "reduce/trim.c", "reduce/ficoco.c", "reduce/ficoco_v.c"]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def test_pure_c_units(tmp_path):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "unit"
    cmd = [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", f"-I{REPO / 'core' / 'include'}",
           f"-I{SRC}", "-o", str(exe), str(REPO / "tests" / "c" / "test_unit.c"),
           *[str(SRC / s) for s in PURE_SOURCES], "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _unit_binary() -> Path | None:
    candidates = []
    if os.environ.get("VTRIM_UNIT_TESTS"):
        candidates.append(Path(os.environ["VTRIM_UNIT_TESTS"]))
    if os.environ.get("VTRIM_LIBRARY"):
        candidates.append(Path(os.environ["VTRIM_LIBRARY"]).parent / "vtrim-unit-tests")
    cache = Path(os.environ.get("VTRIM_CACHE_DIR", Path.home() / ".cache" / "pyvtrim"))
    candidates.append(cache / "build-ci" / "vtrim-unit-tests")
    return next((c for c in candidates if c.is_file()), None)


def test_kv_cache_units():
    exe = _unit_binary()
    if exe is None:
        pytest.skip("vtrim-unit-tests not built (CMake target; set VTRIM_UNIT_TESTS to its path)")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
