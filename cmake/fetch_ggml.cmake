# Locates ggml (and stb_image.h, the llama vocabularies) in the pinned llama-cpp-python sdist.
#
# Order: VTRIM_GGML_SOURCE (cache var or env) pointing at an unpacked llama.cpp tree (the folder that
# holds ggml/ and vendor/); else the pinned sdist, fetched once into VTRIM_CACHE_DIR (default
# ~/.cache/pyvtrim), verified by sha256 and unpacked there. Nothing lands in the source tree.
# The Python build (VTRIM_PYTHON) fetches it with pip, which honours the user's index and proxy settings;
# the C-only build downloads the same file from VTRIM_GGML_URL with CMake itself, so it needs no Python.

set(VTRIM_LLAMA_CPP_PY_VERSION "0.3.36")
set(VTRIM_LLAMA_CPP_PY_SHA256 "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
# PyPI's address of that sdist (the simple index's link; the sha256 above is checked whatever the URL).
set(VTRIM_GGML_URL "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-${VTRIM_LLAMA_CPP_PY_VERSION}.tar.gz"
    CACHE STRING "Where the C-only build (VTRIM_PYTHON=OFF) downloads the pinned sdist (https://, file://)")

if(NOT VTRIM_GGML_SOURCE AND DEFINED ENV{VTRIM_GGML_SOURCE})
    set(VTRIM_GGML_SOURCE "$ENV{VTRIM_GGML_SOURCE}")
endif()

include("${CMAKE_CURRENT_LIST_DIR}/pinned_download.cmake")

if(NOT VTRIM_GGML_SOURCE)
    set(_name "llama_cpp_python-${VTRIM_LLAMA_CPP_PY_VERSION}")
    if(VTRIM_PYTHON)
        # --no-build-isolation: pip only reads the sdist's metadata with the scikit-build-core we run under,
        # instead of building cmake from source for an isolated environment; without one where this Python runs,
        # pip reads the metadata in its own environment.
        vtrim_pip_download("llama-cpp-python==${VTRIM_LLAMA_CPP_PY_VERSION}" "${_name}.tar.gz"
                           "${VTRIM_LLAMA_CPP_PY_SHA256}" _archive "set VTRIM_GGML_SOURCE to an unpacked llama.cpp tree"
                           ARGS --no-binary llama-cpp-python --no-build-isolation
                           FALLBACK_ARGS --no-binary llama-cpp-python)
    else()
        set(_hint "set VTRIM_GGML_URL to a reachable copy of ${_name}.tar.gz (file:// works), or VTRIM_GGML_SOURCE")
        string(APPEND _hint " to an unpacked llama.cpp tree")
        vtrim_url_download("${VTRIM_GGML_URL}" "${_name}.tar.gz" "${VTRIM_LLAMA_CPP_PY_SHA256}" _archive "${_hint}")
    endif()
    get_filename_component(_cache "${_archive}" DIRECTORY)
    vtrim_unpack_once("${_archive}" "${_name}" "vendor/llama.cpp/ggml/CMakeLists.txt")
    set(VTRIM_GGML_SOURCE "${_cache}/${_name}/vendor/llama.cpp")
endif()

if(NOT EXISTS "${VTRIM_GGML_SOURCE}/ggml/CMakeLists.txt")
    message(FATAL_ERROR "pyvtrim: ${VTRIM_GGML_SOURCE} holds no ggml/CMakeLists.txt")
endif()
set(VTRIM_GGML_SOURCE "${VTRIM_GGML_SOURCE}" CACHE PATH "llama.cpp tree that provides ggml/ and vendor/stb" FORCE)
message(STATUS "pyvtrim: ggml from ${VTRIM_GGML_SOURCE}")
