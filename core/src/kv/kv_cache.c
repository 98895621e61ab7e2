#include "kv/kv_cache.h"

#include "api/error.h"
#include "model/split.h"

#include "ggml-alloc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// The layers whose buffer type layer_buft gives as another than buft (on RPC servers), in one buffer per type.
static int32_t alloc_split_layers(ggml_backend_buffer_t * buf, struct ggml_tensor ** k, struct ggml_tensor ** v,
                                  int32_t n_layer, ggml_backend_buffer_type_t buft,
                                  const ggml_backend_buffer_type_t * layer_buft, const char * name) {
    struct ggml_tensor ** list = malloc(sizeof *list * (size_t) (2 * n_layer));
    if (!list) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory creating the %s tensors", name);
    }
    int32_t rc = 0, n_buf = 1;
    for (int32_t il = 0; il < n_layer && rc == 0; il++) {
        const ggml_backend_buffer_type_t t = layer_buft[il];
        bool seen = t == buft;
        for (int32_t j = 0; j < il && !seen; j++) {
            seen = layer_buft[j] == t;
        }
        if (seen) {
            continue;
        }
        int64_t n = 0;
        for (int32_t j = il; j < n_layer; j++) {
            if (layer_buft[j] == t) {
                list[n++] = k[j];
                list[n++] = v[j];
            }
        }
        if (n_buf == VTRIM_MAX_SPLIT) {
            rc = vtrim_fail(VTRIM_ERR_INVALID_ARG, "the %s tensors span more than %d devices", name, VTRIM_MAX_SPLIT);
            break;
        }
        char what[64];
        snprintf(what, sizeof what, "the %s tensors", name);
        rc = vtrim_alloc_tensors(t, list, n, what, &buf[n_buf++]);
    }
    free(list);
    return rc;
}

int32_t vtrim_kv_tensors_init(struct ggml_context ** ctx, ggml_backend_buffer_t * buf, struct ggml_tensor *** k,
                              struct ggml_tensor *** v, int32_t n_layer, int32_t n_embd_kv, int32_t n_rows,
                              const bool * one_row, enum ggml_type type, ggml_backend_buffer_type_t buft,
                              const ggml_backend_buffer_type_t * layer_buft, const char * name, int64_t extra_ne0,
                              struct ggml_tensor ** extra) {
    struct ggml_init_params ip = { .mem_size = (size_t) (2 * n_layer + 2) * ggml_tensor_overhead(),
                                   .mem_buffer = NULL, .no_alloc = true };
    *ctx = ggml_init(ip);
    *k = calloc((size_t) (n_layer > 0 ? n_layer : 1), sizeof **k);
    *v = calloc((size_t) (n_layer > 0 ? n_layer : 1), sizeof **v);
    if (!*ctx || !*k || !*v) {
        vtrim_kv_tensors_free(ctx, buf, k, v);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory creating the %s tensors", name);
    }
    for (int32_t il = 0; il < n_layer; il++) {
        const int32_t rows = one_row && one_row[il] ? 1 : n_rows;
        (*k)[il] = ggml_new_tensor_2d(*ctx, type, n_embd_kv, rows);
        (*v)[il] = ggml_new_tensor_2d(*ctx, type, rows, n_embd_kv);
        ggml_format_name((*k)[il], "%s_k_%d", name, il);
        ggml_format_name((*v)[il], "%s_v_%d", name, il);
    }
    if (extra_ne0 > 0) {
        *extra = ggml_new_tensor_2d(*ctx, GGML_TYPE_F32, extra_ne0, n_rows);
        ggml_format_name(*extra, "%s_extra", name);
    }
    const int32_t rc = layer_buft ? alloc_split_layers(buf, *k, *v, n_layer, buft, layer_buft, name) : 0;
    if (rc < 0) {
        vtrim_kv_tensors_free(ctx, buf, k, v);
        return rc;
    }
    bool rest = false;   // every layer may sit on RPC devices, and extra_ne0 may be 0: then buf[0] stays NULL
    for (struct ggml_tensor * t = ggml_get_first_tensor(*ctx); t && !rest; t = ggml_get_next_tensor(*ctx, t)) {
        rest = t->buffer == NULL;
    }
    buf[0] = rest ? ggml_backend_alloc_ctx_tensors_from_buft(*ctx, buft) : NULL;
    if (rest && !buf[0]) {
        const double mib = 2.0 * n_layer * n_embd_kv * (double) n_rows * ggml_type_size(type) / 1048576.0;
        vtrim_kv_tensors_free(ctx, buf, k, v);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot allocate the %s tensors (%.1f MiB for %d rows)", name, mib,
                          n_rows);
    }
    for (int i = 0; i < VTRIM_MAX_SPLIT && buf[i]; i++) {
        ggml_backend_buffer_clear(buf[i], 0);
    }
    return 0;
}

void vtrim_kv_tensors_free(struct ggml_context ** ctx, ggml_backend_buffer_t * buf, struct ggml_tensor *** k,
                           struct ggml_tensor *** v) {
    for (int i = 0; i < VTRIM_MAX_SPLIT; i++) {
        if (buf[i]) {
            ggml_backend_buffer_free(buf[i]);
            buf[i] = NULL;
        }
    }
    if (*ctx) {
        ggml_free(*ctx);
    }
    free(*k);
    free(*v);
    *ctx = NULL;
    *k = *v = NULL;
}

int32_t vtrim_kv_cache_init(struct vtrim_kv_cache * kv, int32_t n_layer, int32_t n_ctx, int32_t head_dim,
                            int32_t n_head_kv, enum ggml_type type, ggml_backend_buffer_type_t buft,
                            const ggml_backend_buffer_type_t * layer_buft, const bool * skip) {
    memset(kv, 0, sizeof *kv);
    kv->type = type;
    kv->n_layer = n_layer;
    kv->n_ctx = n_ctx;
    kv->head_dim = head_dim;
    kv->n_head_kv = n_head_kv;
    kv->n_embd_kv = head_dim * n_head_kv;
    kv->n = calloc((size_t) n_layer, sizeof *kv->n);
    kv->pos = malloc(sizeof(int32_t) * (size_t) n_layer * (size_t) n_ctx);
    kv->pos_head = calloc((size_t) n_layer, sizeof *kv->pos_head);
    if (!kv->n || !kv->pos || !kv->pos_head) {
        vtrim_kv_cache_free(kv);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory creating the KV cache");
    }
    const int32_t rc = vtrim_kv_tensors_init(&kv->ctx, kv->buf, &kv->k, &kv->v, n_layer, kv->n_embd_kv, n_ctx, skip,
                                             type, buft, layer_buft, "cache", 0, NULL);
    if (rc < 0) {
        vtrim_kv_cache_free(kv);
    }
    return rc;
}

void vtrim_kv_cache_free(struct vtrim_kv_cache * kv) {
    vtrim_kv_tensors_free(&kv->ctx, kv->buf, &kv->k, &kv->v);
    for (int32_t il = 0; kv->pos_head && il < kv->n_layer; il++) {
        free(kv->pos_head[il]);
    }
    free(kv->pos_head);
    free(kv->pos);
    free(kv->n);
    memset(kv, 0, sizeof *kv);
}

void vtrim_kv_cache_clear(struct vtrim_kv_cache * kv) {
    memset(kv->n, 0, sizeof(int32_t) * (size_t) kv->n_layer);
    for (int32_t il = 0; il < kv->n_layer; il++) {
        free(kv->pos_head[il]);
        kv->pos_head[il] = NULL;
    }
}

int64_t vtrim_kv_cache_bytes_used(const struct vtrim_kv_cache * kv) {
    int64_t rows = 0;
    for (int32_t il = 0; il < kv->n_layer; il++) {
        rows += kv->n[il];
    }
    return 2 * rows * (int64_t) ggml_row_size(kv->type, kv->n_embd_kv);
}

const int32_t * vtrim_kv_positions(const struct vtrim_kv_cache * kv, int32_t il, int32_t h) {
    return kv->pos_head[il] ? kv->pos_head[il] + (size_t) h * kv->n_ctx : kv->pos + (size_t) il * kv->n_ctx;
}

bool vtrim_kv_same_rows(const struct vtrim_kv_cache * kv, int32_t a, int32_t b) {
    if (kv->n[a] != kv->n[b]) {
        return false;
    }
    const int32_t n_heads = kv->pos_head[a] || kv->pos_head[b] ? kv->n_head_kv : 1;
    for (int32_t h = 0; h < n_heads; h++) {
        if (memcmp(vtrim_kv_positions(kv, a, h), vtrim_kv_positions(kv, b, h), sizeof(int32_t) * (size_t) kv->n[a])) {
            return false;
        }
    }
    return true;
}

int32_t vtrim_kv_append(struct vtrim_kv_cache * kv, int32_t il, const int32_t * pos, int32_t n) {
    if (kv->n[il] + n > kv->n_ctx) {
        return vtrim_fail(VTRIM_ERR_CONTEXT_FULL, "layer %d: %d rows do not fit n_ctx=%d", il, kv->n[il] + n, kv->n_ctx);
    }
    const int32_t n_heads = kv->pos_head[il] ? kv->n_head_kv : 1;
    for (int32_t h = 0; h < n_heads; h++) {
        int32_t * p = (int32_t *) vtrim_kv_positions(kv, il, h) + kv->n[il];
        int32_t last = kv->n[il] > 0 ? p[-1] : -1;
        for (int32_t i = 0; i < n; i++) {
            if (pos[i] <= last) {
                return vtrim_fail(VTRIM_ERR_STATE, "layer %d: position %d after %d (rows must stay in order)", il,
                                  pos[i], last);
            }
            last = pos[i];
        }
        memcpy(p, pos, sizeof(int32_t) * (size_t) n);
    }
    kv->n[il] += n;
    return 0;
}

// Rows of a sorted position list at or before p.
static int32_t count_upto(const int32_t * pos, int32_t n, int32_t p) {
    int32_t lo = 0, hi = n;
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo) / 2;
        if (pos[mid] <= p) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

int32_t vtrim_kv_truncate(struct vtrim_kv_cache * kv, int32_t p) {
    for (int32_t il = 0; il < kv->n_layer; il++) {
        const int32_t n = count_upto(vtrim_kv_positions(kv, il, 0), kv->n[il], p);
        for (int32_t h = 1; kv->pos_head[il] && h < kv->n_head_kv; h++) {
            if (count_upto(vtrim_kv_positions(kv, il, h), kv->n[il], p) != n) {
                return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "truncating after position %d: the KV heads of layer %d "
                                  "would hold different numbers of rows", p, il);
            }
        }
    }
    for (int32_t il = 0; il < kv->n_layer; il++) {
        kv->n[il] = count_upto(vtrim_kv_positions(kv, il, 0), kv->n[il], p);
    }
    return 0;
}

void vtrim_kv_compact_index(const struct vtrim_kv_cache * kv, const int32_t * rows, int32_t n_keep, bool per_head,
                            int32_t * idx) {
    for (int32_t h = 0; h < kv->n_head_kv; h++) {
        memcpy(idx + (size_t) h * n_keep, rows + (per_head ? (size_t) h * n_keep : 0), sizeof(int32_t) * (size_t) n_keep);
    }
}

void vtrim_kv_build_compact(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_kv_cache * kv,
                            int32_t il, int32_t n_keep, struct ggml_tensor ** idx) {
    const int64_t hd = kv->head_dim, nh = kv->n_head_kv, n_ctx = kv->n_ctx;
    *idx = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_keep, nh);
    ggml_set_input(*idx);
    // K as [head_dim, n_ctx, n_head_kv]: get_rows gathers each head's rows with that head's indices.
    struct ggml_tensor * k = kv->k[il], * v = kv->v[il];
    const size_t es = ggml_element_size(k);
    struct ggml_tensor * ks = ggml_view_3d(ctx, k, hd, n_ctx, nh, k->nb[1], hd * es, 0);
    struct ggml_tensor * kd = ggml_view_3d(ctx, k, hd, n_keep, nh, k->nb[1], hd * es, 0);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_get_rows(ctx, ks, *idx), kd));
    // V transposed, [n_ctx, head_dim, n_head_kv]: tokens are columns, so gather the transpose and put it back.
    struct ggml_tensor * vs = ggml_view_3d(ctx, v, n_ctx, hd, nh, v->nb[1], hd * v->nb[1], 0);
    struct ggml_tensor * vd = ggml_view_3d(ctx, v, n_keep, hd, nh, v->nb[1], hd * v->nb[1], 0);
    struct ggml_tensor * g = ggml_get_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, vs, 1, 0, 2, 3)), *idx);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_permute(ctx, g, 1, 0, 2, 3), vd));
}

int32_t vtrim_kv_commit_compact(struct vtrim_kv_cache * kv, int32_t il, const int32_t * rows, int32_t n_keep,
                                bool per_head) {
    const int32_t n_heads = per_head ? kv->n_head_kv : 1;
    int32_t * pos = malloc(sizeof(int32_t) * (size_t) n_heads * kv->n_ctx);
    if (!pos) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t h = 0; h < n_heads; h++) {
        const int32_t * from = vtrim_kv_positions(kv, il, h);
        for (int32_t i = 0; i < n_keep; i++) {
            pos[(size_t) h * kv->n_ctx + i] = from[rows[(size_t) h * n_keep + i]];
        }
    }
    if (per_head) {
        free(kv->pos_head[il]);
        kv->pos_head[il] = pos;
    } else {
        memcpy(kv->pos + (size_t) il * kv->n_ctx, pos, sizeof(int32_t) * (size_t) n_keep);
        free(kv->pos_head[il]);
        kv->pos_head[il] = NULL;
        free(pos);
    }
    kv->n[il] = n_keep;
    return 0;
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
