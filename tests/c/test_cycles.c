// Load/free and context create/free cycles: nothing may grow. Prints, after a warm-up and at the end, the
// heap bytes in use (glibc's mallinfo2: what a leak grows, byte for byte) and the private resident memory
// (Linux: /proc/self/statm, resident minus file-backed, since the mapped weights are the file's pages), so
// that a caller can check both. The resident set also moves with the allocator's own choices (glibc raises its
// mmap threshold after the first large free, and then keeps freed buffers), by a few MiB with no leak
// (valgrind: 0 bytes lost). Under LeakSanitizer (tools/sanitize.sh) any leak fails the run.
//     vtrim-cycles-test model.gguf [load cycles] [context cycles]
#include "vtrim.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
#include <malloc.h>
#define HAVE_MALLINFO2 1
#endif

// Bytes allocated and not freed (-1 where glibc cannot say).
static long heap_kib(void) {
#if defined(HAVE_MALLINFO2)
    const struct mallinfo2 mi = mallinfo2();
    return (long) ((mi.uordblks + mi.hblkhd) / 1024);
#else
    return -1;
#endif
}

// Private resident KiB, after glibc has given its free pages back (malloc_trim): what glibc keeps for reuse
// (its raised mmap threshold keeps freed compute buffers) is then not counted as growth.
static long rss_kib(void) {
#if defined(HAVE_MALLINFO2)
    malloc_trim(0);
#endif
    long pages = 0, resident = 0, shared = 0;
    FILE * f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld %ld", &pages, &resident, &shared) != 3) {
            resident = shared = 0;
        }
        fclose(f);
    }
    return (resident - shared) * (sysconf(_SC_PAGESIZE) / 1024);
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s model.gguf [load cycles] [context cycles]\n", argv[0]);
        return 2;
    }
    const int n_load = argc > 2 ? atoi(argv[2]) : 1000, n_ctx = argc > 3 ? atoi(argv[3]) : 1000;
    struct vtrim_model_params mp;
    vtrim_model_params_default(&mp);
    mp.device = VTRIM_DEVICE_CPU;
    struct vtrim_context_params cp;
    vtrim_context_params_default(&cp);
    cp.n_ctx = 256;
    cp.n_threads = 1;
    long warm = 0, warm_heap = 0;
    for (int i = 0; i < n_load; i++) {
        struct vtrim_model * m = NULL;
        if (vtrim_model_load(argv[1], NULL, &mp, &m) != 0) {
            fprintf(stderr, "load %d: %s\n", i, vtrim_last_error());
            return 1;
        }
        vtrim_model_free(m);
        if (i == 9) {
            warm = rss_kib();
            warm_heap = heap_kib();
        }
    }
    const long after_loads = rss_kib(), after_loads_heap = heap_kib();
    struct vtrim_model * m = NULL;
    if (vtrim_model_load(argv[1], NULL, &mp, &m) != 0) {
        return 1;
    }
    long warm_ctx = 0, warm_ctx_heap = 0;
    struct vtrim_model_info info;
    vtrim_model_get_info(m, &info);
    const int32_t ids[] = { 1, 100 % info.n_vocab, 200 % info.n_vocab };   // any vocabulary
    for (int i = 0; i < n_ctx; i++) {
        struct vtrim_context * c = NULL;
        if (vtrim_context_init(m, &cp, &c) != 0 || vtrim_prefill(c, ids, 3, NULL, 0) != 0) {
            fprintf(stderr, "context %d: %s\n", i, vtrim_last_error());
            vtrim_context_free(c);
            vtrim_model_free(m);
            return 1;
        }
        vtrim_context_free(c);
        if (i == 9) {
            warm_ctx = rss_kib();
            warm_ctx_heap = heap_kib();
        }
    }
    const long after_ctx = rss_kib(), after_ctx_heap = heap_kib();
    vtrim_model_free(m);
    printf("loads %d: heap %ld KiB after 10, %ld KiB after all; rss %ld KiB after 10, %ld KiB after all\n", n_load,
           warm_heap, after_loads_heap, warm, after_loads);
    printf("contexts %d: heap %ld KiB after 10, %ld KiB after all; rss %ld KiB after 10, %ld KiB after all\n",
           n_ctx, warm_ctx_heap, after_ctx_heap, warm_ctx, after_ctx);
    return 0;
}
