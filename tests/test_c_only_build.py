"""The C-only build for small devices (VTRIM_PYTHON=OFF, VTRIM_STATIC=ON): it configures with no Python on
PATH as far as its own download of the ggml archive; that download (cmake/pinned_download.cmake,
vtrim_url_download) verifies the sha256 and keeps only a verified file; `cmake --install` lays out bin/, lib/,
include/; the static vtrim-cli has no dynamic section and libvtrim.a links into a program on its own.

The last three read the static x86-64 build that tools/cross_aarch64.sh keeps in $VTRIM_CACHE_DIR/edge
(.ci/run's step 3 runs the script, then this file again), or the build folder $VTRIM_C_ONLY_BUILD names:
compiling ggml here would take minutes. Without one they skip and say so.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
URL_SCRIPT = REPO / "tests" / "cmake" / "url_download.cmake"
ARCHIVE = "llama_cpp_python-0.3.36.tar.gz"


def _cache_dir() -> Path:
    env = os.environ.get("VTRIM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pyvtrim"


def _cmake() -> str:
    """The cmake binary itself: a `cmake` on PATH may be a Python script (pip's cmake package), which the
    Python-free PATH below could not run."""
    found = shutil.which("cmake")
    if not found:
        pytest.skip("no cmake on PATH (the build itself needs one)")
    r = subprocess.run([found, "-E", "echo", "ok"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cmake does not run: {r.stderr}")
    probe = subprocess.run([found, "-P", "/dev/stdin"], input='message("${CMAKE_COMMAND}")\n',
                           capture_output=True, text=True)
    return probe.stderr.strip() or found


def _is_elf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _run_url_download(cmake: str, cache: Path, url: str, name: str, sha: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VTRIM_CACHE_DIR=str(cache))
    return subprocess.run([cmake, f"-DREPO={REPO}", f"-DURL={url}", f"-DFILE={name}", f"-DSHA={sha}",
                           "-P", str(URL_SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def payload(tmp_path: Path) -> tuple:
    src = tmp_path / "served" / "payload.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(200_000))
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def _leftovers(cache: Path) -> list:
    return [p.name for p in cache.iterdir() if p.name.startswith(".download-")]


def test_url_download_fetches_verifies_and_keeps(tmp_path: Path, payload) -> None:
    cmake = _cmake()
    src, sha = payload
    cache = tmp_path / "cache"
    r = _run_url_download(cmake, cache, src.as_uri(), "kept.bin", sha)
    assert r.returncode == 0, r.stderr
    assert f"fetching {src.as_uri()}" in r.stdout
    assert f"got {cache / 'kept.bin'}" in r.stdout
    assert (cache / "kept.bin").read_bytes() == src.read_bytes()
    assert _leftovers(cache) == []
    # cached: a second build takes it without downloading, even with the source gone
    src.unlink()
    r = _run_url_download(cmake, cache, src.as_uri(), "kept.bin", sha)
    assert r.returncode == 0, r.stderr
    assert "fetching" not in r.stdout and f"got {cache / 'kept.bin'}" in r.stdout


def test_url_download_refuses_a_wrong_sha256(tmp_path: Path, payload) -> None:
    cmake = _cmake()
    src, sha = payload
    cache = tmp_path / "cache"
    wrong = "0" * 64
    r = _run_url_download(cmake, cache, src.as_uri(), "kept.bin", wrong)
    assert r.returncode != 0
    err = " ".join(r.stderr.split())   # CMake wraps long messages
    assert f"sha256 mismatch for kept.bin from {src.as_uri()}: got {sha}, expected {wrong}" in err, r.stderr
    assert not (cache / "kept.bin").exists(), "a file that failed its check must not be kept"
    assert _leftovers(cache) == []


def test_url_download_replaces_a_corrupt_cached_file(tmp_path: Path, payload) -> None:
    cmake = _cmake()
    src, sha = payload
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kept.bin").write_bytes(b"a download cut short")
    r = _run_url_download(cmake, cache, src.as_uri(), "kept.bin", sha)
    assert r.returncode == 0, r.stderr
    assert "wrong sha256; fetching it again" in r.stdout
    assert (cache / "kept.bin").read_bytes() == src.read_bytes()


def test_url_download_names_what_failed(tmp_path: Path) -> None:
    cmake = _cmake()
    url = (tmp_path / "nowhere" / "missing.tar.gz").as_uri()
    r = _run_url_download(cmake, tmp_path / "cache", url, "missing.tar.gz", "0" * 64)
    assert r.returncode != 0
    err = " ".join(r.stderr.split())
    assert f"could not download {url}" in err and "a hint for the user" in err, r.stderr


def _compiled_program(tool: str) -> str | None:
    """The first `tool` on PATH that is a compiled program (pyenv and pip put Python scripts named ninja or
    cmake in front of the real ones)."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.realpath(os.path.join(d or ".", tool))
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK) and _is_elf(candidate):
            return candidate
    return None


def _python_free_path(tmp_path: Path, cmake: str) -> str:
    """A PATH with the compilers, binutils, ninja and cmake (links to the real programs) and no Python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cmake").symlink_to(cmake)
    for tool in ("cc", "c++", "gcc", "g++", "as", "ld", "ar", "ranlib", "nm", "objdump", "strip", "ninja"):
        found = _compiled_program(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    for tool in ("cc", "c++", "ninja"):
        if not (bin_dir / tool).exists():
            pytest.skip(f"no {tool} (a compiled program, not a script) on PATH")
    return str(bin_dir)


def test_configure_needs_no_python(tmp_path: Path) -> None:
    """A plain configure (VTRIM_PYTHON off by default) on a PATH without Python gets to its own download of
    the ggml archive; VTRIM_GGML_SOURCE, when given, wins over the download."""
    cmake = _cmake()
    path = _python_free_path(tmp_path, cmake)
    env = {"PATH": path, "HOME": str(tmp_path / "home"), "VTRIM_CACHE_DIR": str(tmp_path / "cache")}
    assert subprocess.run(["/bin/sh", "-c", "command -v python3 python"], env=env).returncode != 0
    build = tmp_path / "build"
    fake = tmp_path / "served" / ARCHIVE
    fake.parent.mkdir()
    fake.write_bytes(b"not the pinned archive")
    r = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), "-G", "Ninja", f"-DVTRIM_GGML_URL={fake.as_uri()}"],
                       env=env, capture_output=True, text=True, timeout=120)
    err = " ".join(r.stderr.split())
    assert r.returncode != 0
    assert f"fetching {fake.as_uri()}" in r.stdout, r.stdout + r.stderr
    assert f"sha256 mismatch for {ARCHIVE} from {fake.as_uri()}" in err, r.stderr
    cache_txt = (build / "CMakeCache.txt").read_text()
    assert "VTRIM_PYTHON:BOOL=OFF" in cache_txt
    looked = re.findall(r"^(_?Python\w*):", cache_txt, re.M)   # what find_package(Python3) leaves behind
    assert looked == [], f"the C-only configure looked for a Python: {looked}"
    assert not (tmp_path / "cache" / ARCHIVE).exists()

    empty = tmp_path / "not-llama-cpp"
    empty.mkdir()
    r = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), f"-DVTRIM_GGML_SOURCE={empty}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "fetching" not in r.stdout
    assert f"{empty} holds no ggml/CMakeLists.txt" in " ".join(r.stderr.split()), r.stderr


# -- the built tree ---------------------------------------------------------------------------------------

def _edge_build(arch: str = "x86_64") -> Path:
    env = os.environ.get("VTRIM_C_ONLY_BUILD") if arch == "x86_64" else None
    build = Path(env) if env else _cache_dir() / "edge" / f"build-{arch}"
    cache = build / "CMakeCache.txt"
    if not (build / "vtrim-cli").is_file() or not cache.is_file():
        pytest.skip(f"no static C-only build in {build}: tools/cross_aarch64.sh builds it (minutes), "
                    "or set VTRIM_C_ONLY_BUILD to one (-DVTRIM_PYTHON=OFF -DVTRIM_STATIC=ON)")
    text = cache.read_text()
    if "VTRIM_STATIC:BOOL=ON" not in text or "VTRIM_PYTHON:BOOL=OFF" not in text:
        pytest.skip(f"{build} is not a VTRIM_PYTHON=OFF VTRIM_STATIC=ON build")
    return build


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    build = _edge_build()
    prefix = tmp_path_factory.mktemp("prefix")
    r = subprocess.run([_cmake(), "--install", str(build), "--prefix", str(prefix)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return prefix


def test_install_lays_out_bin_lib_include(installed: Path) -> None:
    files = {str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file()}
    # (ggml's rpc-server too in a build with VTRIM_RPC; tools/cross_aarch64.sh builds without)
    assert files - {"bin/vtrim-rpc-server"} == {"bin/vtrim-cli", "bin/vtrim-quantize", "include/vtrim.h",
                                                "lib/libvtrim.a"}, sorted(files)
    assert (installed / "include" / "vtrim.h").read_bytes() == (REPO / "core" / "include" / "vtrim.h").read_bytes()
    r = subprocess.run([str(installed / "bin" / "vtrim-cli"), "--version"], capture_output=True, text=True,
                       env={"PATH": "/nonexistent"}, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("vtrim-cli 0.1.0 (CPU"), r.stdout + r.stderr
    r = subprocess.run([str(installed / "bin" / "vtrim-cli"), "--help"], capture_output=True, text=True, timeout=60)
    assert "--print-tokens" in r.stdout


def _readelf() -> str:
    found = shutil.which("readelf")
    if not found:
        pytest.skip("no readelf (binutils)")
    return found


@pytest.mark.parametrize("arch, machine", [("x86_64", "X86-64"), ("aarch64", "AArch64")])
def test_the_static_program_has_no_dynamic_section(arch: str, machine: str) -> None:
    exe = _edge_build(arch) / "vtrim-cli"
    readelf = _readelf()
    header = subprocess.run([readelf, "-h", str(exe)], capture_output=True, text=True).stdout
    assert machine in header, header
    dyn = subprocess.run([readelf, "-d", str(exe)], capture_output=True, text=True)
    assert "There is no dynamic section in this file." in dyn.stdout, dyn.stdout
    segments = subprocess.run([readelf, "-l", str(exe)], capture_output=True, text=True).stdout
    assert "INTERP" not in segments, "a static program asks for no program interpreter (ld.so)"
    if shutil.which("file"):
        kind = subprocess.run(["file", "-b", str(exe)], capture_output=True, text=True).stdout
        assert "statically linked" in kind, kind


def test_libvtrim_a_links_a_program_on_its_own(installed: Path, tmp_path: Path) -> None:
    """The installed archive holds ggml too: a program needs it, the header and the system's libraries."""
    cc, cxx = shutil.which("cc"), shutil.which("c++")
    if not cc or not cxx:
        pytest.skip("no C/C++ compiler")
    src = tmp_path / "app.c"
    src.write_text('#include "vtrim.h"\n#include <stdio.h>\n'
                   'int main(void) {\n'
                   '    struct vtrim_model * m = NULL;\n'
                   '    struct vtrim_model_params p;\n'
                   '    vtrim_model_params_default(&p);\n'
                   '    int32_t rc = vtrim_model_load("/nonexistent.gguf", NULL, &p, &m);\n'
                   '    printf("%s|%s|%d|%s\\n", vtrim_version(), vtrim_backends(), (int) rc, vtrim_last_error());\n'
                   '    return m == NULL && rc == VTRIM_ERR_IO ? 0 : 1;\n'
                   '}\n')
    obj, exe = tmp_path / "app.o", tmp_path / "app"
    subprocess.run([cc, "-std=c11", "-Wall", "-Werror", "-c", f"-I{installed / 'include'}", str(src), "-o", str(obj)],
                   check=True, timeout=60)
    # the link line the README gives
    r = subprocess.run([cxx, "-static", str(obj), str(installed / "lib" / "libvtrim.a"), "-fopenmp", "-lm",
                        "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    version, backends, rc, message = r.stdout.strip().split("|", 3)
    assert version == "0.1.0" and backends.startswith("CPU") and "/nonexistent.gguf" in message
