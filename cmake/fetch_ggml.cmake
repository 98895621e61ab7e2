# Locates ggml (and stb_image.h, the llama vocabularies) in the pinned llama-cpp-python sdist.
#
# Order: VTRIM_GGML_SOURCE (cache var or env) pointing at an unpacked llama.cpp tree (the folder that
# holds ggml/ and vendor/); else the pinned sdist, fetched once with pip into VTRIM_CACHE_DIR
# (default ~/.cache/pyvtrim), verified by sha256 and unpacked there. Nothing lands in the source tree.

set(VTRIM_LLAMA_CPP_PY_VERSION "0.3.36")
set(VTRIM_LLAMA_CPP_PY_SHA256 "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")

if(NOT VTRIM_GGML_SOURCE AND DEFINED ENV{VTRIM_GGML_SOURCE})
    set(VTRIM_GGML_SOURCE "$ENV{VTRIM_GGML_SOURCE}")
endif()

# The folder that keeps what the build downloads: VTRIM_CACHE_DIR, else $XDG_CACHE_HOME/pyvtrim, else ~/.cache/pyvtrim.
function(vtrim_cache_dir out)
    if(DEFINED ENV{VTRIM_CACHE_DIR})
        set(dir "$ENV{VTRIM_CACHE_DIR}")
    elseif(DEFINED ENV{XDG_CACHE_HOME})
        set(dir "$ENV{XDG_CACHE_HOME}/pyvtrim")
    else()
        set(dir "$ENV{HOME}/.cache/pyvtrim")
    endif()
    file(MAKE_DIRECTORY "${dir}")
    set(${out} "${dir}" PARENT_SCOPE)
endfunction()

if(NOT VTRIM_GGML_SOURCE)
    vtrim_cache_dir(_cache)
    set(_name "llama_cpp_python-${VTRIM_LLAMA_CPP_PY_VERSION}")
    set(_archive "${_cache}/${_name}.tar.gz")
    set(_tree "${_cache}/${_name}")

    if(EXISTS "${_archive}")
        file(SHA256 "${_archive}" _have)
        if(NOT _have STREQUAL VTRIM_LLAMA_CPP_PY_SHA256)
            message(STATUS "pyvtrim: cached ${_archive} has a wrong sha256; fetching it again")
            file(REMOVE "${_archive}")
            file(REMOVE_RECURSE "${_tree}")
        endif()
    endif()
    if(NOT EXISTS "${_archive}")
        if(NOT Python3_EXECUTABLE AND Python_EXECUTABLE)
            set(Python3_EXECUTABLE "${Python_EXECUTABLE}")
        endif()
        find_package(Python3 COMPONENTS Interpreter REQUIRED)
        message(STATUS "pyvtrim: fetching llama-cpp-python==${VTRIM_LLAMA_CPP_PY_VERSION} sdist into ${_cache}")
        file(MAKE_DIRECTORY "${_cache}")
        # --no-build-isolation: pip only reads the sdist's metadata with the scikit-build-core we run under,
        # instead of building cmake from source for an isolated environment.
        execute_process(
            COMMAND "${Python3_EXECUTABLE}" -m pip download --no-deps --no-binary llama-cpp-python
                    --no-build-isolation "llama-cpp-python==${VTRIM_LLAMA_CPP_PY_VERSION}" -d "${_cache}"
            RESULT_VARIABLE _rc)
        if(NOT _rc EQUAL 0)
            # No scikit-build-core where this Python runs: let pip read the metadata in its own environment.
            execute_process(
                COMMAND "${Python3_EXECUTABLE}" -m pip download --no-deps --no-binary llama-cpp-python
                        "llama-cpp-python==${VTRIM_LLAMA_CPP_PY_VERSION}" -d "${_cache}"
                RESULT_VARIABLE _rc)
        endif()
        if(NOT _rc EQUAL 0 OR NOT EXISTS "${_archive}")
            message(FATAL_ERROR "pyvtrim: could not download llama-cpp-python==${VTRIM_LLAMA_CPP_PY_VERSION}; "
                                "set VTRIM_GGML_SOURCE to an unpacked llama.cpp tree")
        endif()
        file(SHA256 "${_archive}" _have)
        if(NOT _have STREQUAL VTRIM_LLAMA_CPP_PY_SHA256)
            file(REMOVE "${_archive}")
            message(FATAL_ERROR "pyvtrim: sha256 mismatch for ${_name}.tar.gz: got ${_have}")
        endif()
    endif()
    if(NOT EXISTS "${_tree}/vendor/llama.cpp/ggml/CMakeLists.txt")
        message(STATUS "pyvtrim: unpacking ${_archive}")
        file(ARCHIVE_EXTRACT INPUT "${_archive}" DESTINATION "${_cache}")
    endif()
    set(VTRIM_GGML_SOURCE "${_tree}/vendor/llama.cpp")
endif()

if(NOT EXISTS "${VTRIM_GGML_SOURCE}/ggml/CMakeLists.txt")
    message(FATAL_ERROR "pyvtrim: ${VTRIM_GGML_SOURCE} holds no ggml/CMakeLists.txt")
endif()
set(VTRIM_GGML_SOURCE "${VTRIM_GGML_SOURCE}" CACHE PATH "llama.cpp tree that provides ggml/ and vendor/stb" FORCE)
message(STATUS "pyvtrim: ggml from ${VTRIM_GGML_SOURCE}")
