#!/usr/bin/env bash
# Builds libvtrim with ggml's CUDA backend (one architecture, sm_90 unless CUDAARCHS says otherwise) on a machine
# with nvcc but without a GPU, and checks what such a build must do there: link no libcuda (the driver), load,
# name CUDA among its backends, run on the CPU with device="auto", and refuse device="gpu" with a clear error.
#
#   tools/check_cuda_build.sh            # build dir: $VTRIM_CACHE_DIR/build-cuda (kept: a rerun is incremental)
#
# Needs: nvcc (CUDA 13), a C/C++ compiler, CMake, and a Python with pyvtrim's dependencies (numpy, cffi, gguf,
# Pillow). cuBLAS is fetched by cmake/fetch_cublas.cmake when the toolkit has none. On a machine with a GPU the
# same script runs the GPU checks too (see tools/gpu_run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${VTRIM_CACHE_DIR:-$HOME/.cache/pyvtrim}"
build="$cache/build-cuda"
jobs="${JOBS:-$(nproc)}"

t0=$SECONDS
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DVTRIM_CUDA=ON ${CUDAARCHS:+-DCMAKE_CUDA_ARCHITECTURES=$CUDAARCHS}
cmake --build "$build" -j "$jobs" --target vtrim
echo "built in $((SECONDS - t0)) s"

lib="$build/libvtrim.so"
if ldd "$lib" | grep -q 'libcuda\.so'; then
    echo "FAIL: $lib links libcuda.so (the driver); it would not load without one" >&2
    exit 1
fi
ldd "$lib" | grep -E 'cublas|cudart'

VTRIM_LIBRARY="$lib" VTRIM_HEADER="$PWD/core/include/vtrim.h" PYTHONPATH="$PWD" "${PYTHON:-python3}" - <<'PY'
import os, tempfile
import numpy as np
import pyvtrim
from pyvtrim import _ffi
from pyvtrim.demo import write_demo_model, DEMO_CONFIG

backends = _ffi.backends()
print("backends:", backends)
assert "CUDA" in backends, backends
path = write_demo_model()
with pyvtrim.Model(path, n_ctx=1024, device="auto") as m:
    print("device=auto:", repr(m.chat(np.zeros((32, 32, 3), np.uint8), "What is it?", max_tokens=2)))
gpu_visible = os.environ.get("VTRIM_EXPECT_GPU") == "1"
try:
    with pyvtrim.Model(path, n_ctx=1024, device="gpu") as m:
        assert gpu_visible, "device='gpu' loaded without a GPU"
        print("device=gpu: loaded")
except pyvtrim.VtrimUnsupportedError as e:
    assert not gpu_visible, e
    print("device=gpu refused:", e)
    assert "no GPU" in str(e), e
PY
echo "check_cuda_build: OK"
