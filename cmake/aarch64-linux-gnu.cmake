# Cross-compiling for 64-bit ARM Linux with Debian's cross toolchain (gcc-aarch64-linux-gnu,
# g++-aarch64-linux-gnu), e.g. the static vtrim-cli of tools/cross_aarch64.sh:
#
#   cmake -S . -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DVTRIM_STATIC=ON
#
# The compilers can be named otherwise with -DVTRIM_CROSS_PREFIX=... (the part before gcc, e.g. another
# vendor's aarch64-none-linux-gnu-). ggml sees a cross build and does not compile for the build machine's CPU
# (GGML_NATIVE off): the code targets armv8-a with NEON, which every 64-bit ARM core has;
# -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod (for example) targets a newer core.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT VTRIM_CROSS_PREFIX)
    set(VTRIM_CROSS_PREFIX aarch64-linux-gnu-)
endif()
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES VTRIM_CROSS_PREFIX)   # the compiler checks' own projects
set(CMAKE_C_COMPILER ${VTRIM_CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${VTRIM_CROSS_PREFIX}g++)

# Libraries and headers from the target's root only (Debian puts them in /usr/aarch64-linux-gnu), programs
# (ninja, the host's tools) from the build machine.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# try_run and ctest run the target's programs under qemu-user when it is there (Debian's qemu-user).
find_program(VTRIM_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static)
if(VTRIM_QEMU_AARCH64)
    set(CMAKE_CROSSCOMPILING_EMULATOR ${VTRIM_QEMU_AARCH64} -L /usr/aarch64-linux-gnu)
endif()
