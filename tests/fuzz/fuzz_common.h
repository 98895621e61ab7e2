// What the libFuzzer harnesses share: a model named by an environment variable, loaded once per process,
// and a file on an anonymous memory file (the loader takes paths).
#pragma once

#define _GNU_SOURCE
#include "vtrim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

// The model in $name, loaded once (vocab_only for the tokenizer harness); aborts when it does not load,
// since a harness without its model would fuzz nothing.
static struct vtrim_model * fuzz_model_from_env(const char * name, bool vocab_only) {
    const char * path = getenv(name);
    if (!path || !*path) {
        fprintf(stderr, "set %s to a GGUF file (tools/fuzz.sh does)\n", name);
        abort();
    }
    struct vtrim_model_params mp;
    vtrim_model_params_default(&mp);
    mp.device = VTRIM_DEVICE_CPU;
    mp.vocab_only = vocab_only;
    struct vtrim_model * m = NULL;
    if (vtrim_model_load(path, NULL, &mp, &m) != 0) {
        fprintf(stderr, "%s=%s: %s\n", name, path, vtrim_last_error());
        abort();
    }
    return m;
}

// data as a file; *path receives "/proc/self/fd/N". Returns the descriptor (close it), or -1.
static int fuzz_memfile(const uint8_t * data, size_t size, char * path, size_t n_path) {
    const int fd = memfd_create("fuzz", 0);
    if (fd < 0) {
        return -1;
    }
    size_t off = 0;
    while (off < size) {
        const ssize_t w = write(fd, data + off, size - off);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t) w;
    }
    snprintf(path, n_path, "/proc/self/fd/%d", fd);
    return fd;
}
