// The Llama decoder (Llama-2 / Llama-3 / TinyLlama shapes): hyperparameters, weights, graph.
#include "arch/llama.h"

#include "arch/arch.h"
#include "arch/mllama.h"
#include "attn_probe.h"
#include "error.h"
#include "graph.h"
#include "gguf_util.h"
#include "vocab.h"

#include "gguf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int32_t vtrim_llama_read_hparams(struct vtrim_model * m, const struct gguf_context * g, const char * arch) {
    struct vtrim_text_hparams * hp = &m->text;
    char key[128];
#define KEY(suffix) (snprintf(key, sizeof key, "%s." suffix, arch), key)
    int32_t rc;
    if ((rc = vtrim_gguf_i32(g, KEY("embedding_length"), &hp->n_embd, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, KEY("block_count"), &hp->n_layer, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, KEY("feed_forward_length"), &hp->n_ff, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, KEY("attention.head_count"), &hp->n_head, true)) < 0) {
        return rc;
    }
    hp->n_head_kv = hp->n_head;
    hp->n_ctx_train = 4096;
    hp->rms_eps = 1e-5f;
    hp->rope_theta = 10000.0f;
    if ((rc = vtrim_gguf_i32(g, KEY("attention.head_count_kv"), &hp->n_head_kv, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, KEY("context_length"), &hp->n_ctx_train, false)) < 0 ||
        (rc = vtrim_gguf_f32(g, KEY("attention.layer_norm_rms_epsilon"), &hp->rms_eps, false)) < 0 ||
        (rc = vtrim_gguf_f32(g, KEY("rope.freq_base"), &hp->rope_theta, false)) < 0) {
        return rc;
    }
    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_ff <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 ||
        hp->n_embd % hp->n_head != 0 || hp->n_head % hp->n_head_kv != 0 || hp->n_layer > 4096) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "invalid llama hyperparameters (n_embd=%d n_layer=%d n_head=%d n_head_kv=%d)",
                          hp->n_embd, hp->n_layer, hp->n_head, hp->n_head_kv);
    }
    hp->head_dim = hp->n_embd / hp->n_head;
    hp->n_rot = hp->head_dim;
    if ((rc = vtrim_gguf_i32(g, KEY("rope.dimension_count"), &hp->n_rot, false)) < 0) {
        return rc;
    }
#undef KEY
    if (hp->n_rot <= 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2 != 0 || !(hp->rope_theta > 0.0f)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "invalid rope parameters (dims %d, theta %g)", hp->n_rot, hp->rope_theta);
    }
    hp->n_vocab = vtrim_vocab_n_tokens(m->vocab);
    return 0;
}

int32_t vtrim_llama_bind_tensors(struct vtrim_model * m) {
    const struct vtrim_text_hparams * hp = &m->text;
    const int64_t n_embd = hp->n_embd, n_embd_kv = (int64_t) hp->head_dim * hp->n_head_kv;
    int32_t rc;
    if ((rc = vtrim_model_tensor(m, "token_embd.weight", n_embd, -1, 1, &m->tok_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "output_norm.weight", n_embd, 1, 1, &m->output_norm)) < 0) {
        return rc;
    }
    if (ggml_get_tensor(m->ctx_w, "output.weight")) {
        if ((rc = vtrim_model_tensor(m, "output.weight", n_embd, -1, 1, &m->output)) < 0) {
            return rc;
        }
    } else {
        m->output = m->tok_embd;   // tied embeddings
    }
    // Logits cover the output rows; the embedding may hold a few more (mllama), never fewer than the vocabulary.
    if (m->tok_embd->ne[1] < m->output->ne[1] || m->output->ne[1] > hp->n_vocab || m->output->ne[1] < 1) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "token_embd has %lld rows, output %lld, the vocabulary %d",
                          (long long) m->tok_embd->ne[1], (long long) m->output->ne[1], hp->n_vocab);
    }
    m->text.n_vocab = (int32_t) m->output->ne[1];
    m->rope_freqs = ggml_get_tensor(m->ctx_w, "rope_freqs.weight");
    if (m->rope_freqs && (m->rope_freqs->type != GGML_TYPE_F32 || m->rope_freqs->ne[0] != hp->n_rot / 2)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "rope_freqs.weight must be %d f32 values", hp->n_rot / 2);
    }
    m->layers = calloc((size_t) hp->n_layer, sizeof *m->layers);
    if (!m->layers) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    char name[96];
#define W(field, suffix, a, b)                                                              \
    snprintf(name, sizeof name, "blk.%d." suffix ".weight", il);                            \
    if ((rc = vtrim_model_tensor(m, name, (a), (b), 1, &l->field)) < 0) return rc;
    for (int il = 0; il < hp->n_layer; il++) {
        struct vtrim_llama_layer * l = &m->layers[il];
        W(attn_norm, "attn_norm", n_embd, 1)
        W(ffn_norm, "ffn_norm", n_embd, 1)
        W(ffn_gate, "ffn_gate", n_embd, hp->n_ff)
        W(ffn_up, "ffn_up", n_embd, hp->n_ff)
        W(ffn_down, "ffn_down", hp->n_ff, n_embd)
        if (vtrim_mllama_cross_index(m, il) >= 0) {
            if ((rc = vtrim_mllama_bind_cross_layer(m, il)) < 0) {
                return rc;
            }
            continue;
        }
        W(wq, "attn_q", n_embd, n_embd)
        W(wk, "attn_k", n_embd, n_embd_kv)
        W(wv, "attn_v", n_embd, n_embd_kv)
        W(wo, "attn_output", n_embd, n_embd)
    }
#undef W
    return 0;
}

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

static struct ggml_tensor * mask_for(struct ggml_context * ctx, struct vtrim_llama_inputs * in, int32_t n_cached,
                                     int32_t n, int32_t n_ctx) {
    for (int i = 0; i < in->n_masks; i++) {
        if (in->mask_n_cached[i] == n_cached) {
            return in->mask[i];
        }
    }
    // More distinct cache lengths than masks cannot happen with fewer than VTRIM_MAX_MASKS reduction stages.
    const int i = in->n_masks < VTRIM_MAX_MASKS ? in->n_masks++ : VTRIM_MAX_MASKS - 1;
    in->mask[i] = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, vtrim_llama_n_kv_padded(n_cached + n, n_ctx), n);
    in->mask_n_cached[i] = n_cached;
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

void vtrim_llama_build(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_model * m,
                       const struct vtrim_kv_cache * kv, const struct vtrim_cross_cache * xc, int il0, int il1,
                       int32_t n_text, int32_t n_image, int32_t n, int want, struct vtrim_llama_inputs * in,
                       struct vtrim_llama_outputs * out) {
    const struct vtrim_text_hparams * hp = &m->text;
    const int64_t n_embd_kv = (int64_t) hp->head_dim * hp->n_head_kv;
    const float scale = 1.0f / sqrtf((float) hp->head_dim);
    memset(in, 0, sizeof *in);
    memset(out, 0, sizeof *out);

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
    // Cross-attention layers are skipped until an image is cached (HF). Inputs only for the layers in range:
    // a tensor no node uses gets no buffer.
    const bool cross = xc && xc->n > 0;
    bool any_full = false, any_kept = false;
    for (int il = il0; cross && il < il1; il++) {
        if (m->layers[il].is_cross) {
            any_kept |= xc->trimmed[m->layers[il].cross_index];
            any_full |= !xc->trimmed[m->layers[il].cross_index];
        }
    }
    if (any_full) {
        in->cross_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, xc->n, n);
        ggml_set_input(in->cross_mask);
    }
    if (any_kept) {
        in->cross_mask_kept = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, xc->n_kept, n);
        ggml_set_input(in->cross_mask_kept);
    }
    if (any_full || any_kept) {
        in->row_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n);
        ggml_set_input(in->row_mask);
    }

    for (int il = il0; il < il1; il++) {
        const struct vtrim_llama_layer * l = &m->layers[il];
        if (il == il1 - 1 && (want & VTRIM_WANT_H_IN_LAST)) {
            out->h_in_last = cur;
            ggml_set_output(cur);
            ggml_build_forward_expand(gf, cur);
        }
        if (l->is_cross) {
            if (cross) {
                struct ggml_tensor * mask = xc->trimmed[l->cross_index] ? in->cross_mask_kept : in->cross_mask;
                cur = vtrim_mllama_build_cross_layer(ctx, m, l, xc, cur, mask, in->row_mask, il);
                vtrim_cb(cur, "l_out", il);
            }
            continue;
        }
        const int32_t n_cached = kv->n[il];
        struct ggml_tensor * residual = cur;
        cur = vtrim_build_rms_norm(ctx, cur, l->attn_norm, hp->rms_eps);
        vtrim_cb(cur, "attn_norm", il);

        struct ggml_tensor * q, * k;
        build_qk(ctx, m, l, cur, in->pos, &q, &k);
        struct ggml_tensor * v = ggml_mul_mat(ctx, l->wv, cur);

        const size_t row = ggml_row_size(kv->type, n_embd_kv);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, n_embd_kv, n),
                                               ggml_view_2d(ctx, kv->k[il], n_embd_kv, n, row, row * n_cached)));
        ggml_build_forward_expand(gf, vtrim_v_cache_store(ctx, kv->v[il], v, n_cached));

        const int32_t n_kv = vtrim_llama_n_kv_padded(n_cached + n, kv->n_ctx);
        cur = vtrim_build_attn_vt(ctx, q, cache_view(ctx, kv, kv->k[il], hp, n_kv),
                                  vtrim_v_cache_view(ctx, kv->v[il], hp->head_dim, hp->n_head_kv, n_kv),
                                  mask_for(ctx, in, n_cached, n, kv->n_ctx), scale, il);
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
