#!/usr/bin/env bash
# pyvtrim's code under AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer for the C programs).
#
#     tools/sanitize.sh            # the C tests, then the pytest subset below
#     tools/sanitize.sh all        # the C tests, then the whole pytest suite (slow: ~3x the plain run)
#
# Builds in $VTRIM_CACHE_DIR/build-asan with -DVTRIM_SANITIZE=address,undefined (pyvtrim's sources; ggml's
# kernels stay uninstrumented). The C programs run with leak detection on. Python loads the instrumented
# library with the ASan runtime preloaded and leak detection off (CPython itself keeps memory until exit);
# any ASan or UBSan report aborts the test process and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${VTRIM_CACHE_DIR:-$HOME/.cache/pyvtrim}"
build="$cache/build-asan"
python="${PYTHON:-python3}"
cc="${CC:-cc}"

ggml_src="$("$python" -c 'import os, pathlib; c = pathlib.Path(os.environ.get("VTRIM_CACHE_DIR") or pathlib.Path.home() / ".cache" / "pyvtrim"); print(os.environ.get("VTRIM_GGML_SOURCE") or c / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp")')"
# a build folder configured from another checkout would build that checkout's sources
if [ -f "$build/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$(pwd -P)" "$build/CMakeCache.txt"; then
    rm -rf "$build"
fi
if [ ! -f "$build/build.ninja" ]; then
    CC="$cc" cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVTRIM_SANITIZE=address,undefined \
        -DVTRIM_GGML_SOURCE="$ggml_src" >/dev/null
fi
cmake --build "$build" -j "${JOBS:-2}" >/dev/null

export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# a tiny LLaVA from the converter (tests/fuzz/make_seeds.py: no torch needed)
"$python" tests/fuzz/make_seeds.py "$cache/sanitize-seeds" >/dev/null
fixture="$cache/sanitize-seeds/models/llava-tiny-f32.gguf"
echo "== C unit tests"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" "$build/vtrim-unit-tests"
echo "== four threads, four contexts"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" "$build/vtrim-concurrency-test" "$fixture"
echo "== 100 load and 100 context cycles under LeakSanitizer"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" "$build/vtrim-cycles-test" "$fixture" 100 100

echo "== pytest against the instrumented library"
preload="$("$cc" -print-file-name=libasan.so)"
ubsan="$("$cc" -print-file-name=libubsan.so)"
subset=(tests/test_errors.py tests/test_hostile_files.py tests/test_misuse.py tests/test_image.py
        tests/test_tokenizer.py tests/test_fastv.py tests/test_fastv_stages.py tests/test_trim.py tests/test_threads.py
        tests/test_api.py)
[ "${1:-}" = all ] && subset=(tests)
# Python's own allocations are not ours to judge: no leak report at exit; everything else aborts.
LD_PRELOAD="$preload:$ubsan" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1" \
    VTRIM_LIBRARY="$build/libvtrim.so" VTRIM_UNIT_TESTS="$build/vtrim-unit-tests" \
    "$python" -m pytest -q -p no:cacheprovider "${subset[@]}" \
    --deselect "tests/test_tokenizer.py::test_tokenizing_is_fast"   # its time bounds are for the plain build
