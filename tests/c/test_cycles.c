// Load/free and context create/free cycles: nothing may grow. Prints the private resident memory after a
// warm-up and at the end (Linux: /proc/self/statm, resident minus file-backed: the mapped weights are the
// file's pages, which the kernel may drop and fault back in, so they move the resident set without any
// leak) so that a caller can check it is flat; under LeakSanitizer (tools/sanitize.sh) any leak fails the run.
//     vtrim-cycles-test model.gguf [load cycles] [context cycles]
#include "vtrim.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static long rss_kib(void) {
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
    long warm = 0;
    for (int i = 0; i < n_load; i++) {
        struct vtrim_model * m = NULL;
        if (vtrim_model_load(argv[1], NULL, &mp, &m) != 0) {
            fprintf(stderr, "load %d: %s\n", i, vtrim_last_error());
            return 1;
        }
        vtrim_model_free(m);
        if (i == 9) {
            warm = rss_kib();
        }
    }
    const long after_loads = rss_kib();
    struct vtrim_model * m = NULL;
    if (vtrim_model_load(argv[1], NULL, &mp, &m) != 0) {
        return 1;
    }
    long warm_ctx = 0;
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
        }
    }
    const long after_ctx = rss_kib();
    vtrim_model_free(m);
    printf("loads %d: rss %ld KiB after 10, %ld KiB after all\n", n_load, warm, after_loads);
    printf("contexts %d: rss %ld KiB after 10, %ld KiB after all\n", n_ctx, warm_ctx, after_ctx);
    return 0;
}
