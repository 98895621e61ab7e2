#!/usr/bin/env bash
# Everything the CUDA backend should show on a machine with an NVIDIA GPU, in one go (about 10 minutes on an
# H200 with 16 cores): build libvtrim for sm_90, run the parity and method tests on the GPU (a CUDA build picks
# the GPU for device="auto"), and the FastV and peer benchmarks' GPU rows. Results land in $OUT (or bench/results).
#
# The device machine reaches no network, so the ggml archive and the Python packages it lacks travel with the
# checkout, prepared here beforehand (ignored folders named in the device tool's `carry`):
#   .gpu/llama_cpp_python-0.3.36/   the unpacked archive (from ~/.cache/pyvtrim), used as VTRIM_GGML_SOURCE
#   .gpu/wheels/                    cffi, gguf (pip download --only-binary=:all: --python-version 3.12 ...)
#   .gpu/fixtures/                  the test fixtures (VTRIM_FIXTURE_DIR), so they are not rebuilt there
# cuBLAS comes from the machine's nvidia-cublas package (VTRIM_CUBLAS_ROOT below).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
if [ -d .gpu/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VTRIM_GGML_SOURCE="${VTRIM_GGML_SOURCE:-$PWD/.gpu/llama_cpp_python-0.3.36/vendor/llama.cpp}"
export VTRIM_CUBLAS_ROOT="${VTRIM_CUBLAS_ROOT:-$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')}"
[ -d .gpu/fixtures ] && export VTRIM_FIXTURE_DIR="$PWD/.gpu/fixtures"

t0=$SECONDS
cmake -S . -B /tmp/build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DVTRIM_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    > "$out/gpu-build.log" 2>&1
cmake --build /tmp/build-cuda --target vtrim >> "$out/gpu-build.log" 2>&1
echo "CUDA build: $((SECONDS - t0)) s" | tee "$out/gpu-summary.txt"
export VTRIM_LIBRARY=/tmp/build-cuda/libvtrim.so VTRIM_HEADER="$PWD/core/include/vtrim.h"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/gpu-summary.txt"

# Parity with transformers and the methods' references, on the GPU.
python3 -m pytest -q -p no:cacheprovider tests/test_parity_llava.py tests/test_parity_mllama.py \
    tests/test_fastv.py tests/test_trim.py tests/test_ficoco_v.py tests/test_ficoco_l.py tests/test_vlcache.py \
    tests/test_quantize.py tests/test_mmap.py tests/test_api.py 2>&1 | tee "$out/gpu-tests.log" | tail -3
# FastV on the TinyLlama shape, on the GPU.
python3 tools/bench.py --threads 16 --out "$out/fastv-gpu.json" 2>&1 | tail -5 | tee -a "$out/gpu-summary.txt"
