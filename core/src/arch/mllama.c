// Llama-3.2-Vision (HF MllamaForConditionalGeneration): hyperparameters and weights. The graphs are in
// mllama_graph.c.
#include "arch/arch.h"
#include "error.h"
#include "gguf_util.h"
#include "vocab.h"

#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int32_t vtrim_mllama_cross_index(const struct vtrim_model * m, int il) {
    if (m->arch != VTRIM_ARCH_MLLAMA) {
        return -1;
    }
    for (int32_t i = 0; i < m->mllama.n_cross; i++) {
        if (m->mllama.cross_layers[i] == il) {
            return i;
        }
    }
    return -1;
}

static int32_t read_image_pp(struct vtrim_model * m, const struct gguf_context * g) {
    struct vtrim_mllama_pp * pp = &m->mllama_pp;
    vtrim_mllama_pp_default(pp);
    pp->tile_size = m->mllama.tile_size;
    pp->max_image_tiles = m->mllama.max_tiles;
    float rescale = (float) pp->rescale_factor;
    int32_t pairs[2 * VTRIM_MLLAMA_MAX_ASPECT_RATIOS], n_pairs = 0, rc;
    if ((rc = vtrim_gguf_f32_array(g, "mllama.vision.image_mean", pp->mean, 3, false)) < 0 ||
        (rc = vtrim_gguf_f32_array(g, "mllama.vision.image_std", pp->std, 3, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.resample", &pp->resample, false)) < 0 ||
        (rc = vtrim_gguf_f32(g, "vtrim.image.rescale_factor", &rescale, false)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_normalize", &pp->do_normalize, false)) < 0 ||
        (rc = vtrim_gguf_i32_array(g, "mllama.vision.supported_aspect_ratios", pairs, 2 * VTRIM_MLLAMA_MAX_ASPECT_RATIOS,
                                   &n_pairs, true)) < 0) {
        return rc;
    }
    pp->rescale_factor = rescale;
    if (n_pairs == 0 || n_pairs % 2 != 0) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "mllama.vision.supported_aspect_ratios must hold (h, w) pairs");
    }
    pp->n_aspect_ratios = n_pairs / 2;
    for (int32_t i = 0; i < pp->n_aspect_ratios; i++) {
        pp->aspect_ratios[i][0] = pairs[2 * i];
        pp->aspect_ratios[i][1] = pairs[2 * i + 1];
        if (pairs[2 * i] < 1 || pairs[2 * i + 1] < 1 || pairs[2 * i] * pairs[2 * i + 1] > pp->max_image_tiles) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "aspect ratio %dx%d does not fit %d tiles", pairs[2 * i],
                              pairs[2 * i + 1], pp->max_image_tiles);
        }
    }
    return 0;
}

static int32_t read_vision(struct vtrim_model * m, const struct gguf_context * g) {
    struct vtrim_mllama_hparams * hp = &m->mllama;
    int32_t rc;
    hp->eps = 1e-5f;
    if ((rc = vtrim_gguf_i32(g, "mllama.vision.image_size", &hp->tile_size, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "mllama.vision.patch_size", &hp->patch_size, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "mllama.vision.embedding_length", &hp->n_embd, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "mllama.vision.feed_forward_length", &hp->n_ff, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "mllama.vision.block_count", &hp->n_layer, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "mllama.vision.global_block_count", &hp->n_global_layer, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "mllama.vision.attention.head_count", &hp->n_head, true)) < 0 ||
        (rc = vtrim_gguf_f32(g, "mllama.vision.attention.layer_norm_epsilon", &hp->eps, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "mllama.vision.max_num_tiles", &hp->max_tiles, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "mllama.vision.vision_output_dim", &hp->output_dim, true)) < 0 ||
        (rc = vtrim_gguf_i32_array(g, "mllama.vision.intermediate_layers_indices", hp->inter, 16, &hp->n_inter,
                                   true)) < 0) {
        return rc;
    }
    if (hp->tile_size <= 0 || hp->patch_size <= 0 || hp->tile_size % hp->patch_size != 0 || hp->n_embd <= 0 ||
        hp->n_head <= 0 || hp->n_embd % hp->n_head != 0 || hp->n_layer <= 0 || hp->n_layer > 256 ||
        hp->n_global_layer < 0 || hp->n_global_layer > 256 || hp->max_tiles < 1 ||
        hp->max_tiles > VTRIM_MLLAMA_MAX_TILES || hp->output_dim != hp->n_embd * (1 + hp->n_inter)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "invalid mllama vision hyperparameters (tile %d, patch %d, width %d, "
                          "output %d, %d intermediate layers)", hp->tile_size, hp->patch_size, hp->n_embd,
                          hp->output_dim, hp->n_inter);
    }
    for (int32_t i = 0; i < hp->n_inter; i++) {
        // ascending: the graph collects them in layer order
        if (hp->inter[i] < 0 || hp->inter[i] >= hp->n_layer || (i > 0 && hp->inter[i] <= hp->inter[i - 1])) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "intermediate layers must be ascending layers of the %d",
                              hp->n_layer);
        }
    }
    const int32_t side = hp->tile_size / hp->patch_size;
    hp->n_pos = side * side + 1;
    hp->n_pad = (8 - hp->n_pos % 8) % 8;
    hp->max_images = 4;
    return 0;
}

int32_t vtrim_mllama_read_hparams(struct vtrim_model * m, const struct gguf_context * g) {
    int32_t rc;
    if ((rc = vtrim_llama_read_hparams(m, g, "mllama")) < 0) {
        return rc;
    }
    struct vtrim_mllama_hparams * hp = &m->mllama;
    if ((rc = vtrim_gguf_i32_array(g, "mllama.cross_attention_layers", hp->cross_layers, 64, &hp->n_cross, true)) < 0) {
        return rc;
    }
    for (int32_t i = 0; i < hp->n_cross; i++) {
        if (hp->cross_layers[i] < 0 || hp->cross_layers[i] >= m->text.n_layer ||
            (i > 0 && hp->cross_layers[i] <= hp->cross_layers[i - 1])) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "mllama.cross_attention_layers must be ascending decoder layers");
        }
    }
    if ((rc = read_vision(m, g)) < 0 || (rc = read_image_pp(m, g)) < 0) {
        return rc;
    }
    m->arch = VTRIM_ARCH_MLLAMA;
    m->has_vision = true;
    m->vision.image_size = hp->tile_size;
    m->vision.patch_size = hp->patch_size;
    m->vision.n_embd = hp->n_embd;
    m->vision.n_layer = m->vision.n_layer_run = hp->n_layer + hp->n_global_layer;
    m->vision.n_image_tokens = hp->max_tiles * hp->n_pos;   // cross-attended states per image
    strcpy(m->chat_format, "llama-3.2-vision");
    if ((rc = vtrim_gguf_str(g, "vtrim.chat_format", m->chat_format, sizeof m->chat_format, false)) < 0) {
        return rc;
    }
    m->image_token_id = -1;
    if ((rc = vtrim_gguf_i32(g, "vtrim.image_token_id", &m->image_token_id, false)) < 0) {
        return rc;
    }
    if (m->image_token_id < 0) {
        m->image_token_id = vtrim_vocab_find(m->vocab, "<|image|>");
    }
    if (m->image_token_id < 0 || m->image_token_id >= vtrim_vocab_n_tokens(m->vocab)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "no image token: vtrim.image_token_id is missing and the vocabulary "
                          "has no '<|image|>'");
    }
    return 0;
}

int32_t vtrim_mllama_bind_cross_layer(struct vtrim_model * m, int il) {
    const struct vtrim_text_hparams * hp = &m->text;
    struct vtrim_llama_layer * l = &m->layers[il];
    const int64_t d = hp->n_embd, d_kv = (int64_t) hp->head_dim * hp->n_head_kv;
    char name[96];
    int32_t rc;
#define W(field, suffix, a, b)                                                    \
    snprintf(name, sizeof name, "blk.%d." suffix, il);                            \
    if ((rc = vtrim_model_tensor(m, name, (a), (b), 1, &l->field)) < 0) return rc;
    W(wq, "cross_attn_q_proj.weight", d, d)
    W(wk, "cross_attn_k_proj.weight", d, d_kv)
    W(wv, "cross_attn_v_proj.weight", d, d_kv)
    W(wo, "cross_attn_o_proj.weight", d, d)
    W(q_norm, "cross_attn_q_norm.weight", hp->head_dim, 1)
    W(k_norm, "cross_attn_k_norm.weight", hp->head_dim, 1)
    W(attn_gate, "cross_attn_attn_gate", 1, 1)
    W(mlp_gate, "cross_attn_mlp_gate", 1, 1)
#undef W
    l->is_cross = true;
    l->cross_index = vtrim_mllama_cross_index(m, il);
    return 0;
}

static int32_t bind_vision_layer(struct vtrim_model * m, int i, const char * prefix, int il, bool gated) {
    const struct vtrim_mllama_hparams * hp = &m->mllama;
    struct vtrim_mllama_vision_layer * l = &m->mvlayers[i];
    const int64_t d = hp->n_embd;
    char name[96];
    int32_t rc;
#define T(field, suffix, a, b)                                                    \
    snprintf(name, sizeof name, "%s.%d." suffix, prefix, il);                     \
    if ((rc = vtrim_model_tensor(m, name, (a), (b), 1, &l->field)) < 0) return rc;
    T(ln1_w, "ln1.weight", d, 1) T(ln1_b, "ln1.bias", d, 1)
    T(ln2_w, "ln2.weight", d, 1) T(ln2_b, "ln2.bias", d, 1)
    T(q_w, "attn_q.weight", d, d) T(k_w, "attn_k.weight", d, d)
    T(v_w, "attn_v.weight", d, d) T(o_w, "attn_out.weight", d, d)
    T(fc1_w, "ffn_up.weight", d, hp->n_ff) T(fc1_b, "ffn_up.bias", hp->n_ff, 1)
    T(fc2_w, "ffn_down.weight", hp->n_ff, d) T(fc2_b, "ffn_down.bias", d, 1)
    if (gated) {
        T(gate_attn, "gate_attn", 1, 1)
        T(gate_ffn, "gate_ffn", 1, 1)
    }
#undef T
    return 0;
}

int32_t vtrim_mllama_bind_tensors(struct vtrim_model * m) {
    int32_t rc = vtrim_llama_bind_tensors(m);
    if (rc < 0) {
        return rc;
    }
    const struct vtrim_mllama_hparams * hp = &m->mllama;
    const int64_t d = hp->n_embd, p = hp->patch_size, n_ar = m->mllama_pp.n_aspect_ratios + 1;
    if ((rc = vtrim_model_tensor(m, "v.patch_embd.weight", p, p, 3, &m->patch_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.class_embd", d, 1, 1, &m->class_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.position_embd.weight", d, hp->n_pos, 1, &m->pos_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.position_embd.gate", 1, 1, 1, &m->mv_pos_gate)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.tile_position_embd.weight", (int64_t) hp->max_tiles * hp->n_pos * d, n_ar, 1,
                                 &m->mv_tile_pos)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_tile_position_embd.weight", hp->max_tiles * d, n_ar, 1,
                                 &m->mv_pre_tile)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_tile_position_embd.gate", 1, 1, 1, &m->mv_pre_tile_gate)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.post_tile_position_embd.weight", hp->max_tiles * d, n_ar, 1,
                                 &m->mv_post_tile)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.post_tile_position_embd.gate", 1, 1, 1, &m->mv_post_tile_gate)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_ln.weight", d, 1, 1, &m->pre_ln_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_ln.bias", d, 1, 1, &m->pre_ln_b)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.post_ln.weight", d, 1, 1, &m->post_ln_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.post_ln.bias", d, 1, 1, &m->post_ln_b)) < 0 ||
        (rc = vtrim_model_tensor(m, "mm.weight", hp->output_dim, m->text.n_embd, 1, &m->mm_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "mm.bias", m->text.n_embd, 1, 1, &m->mm_b)) < 0) {
        return rc;
    }
    if (m->patch_embd->ne[3] != d || ggml_is_quantized(m->patch_embd->type)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "v.patch_embd.weight must be f32/f16 with %lld output channels",
                          (long long) d);
    }
    m->mvlayers = calloc((size_t) (hp->n_layer + hp->n_global_layer), sizeof *m->mvlayers);
    if (!m->mvlayers) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int il = 0; il < hp->n_layer; il++) {
        if ((rc = bind_vision_layer(m, il, "v.blk", il, false)) < 0) {
            return rc;
        }
    }
    for (int il = 0; il < hp->n_global_layer; il++) {
        if ((rc = bind_vision_layer(m, hp->n_layer + il, "v.global.blk", il, true)) < 0) {
            return rc;
        }
    }
    return 0;
}
