// Llama-3.2-Vision's entry of the architecture table: hyperparameters, weights, chat template, images.
// The graphs are in vision.c and cross.c, the prefill parts in prefill.c.
#include "arch/mllama/mllama.h"

#include "api/error.h"
#include "arch/arch.h"
#include "arch/llama/llama.h"
#include "model/gguf_util.h"
#include "reduce/reduce.h"
#include "vocab/vocab.h"

#include "gguf.h"

#include <stdlib.h>
#include <string.h>

static int32_t read_image_pp(struct vtrim_mllama * v, const struct gguf_context * g) {
    struct vtrim_mllama_pp * pp = &v->pp;
    vtrim_mllama_pp_default(pp);
    pp->tile_size = v->hp.tile_size;
    pp->max_image_tiles = v->hp.max_tiles;
    float rescale = (float) pp->rescale_factor;
    int32_t pairs[2 * VTRIM_MLLAMA_MAX_ASPECT_RATIOS], n_pairs = 0, rc;
    if ((rc = vtrim_arch_read_image_common(g, "mllama.vision", pp->mean, pp->std, &pp->resample, &rescale,
                                           &pp->do_normalize)) < 0 ||
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

static int32_t read_vision(struct vtrim_mllama * v, const struct gguf_context * g) {
    struct vtrim_mllama_hparams * hp = &v->hp;
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
        (rc = vtrim_gguf_i32_array_alloc(g, "mllama.vision.intermediate_layers_indices", &hp->inter, &hp->n_inter,
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

static int32_t mllama_read_hparams(struct vtrim_model * m, const struct gguf_context * g,
                                   const struct gguf_context * mmproj) {
    int32_t rc;
    if ((rc = vtrim_llama_read_hparams(m, g, "mllama")) < 0) {
        return rc;
    }
    struct vtrim_mllama * v = calloc(1, sizeof *v);
    if (!v) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    m->arch_state = v;
    struct vtrim_mllama_hparams * hp = &v->hp;
    if ((rc = vtrim_gguf_i32_array_alloc(g, "mllama.cross_attention_layers", &hp->cross_layers, &hp->n_cross,
                                         true)) < 0) {
        return rc;
    }
    for (int32_t i = 0; i < hp->n_cross; i++) {
        if (hp->cross_layers[i] < 0 || hp->cross_layers[i] >= m->text.n_layer ||
            (i > 0 && hp->cross_layers[i] <= hp->cross_layers[i - 1])) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "mllama.cross_attention_layers must be ascending decoder layers");
        }
    }
    if ((rc = read_vision(v, g)) < 0 || (rc = read_image_pp(v, g)) < 0) {
        return rc;
    }
    m->has_vision = true;
    m->vision.image_size = hp->tile_size;
    m->vision.n_layer_run = hp->n_layer + hp->n_global_layer;
    m->vision.n_image_tokens = hp->max_tiles * hp->n_pos;   // cross-attended states per image
    if ((rc = vtrim_arch_read_chat_template(m, g, "llama-3.2-vision")) < 0) {
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

static int32_t bind_cross_layer(struct vtrim_model * m, struct vtrim_mllama * v, int il) {
    const struct vtrim_text_hparams * hp = &m->text;
    struct vtrim_mllama_cross_layer * l = &v->xlayers[v->cross_index[il]];
    const int64_t d = hp->n_embd, d_kv = (int64_t) hp->head_dim * hp->n_head_kv;
    int32_t rc;
    if ((rc = vtrim_model_tensorf(m, &l->wq, d, d, "blk.%d.cross_attn_q_proj.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->wk, d, d_kv, "blk.%d.cross_attn_k_proj.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->wv, d, d_kv, "blk.%d.cross_attn_v_proj.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->wo, d, d, "blk.%d.cross_attn_o_proj.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->q_norm, hp->head_dim, 1, "blk.%d.cross_attn_q_norm.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->k_norm, hp->head_dim, 1, "blk.%d.cross_attn_k_norm.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->attn_gate, 1, 1, "blk.%d.cross_attn_attn_gate", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->mlp_gate, 1, 1, "blk.%d.cross_attn_mlp_gate", il)) < 0) {
        return rc;
    }
    return 0;
}

static int32_t bind_vision_layer(struct vtrim_model * m, struct vtrim_mllama * v, int i, const char * prefix, int il,
                                 bool gated) {
    struct vtrim_mllama_vision_layer * l = &v->vlayers[i];
    const int64_t d = v->hp.n_embd, f = v->hp.n_ff;
    int32_t rc;
    if ((rc = vtrim_model_tensorf(m, &l->ln1_w, d, 1, "%s.%d.ln1.weight", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->ln1_b, d, 1, "%s.%d.ln1.bias", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->ln2_w, d, 1, "%s.%d.ln2.weight", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->ln2_b, d, 1, "%s.%d.ln2.bias", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->q_w, d, d, "%s.%d.attn_q.weight", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->k_w, d, d, "%s.%d.attn_k.weight", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->v_w, d, d, "%s.%d.attn_v.weight", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->o_w, d, d, "%s.%d.attn_out.weight", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->fc1_w, d, f, "%s.%d.ffn_up.weight", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->fc1_b, f, 1, "%s.%d.ffn_up.bias", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->fc2_w, f, d, "%s.%d.ffn_down.weight", prefix, il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->fc2_b, d, 1, "%s.%d.ffn_down.bias", prefix, il)) < 0) {
        return rc;
    }
    if (gated && ((rc = vtrim_model_tensorf(m, &l->gate_attn, 1, 1, "%s.%d.gate_attn", prefix, il)) < 0 ||
                  (rc = vtrim_model_tensorf(m, &l->gate_ffn, 1, 1, "%s.%d.gate_ffn", prefix, il)) < 0)) {
        return rc;
    }
    return 0;
}

static int32_t mllama_bind_tensors(struct vtrim_model * m) {
    struct vtrim_mllama * v = m->arch_state;
    const struct vtrim_mllama_hparams * hp = &v->hp;
    bool * foreign = calloc((size_t) m->text.n_layer, sizeof(bool));
    v->cross_index = malloc(sizeof(int32_t) * (size_t) m->text.n_layer);
    v->xlayers = calloc((size_t) (hp->n_cross > 0 ? hp->n_cross : 1), sizeof *v->xlayers);
    v->vlayers = calloc((size_t) (hp->n_layer + hp->n_global_layer), sizeof *v->vlayers);
    if (!foreign || !v->cross_index || !v->xlayers || !v->vlayers) {
        free(foreign);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int il = 0; il < m->text.n_layer; il++) {
        v->cross_index[il] = -1;
    }
    for (int32_t i = 0; i < hp->n_cross; i++) {
        v->cross_index[hp->cross_layers[i]] = i;
        foreign[hp->cross_layers[i]] = true;
    }
    int32_t rc = vtrim_llama_bind_tensors(m, foreign);
    free(foreign);
    for (int32_t i = 0; i < hp->n_cross && rc == 0; i++) {
        rc = bind_cross_layer(m, v, hp->cross_layers[i]);
    }
    if (rc < 0) {
        return rc;
    }
    const int64_t d = hp->n_embd, p = hp->patch_size, n_ar = v->pp.n_aspect_ratios + 1;
    if ((rc = vtrim_model_tensor(m, "v.patch_embd.weight", p, p, 3, &v->patch_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.class_embd", d, 1, 1, &v->class_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.position_embd.weight", d, hp->n_pos, 1, &v->pos_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.position_embd.gate", 1, 1, 1, &v->pos_gate)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.tile_position_embd.weight", (int64_t) hp->max_tiles * hp->n_pos * d, n_ar, 1,
                                 &v->tile_pos)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_tile_position_embd.weight", hp->max_tiles * d, n_ar, 1,
                                 &v->pre_tile)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_tile_position_embd.gate", 1, 1, 1, &v->pre_tile_gate)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.post_tile_position_embd.weight", hp->max_tiles * d, n_ar, 1,
                                 &v->post_tile)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.post_tile_position_embd.gate", 1, 1, 1, &v->post_tile_gate)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_ln.weight", d, 1, 1, &v->pre_ln_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_ln.bias", d, 1, 1, &v->pre_ln_b)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.post_ln.weight", d, 1, 1, &v->post_ln_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.post_ln.bias", d, 1, 1, &v->post_ln_b)) < 0 ||
        (rc = vtrim_model_tensor(m, "mm.weight", hp->output_dim, m->text.n_embd, 1, &v->mm_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "mm.bias", m->text.n_embd, 1, 1, &v->mm_b)) < 0) {
        return rc;
    }
    if (v->patch_embd->ne[3] != d || ggml_is_quantized(v->patch_embd->type)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "v.patch_embd.weight must be f32/f16 with %lld output channels",
                          (long long) d);
    }
    for (int il = 0; il < hp->n_layer && rc == 0; il++) {
        rc = bind_vision_layer(m, v, il, "v.blk", il, false);
    }
    for (int il = 0; il < hp->n_global_layer && rc == 0; il++) {
        rc = bind_vision_layer(m, v, hp->n_layer + il, "v.global.blk", il, true);
    }
    return rc;
}

static void mllama_model_free(struct vtrim_model * m) {
    struct vtrim_mllama * v = m->arch_state;
    if (v) {
        free(v->hp.inter);
        free(v->hp.cross_layers);
        free(v->vlayers);
        free(v->xlayers);
        free(v->cross_index);
        free(v);
        m->arch_state = NULL;
    }
}

static const char * mllama_image_placeholder(const struct vtrim_model * m) {
    return m->image_token_id < 0 ? NULL : vtrim_vocab_token_text(m->vocab, m->image_token_id);
}

static int32_t mllama_image_preprocess(const struct vtrim_model * m, const struct vtrim_image * image, float * pixels,
                                       int64_t n_max, int64_t * n_out) {
    const struct vtrim_mllama_pp * pp = &vtrim_mllama_of(m)->pp;
    const int64_t n = (int64_t) pp->max_image_tiles * 3 * pp->tile_size * pp->tile_size;
    *n_out = n;
    if (n > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_image_preprocess: needs %lld floats", (long long) n);
    }
    return vtrim_mllama_preprocess(image, pp, pixels, NULL, NULL, NULL, NULL);
}

static int32_t mllama_image_tiles(const struct vtrim_model * m, const struct vtrim_image * image, int32_t * n_tiles,
                                  int32_t * aspect_ratio_id) {
    struct vtrim_mllama_plan plan;
    const int32_t rc = vtrim_mllama_plan_image(image->width, image->height, &vtrim_mllama_of(m)->pp, &plan);
    if (rc == 0) {
        *n_tiles = plan.n_tiles;
        *aspect_ratio_id = plan.aspect_ratio_id;
    }
    return rc;
}

static void mllama_reduce_caps(const struct vtrim_model * m, struct vtrim_reduce_caps * caps) {
    const struct vtrim_mllama_hparams * hp = &vtrim_mllama_of(m)->hp;
    caps->n_cross = hp->n_cross;
    caps->first_cross_layer = hp->n_cross > 0 ? hp->cross_layers[0] : -1;
    caps->n_vision_layer = m->vision.n_layer_run;
}

// BOS (<|begin_of_text|>) comes from vtrim_tokenize's add_special.
static const struct vtrim_chat_template k_templates[] = {
    { "llama-3.2-vision", "<|start_header_id|>user<|end_header_id|>\n\n", "",
      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" },
    { NULL, NULL, NULL, NULL },
};

const struct vtrim_arch vtrim_arch_mllama = {
    .name = "mllama",
    .image_rows_in_decoder = false,
    .chat_templates = k_templates,
    .read_hparams = mllama_read_hparams,
    .bind_tensors = mllama_bind_tensors,
    .model_free = mllama_model_free,
    .image_placeholder = mllama_image_placeholder,
    .image_preprocess = mllama_image_preprocess,
    .image_tiles = mllama_image_tiles,
    .context_init = vtrim_mllama_context_init,
    .context_free = vtrim_mllama_context_free,
    .context_reset = vtrim_mllama_context_reset,
    .cache_bytes = vtrim_mllama_cache_bytes,
    .truncate = vtrim_mllama_truncate,
    .prefill_check = vtrim_mllama_prefill_check,
    .encode = vtrim_mllama_encode,
    .prepare_rows = vtrim_mllama_prepare_rows,
    .prefill_end = vtrim_mllama_prefill_end,
    .image_result = vtrim_mllama_image_result,
    .decoder_ext = vtrim_mllama_decoder_ext,
    .reduce_caps = mllama_reduce_caps,
    .cross_attn_stage = vtrim_mllama_cross_attn_stage,
};
