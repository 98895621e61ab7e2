// mllama's cross-attention: the cache of the image states' K/V, and the graphs that fill and read it.
#include "arch/mllama/mllama.h"

#include "api/error.h"
#include "attn_probe.h"
#include "graph/graph.h"

#include "ggml-alloc.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int32_t vtrim_cross_cache_init(struct vtrim_cross_cache * xc, int32_t n_layer, int32_t n_rows, int32_t n_embd_kv,
                               enum ggml_type type, ggml_backend_buffer_type_t buft, int32_t n_embd_states) {
    memset(xc, 0, sizeof *xc);
    xc->type = type;
    xc->n_layer = n_layer;
    xc->n_rows = n_rows;
    xc->n_embd_kv = n_embd_kv;
    xc->kept = calloc((size_t) n_rows, sizeof *xc->kept);
    xc->trimmed = calloc((size_t) (n_layer > 0 ? n_layer : 1), sizeof *xc->trimmed);
    if (!xc->kept || !xc->trimmed) {
        vtrim_cross_cache_free(xc);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory creating the cross-attention cache");
    }
    const int32_t rc = vtrim_kv_tensors_init(&xc->ctx, xc->buf, &xc->k, &xc->v, n_layer, n_embd_kv, n_rows, NULL,
                                             type, buft, NULL, "cross", n_embd_states, &xc->states);
    if (rc < 0) {
        vtrim_cross_cache_free(xc);
    }
    return rc;
}

void vtrim_cross_cache_free(struct vtrim_cross_cache * xc) {
    vtrim_kv_tensors_free(&xc->ctx, xc->buf, &xc->k, &xc->v);
    free(xc->kept);
    free(xc->trimmed);
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

// The first n rows of cross layer ix's K as [head_dim, n_head_kv, n].
static struct ggml_tensor * cross_k_view(struct ggml_context * ctx, const struct vtrim_model * m,
                                         const struct vtrim_cross_cache * xc, int32_t ix, int64_t n) {
    const struct vtrim_text_hparams * hp = &m->text;
    return ggml_view_3d(ctx, xc->k[ix], hp->head_dim, hp->n_head_kv, n, ggml_row_size(xc->type, hp->head_dim),
                        ggml_row_size(xc->type, (int64_t) hp->head_dim * hp->n_head_kv), 0);
}

void vtrim_mllama_build_cross_kv(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_model * m,
                                 const struct vtrim_cross_cache * xc, struct ggml_tensor * states, int32_t row0,
                                 int32_t i0, int32_t i1) {
    const struct vtrim_text_hparams * hp = &m->text;
    const int64_t n = states->ne[1], n_embd_kv = (int64_t) hp->head_dim * hp->n_head_kv;
    const size_t row = ggml_row_size(xc->type, n_embd_kv);
    for (int32_t i = i0; i < i1; i++) {
        const struct vtrim_mllama_cross_layer * l = &vtrim_mllama_of(m)->xlayers[i];
        struct ggml_tensor * k = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, l->wk, states), hp->head_dim, hp->n_head_kv, n);
        k = vtrim_build_rms_norm(ctx, k, l->k_norm, hp->rms_eps);
        struct ggml_tensor * v = ggml_mul_mat(ctx, l->wv, states);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, n_embd_kv, n),
                                               ggml_view_2d(ctx, xc->k[i], n_embd_kv, n, row, row * row0)));
        ggml_build_forward_expand(gf, vtrim_v_cache_store(ctx, xc->v[i], v, row0));
    }
}

struct ggml_tensor * vtrim_mllama_build_cross_layer(struct ggml_context * ctx, const struct vtrim_model * m, int il,
                                                    const struct vtrim_cross_cache * xc, struct ggml_tensor * cur,
                                                    struct ggml_tensor * cross_mask, struct ggml_tensor * row_mask) {
    const struct vtrim_text_hparams * hp = &m->text;
    const struct vtrim_llama_layer * d = &m->layers[il];
    const int32_t ix = vtrim_mllama_of(m)->cross_index[il];
    const struct vtrim_mllama_cross_layer * l = &vtrim_mllama_of(m)->xlayers[ix];
    const int64_t n = cur->ne[1];
    struct ggml_tensor * residual = cur;
    cur = vtrim_build_rms_norm(ctx, cur, d->attn_norm, hp->rms_eps);
    struct ggml_tensor * q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, l->wq, cur), hp->head_dim, hp->n_head, n);
    q = vtrim_build_rms_norm(ctx, q, l->q_norm, hp->rms_eps);
    const int32_t n_rows = vtrim_cross_layer_rows(xc, ix);
    struct ggml_tensor * vt = vtrim_v_cache_view(ctx, xc->v[ix], hp->head_dim, hp->n_head_kv, n_rows);
    cur = vtrim_build_attn_vt(ctx, q, cross_k_view(ctx, m, xc, ix, n_rows), vt, cross_mask,
                              1.0f / sqrtf((float) hp->head_dim), il);
    cur = ggml_mul_mat(ctx, l->wo, cur);
    cur = ggml_add(ctx, residual, ggml_mul(ctx, cur, ggml_tanh(ctx, vtrim_f32(ctx, l->attn_gate))));

    // Rows that see no image keep HF's uniform attention above but get no MLP update (row_mask 0).
    residual = cur;
    cur = vtrim_build_rms_norm(ctx, cur, d->ffn_norm, hp->rms_eps);
    cur = vtrim_build_swiglu_ffn(ctx, cur, d->ffn_gate, d->ffn_up, d->ffn_down);
    cur = ggml_mul(ctx, cur, row_mask);
    return ggml_add(ctx, residual, ggml_mul(ctx, cur, ggml_tanh(ctx, vtrim_f32(ctx, l->mlp_gate))));
}

struct ggml_tensor * vtrim_mllama_build_cross_probe(struct ggml_context * ctx, const struct vtrim_model * m,
                                                    const struct vtrim_cross_cache * xc, int il, struct ggml_tensor * h,
                                                    struct ggml_tensor * mask) {
    const struct vtrim_text_hparams * hp = &m->text;
    const int32_t ix = vtrim_mllama_of(m)->cross_index[il];
    const struct vtrim_mllama_cross_layer * l = &vtrim_mllama_of(m)->xlayers[ix];
    const int64_t n_q = h->ne[1];
    struct ggml_tensor * q = vtrim_build_rms_norm(ctx, h, m->layers[il].attn_norm, hp->rms_eps);
    q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, l->wq, q), hp->head_dim, hp->n_head, n_q);
    q = vtrim_build_rms_norm(ctx, q, l->q_norm, hp->rms_eps);
    return vtrim_attn_probe_per_head(ctx, q, cross_k_view(ctx, m, xc, ix, xc->n), mask,
                                     1.0f / sqrtf((float) hp->head_dim));
}
