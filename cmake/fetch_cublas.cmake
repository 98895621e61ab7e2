# cuBLAS for ggml's CUDA backend, when the CUDA toolkit on this machine has none (a toolkit with nvcc and cudart
# only, as on our build machines). The pinned nvidia-cublas wheel is fetched once with pip (the C-only build:
# with CMake from VTRIM_CUBLAS_URL) into VTRIM_CACHE_DIR
# (default ~/.cache/pyvtrim), verified by sha256 and unpacked there; its headers and libraries are handed to
# FindCUDAToolkit through its own cache variables, so ggml's `CUDA::cublas` target resolves to them.
# At run time libvtrim finds them through its RPATH: the installed nvidia-cublas package (the `[cuda]` extra)
# next to pyvtrim in site-packages, then the cache folder.

set(VTRIM_CUBLAS_VERSION "13.10.0.20")
set(VTRIM_CUBLAS_WHEEL "nvidia_cublas-${VTRIM_CUBLAS_VERSION}-py3-none-manylinux1_x86_64.manylinux_2_5_x86_64.whl")
set(VTRIM_CUBLAS_SHA256 "dcc6d63884c53d07e267ce7e6feac17b2538cebaafec5db865736c3e28e4dc84")
set(VTRIM_CUBLAS_URL "https://files.pythonhosted.org/packages/b4/12/16628161ed8c109c8c73b38167df50cbc630a8a6e6548e2534d461526c3c/${VTRIM_CUBLAS_WHEEL}"
    CACHE STRING "Where the C-only build (VTRIM_PYTHON=OFF) downloads the pinned nvidia-cublas wheel")

find_package(CUDAToolkit REQUIRED)
if(NOT VTRIM_CUBLAS_ROOT AND DEFINED ENV{VTRIM_CUBLAS_ROOT})
    set(VTRIM_CUBLAS_ROOT "$ENV{VTRIM_CUBLAS_ROOT}")
endif()

if(NOT VTRIM_CUBLAS_ROOT AND CUDA_cublas_LIBRARY)
    # a reconfigure of a build folder whose cuBLAS came from the wheel: its headers are needed again
    get_filename_component(_dir "${CUDA_cublas_LIBRARY}" DIRECTORY)
    get_filename_component(_dir "${_dir}" DIRECTORY)
    if(EXISTS "${_dir}/include/cublas_v2.h" AND NOT EXISTS "${CUDAToolkit_INCLUDE_DIRS}/cublas_v2.h")
        set(VTRIM_CUBLAS_ROOT "${_dir}")
    endif()
endif()

if(NOT CUDA_cublas_LIBRARY AND NOT VTRIM_CUBLAS_ROOT)
    if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux" OR NOT CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
        message(FATAL_ERROR "pyvtrim: the CUDA toolkit has no cuBLAS; install it, or set VTRIM_CUBLAS_ROOT to a "
                            "folder with include/cublas_v2.h and lib/libcublas.so")
    endif()
    if(VTRIM_PYTHON)
        vtrim_pip_download("nvidia-cublas==${VTRIM_CUBLAS_VERSION}" "${VTRIM_CUBLAS_WHEEL}" "${VTRIM_CUBLAS_SHA256}"
                           _wheel "set VTRIM_CUBLAS_ROOT to a cuBLAS folder (include/, lib/)"
                           ARGS --only-binary=:all: --platform manylinux_2_5_x86_64)
    else()
        vtrim_url_download("${VTRIM_CUBLAS_URL}" "${VTRIM_CUBLAS_WHEEL}" "${VTRIM_CUBLAS_SHA256}" _wheel
                           "set VTRIM_CUBLAS_URL to a copy of it, or VTRIM_CUBLAS_ROOT to a cuBLAS folder")
    endif()
    get_filename_component(_cache "${_wheel}" DIRECTORY)
    set(_tree "${_cache}/nvidia-cublas-${VTRIM_CUBLAS_VERSION}")
    if(NOT EXISTS "${_tree}/nvidia/cu13/include/cublas_v2.h")
        file(ARCHIVE_EXTRACT INPUT "${_wheel}" DESTINATION "${_tree}" PATTERNS "nvidia/cu13/include/*" "nvidia/cu13/lib/*")
    endif()
    set(VTRIM_CUBLAS_ROOT "${_tree}/nvidia/cu13")
endif()

if(VTRIM_CUBLAS_ROOT)
    # The wheel ships the versioned sonames only; FindCUDAToolkit takes whatever file its variable names.
    file(GLOB _cublas "${VTRIM_CUBLAS_ROOT}/lib/libcublas.so*")
    file(GLOB _cublaslt "${VTRIM_CUBLAS_ROOT}/lib/libcublasLt.so*")
    if(NOT _cublas OR NOT _cublaslt OR NOT EXISTS "${VTRIM_CUBLAS_ROOT}/include/cublas_v2.h")
        message(FATAL_ERROR "pyvtrim: ${VTRIM_CUBLAS_ROOT} holds no cuBLAS (include/cublas_v2.h, lib/libcublas.so*)")
    endif()
    list(GET _cublas 0 _cublas)
    list(GET _cublaslt 0 _cublaslt)
    set(CUDA_cublas_LIBRARY "${_cublas}" CACHE FILEPATH "cuBLAS" FORCE)
    set(CUDA_cublasLt_LIBRARY "${_cublaslt}" CACHE FILEPATH "cuBLASLt" FORCE)
    include_directories(SYSTEM "${VTRIM_CUBLAS_ROOT}/include")
    set(VTRIM_CUBLAS_LIBDIR "${VTRIM_CUBLAS_ROOT}/lib")
    message(STATUS "pyvtrim: cuBLAS from ${VTRIM_CUBLAS_ROOT}")
endif()
