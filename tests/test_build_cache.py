"""The build's download cache (cmake/pinned_download.cmake) when several builds share it: concurrent builds
each get the verified file and one complete unpacked tree, a build waits for another's lock, and a broken
earlier unpack is redone. Run on a local wheel through pip's --find-links, the way the build fetches the ggml
archive, so no network is needed."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "cmake" / "fetch_and_unpack.cmake"
WHEEL = "vtrimfake-1.0-py3-none-any.whl"


def _cmake() -> str:
    found = shutil.which("cmake")
    if not found:
        pytest.skip("no cmake on PATH (the build itself needs one)")
    return found


@pytest.fixture()
def wheel(tmp_path: Path) -> tuple:
    links = tmp_path / "links"
    links.mkdir()
    path = links / WHEEL
    with zipfile.ZipFile(path, "w") as z:
        for i in range(50):   # big enough that an interleaved write would show
            z.writestr(f"vtrimfake/part{i}.py", f"X = {i!r}\n" + "# padding\n" * 2000)
        z.writestr("vtrimfake/__init__.py", "")
        z.writestr("vtrimfake-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: vtrimfake\nVersion: 1.0\n")
        z.writestr("vtrimfake-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("vtrimfake-1.0.dist-info/RECORD", "")
    return links, hashlib.sha256(path.read_bytes()).hexdigest()


def _start(cmake: str, cache: Path, links: Path, sha: str) -> subprocess.Popen:
    env = dict(os.environ, VTRIM_CACHE_DIR=str(cache))
    args = [cmake, f"-DREPO={REPO}", "-DREQ=vtrimfake==1.0", f"-DFILE={WHEEL}", f"-DSHA={sha}", f"-DLINKS={links}",
            "-DFOLDER=vtrimfake", "-DMARKER=__init__.py", f"-DPython3_EXECUTABLE={sys.executable}", "-P", str(SCRIPT)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_cache(cache: Path, links: Path) -> None:
    assert (cache / WHEEL).read_bytes() == (links / WHEEL).read_bytes()
    assert sorted(p.name for p in (cache / "vtrimfake").iterdir()) == sorted(
        ["__init__.py"] + [f"part{i}.py" for i in range(50)])
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith((".download-", ".unpack-"))]
    assert leftovers == []


def test_concurrent_builds_share_the_cache(tmp_path: Path, wheel) -> None:
    cmake = _cmake()
    links, sha = wheel
    cache = tmp_path / "cache"
    procs = [_start(cmake, cache, links, sha) for _ in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    assert sum("fetching vtrimfake" in o for o in outs) == 1, "exactly one build downloads"
    assert sum("unpacking" in o for o in outs) == 1, "exactly one build unpacks"
    _check_cache(cache, links)


def test_a_build_waits_for_the_lock(tmp_path: Path, wheel) -> None:
    cmake = _cmake()
    links, sha = wheel
    cache = tmp_path / "cache"
    cache.mkdir()
    with open(cache / f".{WHEEL}.lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)   # another build holds it (CMake's file(LOCK) is an fcntl lock)
        p = _start(cmake, cache, links, sha)
        time.sleep(3)
        assert p.poll() is None, "the build went on without the lock"
        assert not (cache / WHEEL).exists()
        fcntl.lockf(lock, fcntl.LOCK_UN)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    _check_cache(cache, links)


def test_a_broken_unpack_is_redone_and_a_bad_file_fetched_again(tmp_path: Path, wheel) -> None:
    cmake = _cmake()
    links, sha = wheel
    cache = tmp_path / "cache"
    (cache / "vtrimfake").mkdir(parents=True)
    (cache / "vtrimfake" / "part0.py").write_text("half of an earlier unpack")
    (cache / WHEEL).write_bytes(b"a download cut short")
    p = _start(cmake, cache, links, sha)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    assert "wrong sha256" in out
    _check_cache(cache, links)
    assert (cache / "vtrimfake" / "part0.py").read_text().startswith("X = 0")
