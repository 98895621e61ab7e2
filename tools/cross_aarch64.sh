#!/usr/bin/env bash
# The C-only build for small devices, end to end: a static vtrim-cli for x86-64 and one cross-compiled for
# aarch64 (64-bit ARM), both chatting with the same tiny model, image and questions with greedy decoding;
# the aarch64 program runs under qemu-user. Their generated token ids must be identical (2 turns x 24 tokens).
#
#     tools/cross_aarch64.sh            # exit 0: identical; 1: they differ (both outputs are printed)
#
# Needs: CMake, Ninja, Debian's gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu and qemu-user (each installed with
# apt-get when missing and this is root on Debian, as tools/fuzz.sh does with clang), and $PYTHON with
# pyvtrim's dependencies to write the tiny model (tests/fuzz/make_seeds.py: the converter, no torch). The
# builds themselves need no Python: VTRIM_PYTHON=OFF, the pinned ggml archive downloaded by CMake.
# The build trees, the archive and the model are kept in $VTRIM_CACHE_DIR/edge (default ~/.cache/pyvtrim/edge),
# outside the repository, so a rerun only relinks what changed. A summary (sizes, times, tokens) goes to
# $VTRIM_CACHE_DIR/edge/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"
cache="${VTRIM_CACHE_DIR:-$HOME/.cache/pyvtrim}"
edge="$cache/edge"
python="${PYTHON:-python3}"
jobs="${JOBS:-2}"
n_predict=24
archive_name="llama_cpp_python-0.3.36.tar.gz"
mkdir -p "$edge"
t_start=$SECONDS

# -- the Debian packages --------------------------------------------------------------------------------
qemu="$(command -v qemu-aarch64 || command -v qemu-aarch64-static || true)"
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
[ -n "$qemu" ] || missing+=(qemu-user)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v cmake >/dev/null || missing+=(cmake)   # bookworm's is 3.25; the build needs >= 3.21
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # a machine whose package lists were never fetched (a fresh container) needs them first
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null &&
              apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
        qemu="$(command -v qemu-aarch64 || command -v qemu-aarch64-static)"
    else
        echo "tools/cross_aarch64.sh needs ${missing[*]} (Debian: apt-get install ${missing[*]})" >&2
        exit 2
    fi
fi

# -- the two static builds --------------------------------------------------------------------------------
# The archive: in edge/ once; from the main cache's verified copy when there is one (a file:// URL, checked
# by sha256 like a download), else from PyPI.
url=()
if [ ! -f "$edge/$archive_name" ] && [ -f "$cache/$archive_name" ]; then
    url=(-DVTRIM_GGML_URL="file://$cache/$archive_name")
fi
build() {   # build <folder> [cmake args...]: configure once, then an incremental build of the default targets
    local dir="$1"
    shift
    # a build folder configured from another checkout would build that checkout's sources
    if [ -f "$dir/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$repo" "$dir/CMakeCache.txt"; then
        rm -rf "$dir"
    fi
    if [ ! -f "$dir/build.ninja" ]; then
        VTRIM_CACHE_DIR="$edge" cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVTRIM_PYTHON=OFF \
            -DVTRIM_STATIC=ON -DVTRIM_RPC=OFF -DVTRIM_BUILD_TESTS=OFF "${url[@]}" "$@" >"$dir.configure.log" 2>&1 ||
            { cat "$dir.configure.log" >&2; exit 1; }
    fi
    VTRIM_CACHE_DIR="$edge" cmake --build "$dir" -j "$jobs" >"$dir.build.log" 2>&1 ||
        { tail -50 "$dir.build.log" >&2; exit 1; }
}
x86="$edge/build-x86_64"
arm="$edge/build-aarch64"
t0=$SECONDS
build "$x86"
t_x86=$((SECONDS - t0))
t0=$SECONDS
build "$arm" -DCMAKE_TOOLCHAIN_FILE="$repo/cmake/aarch64-linux-gnu.cmake"
t_arm=$((SECONDS - t0))
strip -o "$x86/vtrim-cli.stripped" "$x86/vtrim-cli"
aarch64-linux-gnu-strip -o "$arm/vtrim-cli.stripped" "$arm/vtrim-cli"
for exe in "$x86/vtrim-cli" "$arm/vtrim-cli"; do
    # a static program has no dynamic section (no loader, no .so needed on the device)
    if ! readelf -d "$exe" 2>&1 | grep -q "no dynamic section"; then
        echo "FAIL: $exe is dynamically linked:" >&2
        readelf -d "$exe" | grep NEEDED >&2 || true
        exit 1
    fi
done
readelf -h "$arm/vtrim-cli" | grep -q "AArch64" ||
    { echo "FAIL: $arm/vtrim-cli is not an AArch64 program" >&2; exit 1; }

# -- one tiny model, one image, the same two questions -----------------------------------------------------
# written again only when its writer changed (the converter, the demo's tensors): Python's start-up and the
# writer are most of a warm run
model="$edge/seeds/models/llava-tiny-f32.gguf"
stamp="$(cat tests/fuzz/make_seeds.py pyvtrim/demo.py pyvtrim/conversion/*.py | sha256sum | cut -c1-16)"
if [ ! -f "$model" ] || [ "$(cat "$edge/seeds.stamp" 2>/dev/null)" != "$stamp" ]; then
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" tests/fuzz/make_seeds.py "$edge/seeds" >/dev/null
    echo "$stamp" >"$edge/seeds.stamp"
fi
image="$edge/picture.ppm"
# a 40 x 30 colour gradient as a binary PPM (stb_image reads it in C; written here without Python)
pixels=""
for ((y = 0; y < 30; y++)); do
    for ((x = 0; x < 40; x++)); do
        printf -v px '\\%03o\\%03o\\%03o' $((x * 6)) $((y * 8)) $((x * y % 256))
        pixels+="$px"
    done
done
printf 'P6\n40 30\n255\n%b' "$pixels" >"$image"
questions=$'What is in the picture?\nAnd what colour is it?\n'
chat() {   # chat <name> <program...>: the interactive chat, two turns, token ids on stderr
    local name="$1"
    shift
    "$@" -m "$model" --image "$image" -n "$n_predict" -t 1 -c 512 --temp 0 --print-tokens \
        <<<"$questions" >"$edge/$name.out" 2>"$edge/$name.err" || { cat "$edge/$name.err" >&2; exit 1; }
    # one line per answer (in interactive mode after the "> " prompt)
    grep -o 'tokens:[0-9 ]*' "$edge/$name.err" >"$edge/$name.tokens" || true
}
t0=$SECONDS
chat x86_64 "$x86/vtrim-cli"
t_run_x86=$((SECONDS - t0))
t0=$SECONDS
chat aarch64 "$qemu" -L /usr/aarch64-linux-gnu "$arm/vtrim-cli"
t_run_arm=$((SECONDS - t0))

size() { stat -c %s "$1"; }
counts="$(awk '{ printf "%s%d", (NR > 1 ? "+" : ""), NF - 1 }' "$edge/x86_64.tokens")"
{
    echo "static vtrim-cli x86_64:  $(size "$x86/vtrim-cli") bytes ($(size "$x86/vtrim-cli.stripped") stripped)"
    echo "static vtrim-cli aarch64: $(size "$arm/vtrim-cli") bytes ($(size "$arm/vtrim-cli.stripped") stripped)"
    echo "builds: x86_64 ${t_x86} s, aarch64 ${t_arm} s;" \
         "chats: x86_64 ${t_run_x86} s, aarch64 under qemu ${t_run_arm} s"
    echo "tokens per turn: $counts"
} | tee "$edge/summary.txt"
if [ "$(wc -l <"$edge/x86_64.tokens")" -ne 2 ] || ! cmp -s "$edge/x86_64.tokens" "$edge/aarch64.tokens" ||
   ! cmp -s "$edge/x86_64.out" "$edge/aarch64.out"; then
    echo "FAIL: the aarch64 build answers otherwise than the x86_64 build" >&2
    echo "--- x86_64"; cat "$edge/x86_64.tokens" "$edge/x86_64.out"
    echo "--- aarch64"; cat "$edge/aarch64.tokens" "$edge/aarch64.out"
    exit 1
fi
echo "identical greedy tokens on x86_64 and aarch64 (qemu), 2 turns: $counts tokens" | tee -a "$edge/summary.txt"
echo "tools/cross_aarch64.sh: $((SECONDS - t_start)) s"
