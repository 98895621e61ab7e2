// vtrim_get_memory: what a context and its model hold, by kind, for choosing n_ctx on a small device.
#include "runtime/context.h"

#include "api/error.h"
#include "arch/arch.h"
#include "runtime/image_cache.h"

#include <string.h>

int32_t vtrim_get_memory(const struct vtrim_context * c, struct vtrim_memory * out) {
    if (!c || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_get_memory: ctx and out are required");
    }
    memset(out, 0, sizeof *out);
    const struct vtrim_model * m = c->model;
    for (struct ggml_tensor * t = ggml_get_first_tensor(m->ctx_w); t; t = ggml_get_next_tensor(m->ctx_w, t)) {
        const char * name = ggml_get_name(t);
        const int64_t nb = (int64_t) ggml_nbytes(t);
        if (strncmp(name, "v.", 2) == 0) {
            out->weights_vision += nb;
        } else if (strncmp(name, "mm.", 3) == 0) {
            out->weights_projector += nb;
        } else {
            out->weights_text += nb;
        }
    }
    out->weights_rpc = m->n_bytes_rpc;
    out->weights_mapped = m->n_bytes_mapped;
    for (int i = 0; i < VTRIM_MAX_SPLIT; i++) {
        out->kv_cache += c->kv.buf[i] ? (int64_t) ggml_backend_buffer_get_size(c->kv.buf[i]) : 0;
    }
    out->cross_cache = m->arch->cache_bytes ? m->arch->cache_bytes(c) : 0;
    for (int i = 0; i < c->n_backends; i++) {
        out->compute += (int64_t) ggml_backend_sched_get_buffer_size(c->sched, c->backends[i]);
    }
    out->image_embeddings = (int64_t) (c->img.cap * sizeof(float) + c->img.src_cap * sizeof(int32_t));
    out->host_logits = (int64_t) m->text.n_vocab * (int64_t) sizeof(float);
    out->image_cache = vtrim_image_cache_bytes(m->image_cache);
    return 0;
}
