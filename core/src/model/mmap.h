// Weight files mapped read-only into memory (llama.cpp's default on the CPU): the page cache holds the
// weights once for every process that maps them, and loading reads nothing until a page is touched.
#pragma once

#include <stddef.h>
#include <stdint.h>

struct vtrim_mapping {
    void * addr;
    size_t size;
};

// The whole of path, read-only, prefetched. VTRIM_ERR_UNSUPPORTED where the platform has no mmap (the caller
// then reads the file), VTRIM_ERR_IO when the map fails.
int32_t vtrim_map_file(const char * path, struct vtrim_mapping * out);
void    vtrim_unmap(struct vtrim_mapping * m);
