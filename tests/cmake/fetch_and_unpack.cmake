# cmake -DREPO=<repo> -DREQ=<requirement> -DFILE=<file name> -DSHA=<sha256> -DLINKS=<folder> -DFOLDER=<f>
#       -DMARKER=<m> -P fetch_and_unpack.cmake
# What the build does with the ggml archive, on a local file (no network): tests/test_build_cache.py.
include("${REPO}/cmake/pinned_download.cmake")
vtrim_pip_download("${REQ}" "${FILE}" "${SHA}" got "test" ARGS --no-index --find-links "${LINKS}")
vtrim_unpack_once("${got}" "${FOLDER}" "${MARKER}")
message(STATUS "got ${got}")
