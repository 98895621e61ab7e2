# cmake -DREPO=<repo> -DURL=<url> -DFILE=<file name in the cache> -DSHA=<sha256> -P url_download.cmake
# What the C-only build (VTRIM_PYTHON=OFF) does with the ggml archive, on a file:// URL (no network):
# tests/test_c_only_build.py. The cache folder comes from VTRIM_CACHE_DIR, as in the build.
include("${REPO}/cmake/pinned_download.cmake")
vtrim_url_download("${URL}" "${FILE}" "${SHA}" got "a hint for the user")
message(STATUS "got ${got}")
