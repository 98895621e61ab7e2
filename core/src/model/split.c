#include "model/split.h"

#include "api/error.h"

#include "ggml-alloc.h"

#include <stdlib.h>
#include <string.h>

int32_t vtrim_alloc_tensors(ggml_backend_buffer_type_t buft, struct ggml_tensor ** tensors, int64_t n,
                            const char * what, ggml_backend_buffer_t * out) {
    *out = NULL;
    if (n == 0) {
        return 0;
    }
    const size_t align = ggml_backend_buft_get_alignment(buft);
    size_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, tensors[i]), align);
    }
    const size_t max = ggml_backend_buft_get_max_size(buft);
    if (total > max) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "%s: %.1f MiB do not fit one buffer of %s (at most %.1f MiB)",
                          what, total / 1048576.0, ggml_backend_buft_name(buft), max / 1048576.0);
    }
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, total);
    if (!buf) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of %s on %s", total / 1048576.0,
                          what, ggml_backend_buft_name(buft));
    }
    struct ggml_tallocr ta = ggml_tallocr_new(buf);
    for (int64_t i = 0; i < n; i++) {
        if (ggml_tallocr_alloc(&ta, tensors[i]) != GGML_STATUS_SUCCESS) {
            ggml_backend_buffer_free(buf);
            return vtrim_fail(VTRIM_ERR_BACKEND, "cannot place '%s' in its buffer", ggml_get_name(tensors[i]));
        }
    }
    *out = buf;
    return 0;
}

int32_t vtrim_tensor_layer(const char * name) {
    if (strncmp(name, "blk.", 4) != 0) {
        return -1;
    }
    char * end = NULL;
    const long il = strtol(name + 4, &end, 10);
    return end != name + 4 && *end == '.' && il >= 0 && il < INT32_MAX ? (int32_t) il : -1;
}
