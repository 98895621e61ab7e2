#include "model/mmap.h"

#include "api/error.h"

#include <string.h>
#if !defined(_WIN32)
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

int32_t vtrim_map_file(const char * path, struct vtrim_mapping * out) {
    memset(out, 0, sizeof *out);
#if defined(_WIN32)
    (void) path;
    return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "memory-mapped weights are not built for Windows");
#else
    const int fd = open(path, O_RDONLY);
    if (fd < 0) {
        return vtrim_fail(VTRIM_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0) {
        close(fd);
        return vtrim_fail(VTRIM_ERR_IO, "cannot map '%s': empty or unreadable", path);
    }
    int flags = MAP_SHARED;
#if defined(MAP_POPULATE)
    flags |= MAP_POPULATE;   // read ahead now, as llama.cpp does: the first decode step then faults nothing
#endif
    void * addr = mmap(NULL, (size_t) st.st_size, PROT_READ, flags, fd, 0);
    const int err = errno;
    close(fd);   // the mapping keeps the file
    if (addr == MAP_FAILED) {
        return vtrim_fail(VTRIM_ERR_IO, "cannot map '%s': %s", path, strerror(err));
    }
    out->addr = addr;
    out->size = (size_t) st.st_size;
    return 0;
#endif
}

void vtrim_unmap(struct vtrim_mapping * m) {
#if !defined(_WIN32)
    if (m->addr) {
        munmap(m->addr, m->size);
    }
#endif
    memset(m, 0, sizeof *m);
}
