#!/usr/bin/env bash
# libFuzzer over pyvtrim's parsers and prefill path (tests/fuzz), with ASan + UBSan.
#
#     tools/fuzz.sh 60                  # every target for 60 s
#     tools/fuzz.sh 600 image prefill   # some targets
#
# Builds the harnesses with clang in $VTRIM_CACHE_DIR/build-fuzz (outside the repository; installs clang with
# apt-get when it is missing and this is root on Debian), writes the seed models and corpora with
# tests/fuzz/make_seeds.py ($PYTHON must import pyvtrim), adds the committed corpus (tests/fuzz/corpus: seeds and
# every input that once found a bug), and runs each target. Findings go to $VTRIM_CACHE_DIR/fuzz/findings/<target>;
# a summary (executions, seconds, result) to $VTRIM_CACHE_DIR/fuzz/summary.json. Exit status 1 on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(image model_load tokenize chat_format prefill)
cache="${VTRIM_CACHE_DIR:-$HOME/.cache/pyvtrim}"
build="$cache/build-fuzz"
work="$cache/fuzz"
python="${PYTHON:-python3}"

cc="$(command -v clang-14 || command -v clang || true)"
if [ -z "$cc" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang-14 libclang-rt-14-dev >/dev/null
        cc="$(command -v clang-14)"
    else
        echo "tools/fuzz.sh needs clang with libFuzzer (Debian: apt-get install clang-14 libclang-rt-14-dev)" >&2
        exit 2
    fi
fi
cxx="${cc/clang/clang++}"

ggml_src="$("$python" - <<'PY'
import os, pathlib
# the archive the pyvtrim build fetched (cmake/fetch_ggml.cmake unpacks it in the cache)
c = pathlib.Path(os.environ.get("VTRIM_CACHE_DIR") or pathlib.Path.home() / ".cache" / "pyvtrim")
print(os.environ.get("VTRIM_GGML_SOURCE") or c / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp")
PY
)"
# a build folder configured from another checkout would build that checkout's sources
if [ -f "$build/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$(pwd -P)" "$build/CMakeCache.txt"; then
    rm -rf "$build"
fi
if [ ! -f "$build/build.ninja" ]; then
    CC="$cc" CXX="$cxx" cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVTRIM_FUZZ=ON \
        -DVTRIM_BUILD_CLI=OFF -DVTRIM_BUILD_TESTS=OFF -DVTRIM_GGML_SOURCE="$ggml_src" >/dev/null
fi
cmake --build "$build" -j "${JOBS:-2}" >/dev/null

seeds="$work/seeds"
"$python" tests/fuzz/make_seeds.py "$seeds"
export VTRIM_FUZZ_VOCAB_SPM="$ggml_src/models/ggml-vocab-llama-spm.gguf"
export VTRIM_FUZZ_VOCAB_BPE="$ggml_src/models/ggml-vocab-llama-bpe.gguf"
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

summary="$work/summary.json"
echo "[" > "$summary"
failed=0
first=1
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t"
    findings="$work/findings/$t"
    mkdir -p "$corpus" "$findings"
    rm -f "$findings"/*
    model=""
    case "$t" in
        image|prefill|tokenize|chat_format) model="$seeds/models/llava-tiny-f32.gguf" ;;
    esac
    max_len=4096
    [ "$t" = model_load ] && max_len=$((512 * 1024))
    log="$work/$t.log"
    set +e
    VTRIM_FUZZ_MODEL="$model" VTRIM_FUZZ_MODEL_TEXT="$seeds/models/llava-tiny-pair.gguf" "$build/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2560 \
        -malloc_limit_mb=1024 -max_len="$max_len" -print_final_stats=1 -artifact_prefix="$findings/" \
        "$corpus" "$seeds/$t" tests/fuzz/corpus/$t >"$log" 2>&1
    rc=$?
    set -e
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    secs="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    result=ok
    if [ "$rc" -ne 0 ]; then
        result="finding (exit $rc): $(ls "$findings" | head -3 | tr '\n' ' ')"
        failed=1
    fi
    echo "$t: ${runs:-0} executions (${secs:-0}/s) in ${seconds} s: $result"
    [ $first = 1 ] || echo "," >> "$summary"
    first=0
    printf '{"target": "%s", "seconds": %s, "executions": %s, "exec_per_s": %s, "result": "%s"}' \
        "$t" "$seconds" "${runs:-0}" "${secs:-0}" "$result" >> "$summary"
done
echo "]" >> "$summary"
exit "$failed"
