// Llama-3.2-Vision's tiled vision tower, as HF's MllamaVisionModel, and its attention mask.
#include "arch/mllama/mllama.h"

#include "graph/graph.h"

#include <math.h>

// One vision layer; gated layers (global) scale both branches by tanh(gate).
static struct ggml_tensor * vision_layer(struct ggml_context * ctx, const struct vtrim_mllama_hparams * hp,
                                         const struct vtrim_mllama_vision_layer * l, struct ggml_tensor * cur,
                                         struct ggml_tensor * mask, const struct vtrim_attn_plan * attn,
                                         int64_t tail_from) {
    const int64_t d = hp->n_embd, head_dim = d / hp->n_head, n = cur->ne[1];
    struct ggml_tensor * residual = cur;
    cur = vtrim_build_layer_norm(ctx, cur, l->ln1_w, l->ln1_b, hp->eps);
    struct ggml_tensor * q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, l->q_w, cur), head_dim, hp->n_head, n);
    struct ggml_tensor * k = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, l->k_w, cur), head_dim, hp->n_head, n);
    struct ggml_tensor * v = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, l->v_w, cur), head_dim, hp->n_head, n);
    cur = vtrim_build_vision_attn(ctx, attn, q, k, v, mask, 1.0f / sqrtf((float) head_dim), tail_from);
    cur = ggml_mul_mat(ctx, l->o_w, cur);
    if (l->gate_attn) {
        cur = ggml_mul(ctx, cur, ggml_tanh(ctx, vtrim_f32(ctx, l->gate_attn)));
    }
    cur = ggml_add(ctx, cur, residual);

    residual = cur;
    cur = vtrim_build_layer_norm(ctx, cur, l->ln2_w, l->ln2_b, hp->eps);
    cur = ggml_gelu_erf(ctx, vtrim_build_linear(ctx, cur, l->fc1_w, l->fc1_b));
    cur = vtrim_build_linear(ctx, cur, l->fc2_w, l->fc2_b);
    if (l->gate_ffn) {
        cur = ggml_mul(ctx, cur, ggml_tanh(ctx, vtrim_f32(ctx, l->gate_ffn)));
    }
    return ggml_add(ctx, cur, residual);
}

// An aspect-ratio embedding row [max_tiles * d] as [d, 1, max_tiles], scaled by tanh(gate).
static struct ggml_tensor * tile_embd(struct ggml_context * ctx, const struct vtrim_mllama_hparams * hp,
                                      struct ggml_tensor * table, struct ggml_tensor * gate,
                                      struct ggml_tensor * ar_id) {
    struct ggml_tensor * e = ggml_get_rows(ctx, table, ar_id);
    e = ggml_reshape_3d(ctx, e, hp->n_embd, 1, hp->max_tiles);
    return ggml_mul(ctx, e, ggml_tanh(ctx, vtrim_f32(ctx, gate)));
}

// [d, n_pos + n_pad, tiles] -> [d, n_pos * tiles], the padding rows dropped.
static struct ggml_tensor * unpad(struct ggml_context * ctx, const struct vtrim_mllama_hparams * hp,
                                  struct ggml_tensor * x) {
    const int64_t d = hp->n_embd, rows = hp->n_pos + hp->n_pad;
    x = ggml_reshape_3d(ctx, x, d, rows, hp->max_tiles);
    x = ggml_view_3d(ctx, x, d, hp->n_pos, hp->max_tiles, x->nb[1], x->nb[2], 0);
    return ggml_cont_2d(ctx, x, d, (int64_t) hp->n_pos * hp->max_tiles);
}

struct ggml_tensor * vtrim_mllama_build_vision(struct ggml_context * ctx, struct ggml_cgraph * gf,
                                               const struct vtrim_mllama * m, const struct vtrim_attn_plan * attn,
                                               int32_t n_tiles, struct vtrim_mllama_vision_inputs * in) {
    const struct vtrim_mllama_hparams * hp = &m->hp;
    const int64_t d = hp->n_embd, T = hp->max_tiles, side = hp->tile_size / hp->patch_size;
    const int64_t n_patch = side * side, rows = hp->n_pos + hp->n_pad, L = rows * T;
    // the padded tiles' rows see only the real tiles' (HF masks padding against padding)
    const int64_t tail_from = rows * (n_tiles > 0 && n_tiles < T ? n_tiles : T);

    in->pixels = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, hp->tile_size, hp->tile_size, 3, T);
    in->ar_id = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1);
    in->mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, L, L);
    ggml_set_input(in->pixels);
    ggml_set_input(in->ar_id);
    ggml_set_input(in->mask);

    struct ggml_tensor * cur = vtrim_build_patch_embd(ctx, m->patch_embd, in->pixels, hp->patch_size, d);
    cur = ggml_reshape_3d(ctx, cur, d, n_patch, T);
    cur = ggml_add(ctx, cur, tile_embd(ctx, hp, m->pre_tile, m->pre_tile_gate, in->ar_id));

    // CLS first in every tile, then the gated position embedding:
    // x + (1 - tanh g) * pos + tanh g * tile_pos[ar] = x + pos + tanh g * (tile_pos[ar] - pos).
    struct ggml_tensor * cls = ggml_repeat(ctx, ggml_reshape_3d(ctx, vtrim_f32(ctx, m->class_embd), d, 1, 1),
                                           ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, 1, T));
    cur = ggml_concat(ctx, cls, cur, 1);                                       // [d, n_pos, T]
    struct ggml_tensor * pos = vtrim_f32(ctx, m->pos_embd);                    // [d, n_pos]
    struct ggml_tensor * tile_pos = ggml_reshape_3d(ctx, ggml_get_rows(ctx, m->tile_pos, in->ar_id), d, hp->n_pos, T);
    cur = ggml_add(ctx, ggml_add(ctx, cur, pos),
                   ggml_mul(ctx, ggml_sub(ctx, tile_pos, pos), ggml_tanh(ctx, vtrim_f32(ctx, m->pos_gate))));
    // HF's layernorm_pre/post are nn.LayerNorm(d) with the default eps, not the config's norm_eps.
    cur = vtrim_build_layer_norm(ctx, cur, m->pre_ln_w, m->pre_ln_b, 1e-5f);

    // Zero rows pad each tile to a multiple of 8, as HF does; the mask treats them like padded tiles.
    if (hp->n_pad > 0) {
        cur = ggml_pad(ctx, cur, 0, hp->n_pad, 0, 0);
    }
    cur = ggml_reshape_2d(ctx, cur, d, L);

    struct ggml_tensor * inter = NULL;                                         // [n_inter, d, n_pos * T]
    for (int il = 0; il < hp->n_layer; il++) {
        cur = vision_layer(ctx, hp, &m->vlayers[il], cur, in->mask, attn, tail_from);
        for (int32_t i = 0; i < hp->n_inter; i++) {
            if (hp->inter[i] == il) {
                struct ggml_tensor * x = ggml_reshape_3d(ctx, unpad(ctx, hp, cur), 1, d, hp->n_pos * T);
                inter = inter ? ggml_concat(ctx, inter, x, 0) : x;
            }
        }
    }
    cur = vtrim_build_layer_norm(ctx, cur, m->post_ln_w, m->post_ln_b, 1e-5f);
    cur = ggml_reshape_3d(ctx, cur, d, rows, T);
    cur = ggml_add(ctx, cur, tile_embd(ctx, hp, m->post_tile, m->post_tile_gate, in->ar_id));
    cur = ggml_reshape_2d(ctx, cur, d, L);
    for (int il = 0; il < hp->n_global_layer; il++) {
        cur = vision_layer(ctx, hp, &m->vlayers[hp->n_layer + il], cur, in->mask, attn, tail_from);
    }
    // [global, intermediates interleaved as HF's stack(dim=-1)] per token, then the projector.
    cur = unpad(ctx, hp, cur);
    if (inter) {
        // Intermediate outputs were taken in layer order; HF stacks them in intermediate_layers_indices order.
        cur = ggml_concat(ctx, cur, ggml_reshape_2d(ctx, inter, d * hp->n_inter, hp->n_pos * T), 0);
    }
    cur = vtrim_build_linear(ctx, cur, m->mm_w, m->mm_b);                      // [n_embd_text, n_pos * T]
    vtrim_cb(cur, "image_states", -1);
    ggml_set_output(cur);
    ggml_build_forward_expand(gf, cur);
    return cur;
}

void vtrim_mllama_vision_mask(const struct vtrim_mllama * v, int32_t n_tiles, ggml_fp16_t * mask) {
    const struct vtrim_mllama_hparams * hp = &v->hp;
    const int32_t rows = hp->n_pos + hp->n_pad, L = rows * hp->max_tiles;
    const ggml_fp16_t masked = ggml_fp32_to_fp16(-INFINITY), visible = ggml_fp32_to_fp16(0.0f);
    for (int32_t i = 0; i < L; i++) {
        const bool pad_i = i / rows >= n_tiles || i % rows >= hp->n_pos;
        for (int32_t j = 0; j < L; j++) {
            const bool pad_j = j / rows >= n_tiles || j % rows >= hp->n_pos;
            mask[(size_t) i * L + j] = pad_i && pad_j ? masked : visible;
        }
    }
}

