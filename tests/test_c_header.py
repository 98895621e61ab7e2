"""The public header: plain C11 and C++17 without warnings, a cffi section cffi can parse, and the
status codes pyvtrim.errors mirrors equal to the header's.

Like llama.cpp's tests/test-c.c, this catches C++ (or compiler extensions) leaking into the C API.
The C file is generated from the header itself, so a new struct or function is covered without
editing this test: every struct is declared (a pointer for the opaque ones), every function's
address is taken, and every status code is checked with a static assertion.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cffi
import pytest

from pyvtrim import _ffi, errors

HEADER = Path(__file__).resolve().parents[1] / "core" / "include" / "vtrim.h"
STATUS_CODES = {name: value for name, value in vars(errors).items()
                if re.fullmatch(r"(OK|ERR_[A-Z_]+)", name) and isinstance(value, int)}


def _section() -> str:
    return _ffi.cdef_source(HEADER.read_text(encoding="utf-8"))


def _ffi_of_header() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(_section())
    return ffi


def _function_names() -> list[str]:
    return re.findall(r"\b(vtrim_\w+)\s*\(", _section())


def _struct_names(ffi: cffi.FFI) -> tuple[list[str], list[str]]:
    """(complete, opaque) struct names."""
    complete, opaque = [], []
    for name in ffi.list_types()[1]:
        (complete if ffi.typeof(f"struct {name}").fields is not None else opaque).append(name)
    return complete, opaque


def _usage_source() -> str:
    ffi = _ffi_of_header()
    complete, opaque = _struct_names(ffi)
    lines = ['#include "vtrim.h"', ""]
    lines += [f'_Static_assert(VTRIM_{name} == {value}, "VTRIM_{name}");' for name, value in STATUS_CODES.items()]
    lines += ["", "int main(void) {"]
    lines += [f"    struct {name} v_{name}; (void)v_{name};" for name in complete]
    lines += [f"    struct {name} * p_{name} = 0; (void)p_{name};" for name in opaque]
    lines += [f"    enum {name} e_{name}; (void)e_{name};" for name in re.findall(r"\benum\s+(\w+)\s*\{", _section())]
    lines += [f"    (void)&{fn};" for fn in _function_names()]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@pytest.mark.parametrize("lang", ["c11", "c++17"])
def test_header_compiles_cleanly(tmp_path: Path, lang: str) -> None:
    compiler = shutil.which("cc" if lang == "c11" else "c++")
    if compiler is None:
        pytest.skip(f"no {lang} compiler")
    src = _usage_source()
    if lang == "c++17":
        src = src.replace("_Static_assert", "static_assert")
    path = tmp_path / ("use_header.c" if lang == "c11" else "use_header.cpp")
    path.write_text(src)
    cmd = [compiler, f"-std={lang}", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only",
           f"-I{HEADER.parent}", str(path)]
    # Both with and without the shared-library export macro the build defines.
    for defines in ([], ["-DVTRIM_SHARED"]):
        r = subprocess.run(cmd + defines, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd + defines)}\n{r.stderr}\n--- source ---\n{src}"


def test_cffi_section_parses() -> None:
    section = _section()
    assert not re.search(r"^\s*#", section, re.M), "the cffi section must hold no preprocessor lines"
    ffi = _ffi_of_header()
    complete, opaque = _struct_names(ffi)
    assert {"vtrim_model", "vtrim_context", "vtrim_image", "vtrim_sampler"} <= set(opaque)
    assert {"vtrim_model_params", "vtrim_context_params", "vtrim_model_info", "vtrim_sampler_params",
            "vtrim_stats"} <= set(complete)
    package = Path(_ffi.__file__).parent
    used = {name for f in package.glob("*.py") for name in re.findall(r"\blib\.(vtrim_\w+)", f.read_text())}
    assert used and used <= set(_function_names()), f"pyvtrim calls undeclared functions: {used - set(_function_names())}"


def test_status_codes_match_errors_module() -> None:
    status = _ffi_of_header().typeof("enum vtrim_status").relements
    assert {f"VTRIM_{k}": v for k, v in STATUS_CODES.items()} == status


def test_stats_and_info_fields_are_what_the_api_documents() -> None:
    ffi = _ffi_of_header()
    stats = {name for name, _ in ffi.typeof("struct vtrim_stats").fields}
    assert {"n_past", "n_prompt_tokens", "n_images", "n_image_tokens", "n_image_tokens_kept",
            "kv_cache_bytes", "t_encode_ms", "t_prefill_ms", "t_decode_ms", "n_decoded"} <= stats
    info = {name for name, _ in ffi.typeof("struct vtrim_model_info").fields}
    assert {"arch", "n_vocab", "image_size", "n_image_tokens", "image_token_id", "bos_token_id",
            "eos_token_id"} <= info


def test_library_exports_every_declared_function() -> None:
    try:
        binding = _ffi.get()
    except errors.VtrimLibraryError as e:
        pytest.skip(f"libvtrim not built: {e}")
    missing = [fn for fn in _function_names() if not hasattr(binding.lib, fn)]
    assert not missing, f"declared in vtrim.h but not exported by {binding.library_path}: {missing}"
