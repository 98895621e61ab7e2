#include "kv_cache.h"

#include "error.h"

#include "ggml-alloc.h"

#include <stdlib.h>
#include <string.h>

int32_t vtrim_kv_cache_init(struct vtrim_kv_cache * kv, int32_t n_layer, int32_t n_ctx, int32_t n_embd_kv,
                            enum ggml_type type, ggml_backend_buffer_type_t buft) {
    memset(kv, 0, sizeof *kv);
    kv->type = type;
    kv->n_layer = n_layer;
    kv->n_ctx = n_ctx;
    kv->n_embd_kv = n_embd_kv;
    kv->k = calloc((size_t) n_layer, sizeof *kv->k);
    kv->v = calloc((size_t) n_layer, sizeof *kv->v);
    kv->n = calloc((size_t) n_layer, sizeof *kv->n);
    struct ggml_init_params ip = { .mem_size = (size_t) (2 * n_layer + 1) * ggml_tensor_overhead(),
                                   .mem_buffer = NULL, .no_alloc = true };
    kv->ctx = ggml_init(ip);
    if (!kv->k || !kv->v || !kv->n || !kv->ctx) {
        vtrim_kv_cache_free(kv);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory creating the KV cache");
    }
    for (int32_t il = 0; il < n_layer; il++) {
        kv->k[il] = ggml_new_tensor_2d(kv->ctx, type, n_embd_kv, n_ctx);
        kv->v[il] = ggml_new_tensor_2d(kv->ctx, type, n_embd_kv, n_ctx);
        ggml_format_name(kv->k[il], "cache_k_l%d", il);
        ggml_format_name(kv->v[il], "cache_v_l%d", il);
    }
    kv->buf = ggml_backend_alloc_ctx_tensors_from_buft(kv->ctx, buft);
    if (!kv->buf) {
        const double mib = 2.0 * n_layer * n_embd_kv * (double) n_ctx * ggml_type_size(type) / 1048576.0;
        vtrim_kv_cache_free(kv);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot allocate the KV cache (%.1f MiB for n_ctx=%d)", mib, n_ctx);
    }
    ggml_backend_buffer_clear(kv->buf, 0);
    return 0;
}

void vtrim_kv_cache_free(struct vtrim_kv_cache * kv) {
    if (kv->buf) {
        ggml_backend_buffer_free(kv->buf);
    }
    if (kv->ctx) {
        ggml_free(kv->ctx);
    }
    free(kv->k);
    free(kv->v);
    free(kv->n);
    memset(kv, 0, sizeof *kv);
}

void vtrim_kv_cache_clear(struct vtrim_kv_cache * kv) {
    memset(kv->n, 0, sizeof(int32_t) * (size_t) kv->n_layer);
}

int64_t vtrim_kv_cache_bytes_used(const struct vtrim_kv_cache * kv) {
    int64_t rows = 0;
    for (int32_t il = 0; il < kv->n_layer; il++) {
        rows += kv->n[il];
    }
    return 2 * rows * (int64_t) ggml_row_size(kv->type, kv->n_embd_kv);
}
