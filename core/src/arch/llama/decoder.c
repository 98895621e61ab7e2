// The Llama decoder's graph: layer ranges over sets of rows, appending to the KV cache, with the layers an
// architecture builds itself (vtrim_decoder_ext) in between.
#include "arch/llama/llama.h"

#include "api/error.h"
#include "attn_probe.h"
#include "graph/graph.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static struct ggml_tensor * build_inp_embd(struct ggml_context * ctx, const struct vtrim_model * m,
                                           struct vtrim_llama_inputs * in, int32_t n_text, int32_t n_image, int32_t n) {
    struct ggml_tensor * text = NULL, * image = NULL;
    if (n_text > 0) {
        in->text_ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_text);
        ggml_set_input(in->text_ids);
        text = ggml_get_rows(ctx, m->tok_embd, in->text_ids);
    }
    if (n_image > 0) {
        in->image_embd = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, m->text.n_embd, n_image);
        ggml_set_input(in->image_embd);
        image = in->image_embd;
    }
    if (!text || !image) {
        return text ? text : image;
    }
    // Rows [text..., image...] put back into sequence order.
    in->order = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(in->order);
    return ggml_get_rows(ctx, ggml_concat(ctx, text, image, 1), in->order);
}

int32_t vtrim_llama_n_kv_padded(int32_t n_kv, int32_t n_ctx) {
    const int32_t padded = (n_kv + VTRIM_KV_PAD - 1) / VTRIM_KV_PAD * VTRIM_KV_PAD;
    return padded < n_ctx ? padded : n_ctx;
}

void vtrim_llama_outputs_free(struct vtrim_llama_outputs * out) {
    free(out->q);
    out->q = NULL;
}

void vtrim_llama_inputs_free(struct vtrim_llama_inputs * in) {
    free(in->mask);
    free(in->mask_layer);
    in->mask = NULL;
    in->mask_layer = NULL;
    in->n_masks = 0;
}

// One mask per distinct row set: layers whose cached positions are the same share it, whatever their number.
static struct ggml_tensor * mask_for(struct ggml_context * ctx, const struct vtrim_kv_cache * kv,
                                     struct vtrim_llama_inputs * in, int il, int32_t n) {
    for (int i = 0; i < in->n_masks; i++) {
        if (vtrim_kv_same_rows(kv, in->mask_layer[i], il)) {
            return in->mask[i];
        }
    }
    const int i = in->n_masks++;
    in->mask[i] = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, vtrim_llama_n_kv_padded(kv->n[il] + n, kv->n_ctx), n);
    in->mask_layer[i] = il;
    ggml_set_input(in->mask[i]);
    return in->mask[i];
}

// Q and K of rows `cur` (already normed) with RoPE at `pos`.
static void build_qk(struct ggml_context * ctx, const struct vtrim_model * m, const struct vtrim_llama_layer * l,
                     struct ggml_tensor * cur, struct ggml_tensor * pos, struct ggml_tensor ** q,
                     struct ggml_tensor ** k) {
    const struct vtrim_text_hparams * hp = &m->text;
    const int64_t n = cur->ne[1];
    // Normal (adjacent-pair) RoPE on Q/K weights that the converter permuted, as llama.cpp does.
    *q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, l->wq, cur), hp->head_dim, hp->n_head, n);
    *q = ggml_rope_ext(ctx, *q, pos, m->rope_freqs, hp->n_rot, 0, hp->n_ctx_train, hp->rope_theta, 1.0f, 0.0f, 1.0f,
                       0.0f, 0.0f);
    if (k) {
        *k = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, l->wk, cur), hp->head_dim, hp->n_head_kv, n);
        *k = ggml_rope_ext(ctx, *k, pos, m->rope_freqs, hp->n_rot, 0, hp->n_ctx_train, hp->rope_theta, 1.0f, 0.0f,
                           1.0f, 0.0f, 0.0f);
    }
}

static struct ggml_tensor * cache_view(struct ggml_context * ctx, const struct vtrim_kv_cache * kv,
                                       struct ggml_tensor * t, const struct vtrim_text_hparams * hp, int64_t n_kv) {
    return ggml_view_3d(ctx, t, hp->head_dim, hp->n_head_kv, n_kv, ggml_row_size(kv->type, hp->head_dim),
                        ggml_row_size(kv->type, (int64_t) hp->head_dim * hp->n_head_kv), 0);
}

int32_t vtrim_llama_build(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_model * m,
                          const struct vtrim_kv_cache * kv, const struct vtrim_decoder_ext * ext, int il0, int il1,
                          int32_t n_text, int32_t n_image, int32_t n, int want, int32_t n_q_rows,
                          struct vtrim_llama_inputs * in, struct vtrim_llama_outputs * out) {
    const struct vtrim_text_hparams * hp = &m->text;
    const int64_t n_embd_kv = (int64_t) hp->head_dim * hp->n_head_kv;
    const float scale = 1.0f / sqrtf((float) hp->head_dim);
    memset(in, 0, sizeof *in);
    memset(out, 0, sizeof *out);
    in->mask = calloc((size_t) (il1 - il0 + 1), sizeof *in->mask);
    in->mask_layer = calloc((size_t) (il1 - il0 + 1), sizeof *in->mask_layer);
    out->q = n_q_rows > 0 ? calloc((size_t) (il1 - il0), sizeof *out->q) : NULL;
    if (!in->mask || !in->mask_layer || (n_q_rows > 0 && !out->q)) {
        vtrim_llama_inputs_free(in);
        vtrim_llama_outputs_free(out);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the decoder masks");
    }
    if (n_q_rows > 0) {
        in->q_rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_q_rows);
        ggml_set_input(in->q_rows);
    }

    struct ggml_tensor * cur;
    if (il0 == 0) {
        cur = build_inp_embd(ctx, m, in, n_text, n_image, n);
    } else {
        in->hidden = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp->n_embd, n);
        ggml_set_input(in->hidden);
        cur = in->hidden;
    }
    in->pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(in->pos);
    if (ext) {
        ext->begin(ext->user, ctx, il0, il1, n);
    }

    for (int il = il0; il < il1; il++) {
        const struct vtrim_llama_layer * l = &m->layers[il];
        if (il == il1 - 1 && (want & VTRIM_WANT_H_IN_LAST)) {
            out->h_in_last = cur;
            ggml_set_output(cur);
            ggml_build_forward_expand(gf, cur);
        }
        if (l->foreign) {
            cur = ext->build_layer(ext->user, ctx, il, cur);
            continue;
        }
        const int32_t n_cached = kv->n[il];
        struct ggml_tensor * residual = cur;
        cur = vtrim_build_rms_norm(ctx, cur, l->attn_norm, hp->rms_eps);
        vtrim_cb(cur, "attn_norm", il);

        struct ggml_tensor * q, * k;
        build_qk(ctx, m, l, cur, in->pos, &q, &k);
        if (il == il1 - 1 && (want & VTRIM_WANT_Q_LAST)) {
            out->q_last = q;
            ggml_set_output(q);
        }
        struct ggml_tensor * v = ggml_mul_mat(ctx, l->wv, cur);
        if (n_q_rows > 0) {
            struct ggml_tensor * qr = ggml_get_rows(ctx, ggml_reshape_2d(ctx, q, hp->head_dim * hp->n_head, n),
                                                    in->q_rows);
            ggml_set_output(qr);
            ggml_build_forward_expand(gf, qr);
            out->q[il - il0] = qr;
        }

        const size_t row = ggml_row_size(kv->type, n_embd_kv);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, n_embd_kv, n),
                                               ggml_view_2d(ctx, kv->k[il], n_embd_kv, n, row, row * n_cached)));
        ggml_build_forward_expand(gf, vtrim_v_cache_store(ctx, kv->v[il], v, n_cached));

        const int32_t n_kv = vtrim_llama_n_kv_padded(n_cached + n, kv->n_ctx);
        cur = vtrim_build_attn_vt(ctx, q, cache_view(ctx, kv, kv->k[il], hp, n_kv),
                                  vtrim_v_cache_view(ctx, kv->v[il], hp->head_dim, hp->n_head_kv, n_kv),
                                  mask_for(ctx, kv, in, il, n), scale, il);
        cur = ggml_mul_mat(ctx, l->wo, cur);
        cur = ggml_add(ctx, cur, residual);
        vtrim_cb(cur, "attn_out", il);

        residual = cur;
        cur = vtrim_build_rms_norm(ctx, cur, l->ffn_norm, hp->rms_eps);
        cur = vtrim_build_swiglu_ffn(ctx, cur, l->ffn_gate, l->ffn_up, l->ffn_down);
        cur = ggml_add(ctx, cur, residual);
        vtrim_cb(cur, "l_out", il);
    }
    if (want & VTRIM_WANT_HIDDEN) {
        out->hidden = cur;
        ggml_set_output(cur);
        ggml_build_forward_expand(gf, cur);
    }
    if (want & VTRIM_WANT_LOGITS) {
        // Only the last row's logits are needed.
        cur = ggml_view_2d(ctx, cur, hp->n_embd, 1, cur->nb[1], (size_t) (n - 1) * cur->nb[1]);
        cur = vtrim_build_rms_norm(ctx, cur, m->output_norm, hp->rms_eps);
        cur = ggml_mul_mat(ctx, m->output, cur);
        vtrim_cb(cur, "logits", -1);
        out->logits = cur;
        ggml_set_output(cur);
        ggml_build_forward_expand(gf, cur);
    }
    return 0;
}

struct ggml_tensor * vtrim_llama_build_attn_probs(struct ggml_context * ctx, const struct vtrim_model * m,
                                                  const struct vtrim_kv_cache * kv, int il, struct ggml_tensor * q,
                                                  struct ggml_tensor ** mask) {
    const struct vtrim_text_hparams * hp = &m->text;
    *mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kv->n[il], q->ne[2]);
    ggml_set_input(*mask);
    return vtrim_attn_probe_probs(ctx, q, cache_view(ctx, kv, kv->k[il], hp, kv->n[il]), *mask,
                                  1.0f / sqrtf((float) hp->head_dim));
}

struct ggml_tensor * vtrim_llama_build_attn_probe(struct ggml_context * ctx, const struct vtrim_model * m,
                                                  const struct vtrim_kv_cache * kv, int il, struct ggml_tensor * h,
                                                  struct ggml_tensor ** pos, struct ggml_tensor ** mask) {
    const struct vtrim_text_hparams * hp = &m->text;
    const int64_t n_q = h->ne[1], n_kv = kv->n[il];
    *pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_q);
    *mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, n_q);
    ggml_set_input(*pos);
    ggml_set_input(*mask);
    struct ggml_tensor * q;
    build_qk(ctx, m, &m->layers[il], vtrim_build_rms_norm(ctx, h, m->layers[il].attn_norm, hp->rms_eps), *pos, &q,
             NULL);
    return vtrim_attn_probe_mean(ctx, q, cache_view(ctx, kv, kv->k[il], hp, n_kv), *mask,
                                 1.0f / sqrtf((float) hp->head_dim));
}

struct ggml_tensor * vtrim_llama_build_logits_probe(struct ggml_context * ctx, const struct vtrim_model * m,
                                                    const struct vtrim_kv_cache * kv, int il, struct ggml_tensor * q,
                                                    int32_t k0, int32_t n_k) {
    const struct vtrim_text_hparams * hp = &m->text;
    const size_t row = ggml_row_size(kv->type, (int64_t) hp->head_dim * hp->n_head_kv);
    struct ggml_tensor * k = ggml_view_3d(ctx, kv->k[il], hp->head_dim, hp->n_head_kv, n_k,
                                          ggml_row_size(kv->type, hp->head_dim), row, row * (size_t) k0);
    return vtrim_attn_logits_head_mean(ctx, q, k, 1.0f / sqrtf((float) hp->head_dim));
}
