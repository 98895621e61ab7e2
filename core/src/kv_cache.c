#include "kv_cache.h"

#include "error.h"

#include "ggml-alloc.h"

#include <stdlib.h>
#include <string.h>

int32_t vtrim_kv_cache_init(struct vtrim_kv_cache * kv, int32_t n_layer, int32_t n_ctx, int32_t n_embd_kv,
                            enum ggml_type type, ggml_backend_buffer_type_t buft, const bool * skip) {
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
        const int32_t rows = skip && skip[il] ? 1 : n_ctx;
        kv->k[il] = ggml_new_tensor_2d(kv->ctx, type, n_embd_kv, rows);
        kv->v[il] = ggml_new_tensor_2d(kv->ctx, type, rows, n_embd_kv);
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

struct ggml_tensor * vtrim_v_cache_store(struct ggml_context * ctx, struct ggml_tensor * cache_v,
                                         struct ggml_tensor * v, int64_t row0) {
    const int64_t n = v->ne[1], n_embd_kv = v->ne[0];
    struct ggml_tensor * dst = ggml_view_2d(ctx, cache_v, n, n_embd_kv, cache_v->nb[1],
                                            (size_t) row0 * ggml_element_size(cache_v));
    return ggml_cpy(ctx, ggml_transpose(ctx, v), dst);
}

struct ggml_tensor * vtrim_v_cache_view(struct ggml_context * ctx, struct ggml_tensor * cache_v, int64_t head_dim,
                                        int64_t n_head_kv, int64_t n) {
    return ggml_view_3d(ctx, cache_v, n, head_dim, n_head_kv, cache_v->nb[1], cache_v->nb[1] * head_dim, 0);
}

int32_t vtrim_cross_cache_init(struct vtrim_cross_cache * xc, int32_t n_layer, int32_t n_rows, int32_t n_embd_kv,
                               enum ggml_type type, ggml_backend_buffer_type_t buft, int32_t n_embd_states) {
    memset(xc, 0, sizeof *xc);
    xc->type = type;
    xc->n_layer = n_layer;
    xc->n_rows = n_rows;
    xc->n_embd_kv = n_embd_kv;
    xc->k = calloc((size_t) n_layer, sizeof *xc->k);
    xc->v = calloc((size_t) n_layer, sizeof *xc->v);
    xc->kept = calloc((size_t) n_rows, sizeof *xc->kept);
    struct ggml_init_params ip = { .mem_size = (size_t) (2 * n_layer + 2) * ggml_tensor_overhead(),
                                   .mem_buffer = NULL, .no_alloc = true };
    xc->ctx = ggml_init(ip);
    if (!xc->k || !xc->v || !xc->kept || !xc->ctx || n_layer > 64) {
        vtrim_cross_cache_free(xc);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory creating the cross-attention cache");
    }
    for (int32_t il = 0; il < n_layer; il++) {
        xc->k[il] = ggml_new_tensor_2d(xc->ctx, type, n_embd_kv, n_rows);
        xc->v[il] = ggml_new_tensor_2d(xc->ctx, type, n_rows, n_embd_kv);
        ggml_format_name(xc->k[il], "cross_k_%d", il);
        ggml_format_name(xc->v[il], "cross_v_%d", il);
    }
    if (n_embd_states > 0) {
        xc->states = ggml_new_tensor_2d(xc->ctx, GGML_TYPE_F32, n_embd_states, n_rows);
        ggml_set_name(xc->states, "image_states");
    }
    xc->buf = ggml_backend_alloc_ctx_tensors_from_buft(xc->ctx, buft);
    if (!xc->buf) {
        vtrim_cross_cache_free(xc);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot allocate the cross-attention cache (%d rows)", n_rows);
    }
    return 0;
}

void vtrim_cross_cache_free(struct vtrim_cross_cache * xc) {
    if (xc->buf) {
        ggml_backend_buffer_free(xc->buf);
    }
    if (xc->ctx) {
        ggml_free(xc->ctx);
    }
    free(xc->k);
    free(xc->v);
    free(xc->kept);
    memset(xc, 0, sizeof *xc);
}

int32_t vtrim_cross_layer_rows(const struct vtrim_cross_cache * xc, int32_t i) {
    return xc->trimmed[i] ? xc->n_kept : xc->n;
}

int64_t vtrim_cross_cache_bytes_used(const struct vtrim_cross_cache * xc) {
    int64_t rows = 0;
    for (int32_t i = 0; i < xc->n_layer; i++) {
        rows += vtrim_cross_layer_rows(xc, i);
    }
    return 2 * rows * (int64_t) ggml_row_size(xc->type, xc->n_embd_kv);
}
