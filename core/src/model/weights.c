// Weight lookup by name and shape: the one way architectures bind their tensors, so that a file with a
// missing or misshapen weight fails with its name instead of crashing in a graph.
#include "model/model.h"

#include "api/error.h"

#include <stdarg.h>
#include <stdio.h>

int32_t vtrim_model_tensor(const struct vtrim_model * m, const char * name, int64_t ne0, int64_t ne1, int64_t ne2,
                           struct ggml_tensor ** out) {
    struct ggml_tensor * t = ggml_get_tensor(m->ctx_w, name);
    *out = NULL;
    if (!t) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "missing tensor '%s'", name);
    }
    const int64_t want[3] = { ne0, ne1, ne2 };
    for (int i = 0; i < 3; i++) {
        if (want[i] >= 0 && t->ne[i] != want[i]) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld, %lld]",
                              name, (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
                              (long long) t->ne[3], (long long) ne0, (long long) ne1, (long long) ne2);
        }
    }
    *out = t;
    return 0;
}

int32_t vtrim_model_tensorf(const struct vtrim_model * m, struct ggml_tensor ** out, int64_t ne0, int64_t ne1,
                            const char * fmt, ...) {
    char name[GGML_MAX_NAME + 32];
    va_list ap;
    va_start(ap, fmt);
    const int n = vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t) n >= sizeof name) {
        *out = NULL;
        return vtrim_fail(VTRIM_ERR_FORMAT, "tensor name too long");
    }
    return vtrim_model_tensor(m, name, ne0, ne1, 1, out);
}
