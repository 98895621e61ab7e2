// The CLIP ViT vision tower as HF's LlavaForConditionalGeneration uses it, and the mlp2x projector.
#include "arch/llava/clip.h"

#include "api/error.h"
#include "graph/graph.h"
#include "model/gguf_util.h"

#include "gguf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int32_t vtrim_clip_read_hparams(struct vtrim_clip * v, const struct gguf_context * g, bool legacy) {
    struct vtrim_clip_hparams * hp = &v->hp;
    int32_t rc;
    hp->eps = 1e-5f;
    if ((rc = vtrim_gguf_i32(g, "clip.vision.image_size", &hp->image_size, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "clip.vision.patch_size", &hp->patch_size, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "clip.vision.embedding_length", &hp->n_embd, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "clip.vision.feed_forward_length", &hp->n_ff, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "clip.vision.block_count", &hp->n_layer, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, "clip.vision.attention.head_count", &hp->n_head, true)) < 0 ||
        (rc = vtrim_gguf_f32(g, "clip.vision.attention.layer_norm_epsilon", &hp->eps, false)) < 0) {
        return rc;
    }
    hp->use_gelu = false;
    if ((rc = vtrim_gguf_bool(g, "clip.use_gelu", &hp->use_gelu, false)) < 0) {
        return rc;
    }
    if (hp->image_size <= 0 || hp->patch_size <= 0 || hp->image_size % hp->patch_size != 0 || hp->n_embd <= 0 ||
        hp->n_head <= 0 || hp->n_embd % hp->n_head != 0 || hp->n_layer <= 0 || hp->n_ff <= 0 || hp->n_layer > 1024) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "invalid vision hyperparameters (image %d, patch %d, width %d, heads %d)",
                          hp->image_size, hp->patch_size, hp->n_embd, hp->n_head);
    }
    const int32_t side = hp->image_size / hp->patch_size;
    hp->n_patches = side * side;

    // llama.cpp's legacy layout stores only the layers HF runs (n - 1 for LLaVA-1.5's feature layer -2), and
    // sometimes clip.vision.feature_layer, non-negative as hidden_states counts. Without that key llama.cpp
    // itself runs one stored layer fewer; we run what HF runs. Ours stores all of HF's layers and the feature
    // layer as HF counts it (hidden_states[feature_layer], negative from the end).
    int32_t feature_layer = legacy ? hp->n_layer : -2;
    if (legacy) {
        int32_t layers[8], n_layers = 0;
        if ((rc = vtrim_gguf_i32_array(g, "clip.vision.feature_layer", layers, 8, &n_layers, false)) < 0) {
            return rc;
        }
        if (n_layers > 1) {
            return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "%d vision feature layers (LLaVA-1.5 takes one)", n_layers);
        }
        if (n_layers == 1 && layers[0] < 0) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "clip.vision.feature_layer %d is negative", layers[0]);
        }
        feature_layer = n_layers == 1 ? layers[0] : feature_layer;
    } else if ((rc = vtrim_gguf_i32(g, "vtrim.vision.feature_layer", &feature_layer, false)) < 0) {
        return rc;
    }
    hp->n_layer_run = feature_layer < 0 ? hp->n_layer + 1 + feature_layer : feature_layer;
    if (hp->n_layer_run < 0 || hp->n_layer_run > hp->n_layer) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "vision feature layer %d is outside the %d layers", feature_layer,
                          hp->n_layer);
    }
    char select[32] = "default";
    if ((rc = vtrim_gguf_str(g, "vtrim.vision.feature_select", select, sizeof select, false)) < 0) {
        return rc;
    }
    if (strcmp(select, "default") != 0 && strcmp(select, "full") != 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "vision feature select strategy '%s'", select);
    }
    hp->keep_cls = strcmp(select, "full") == 0;
    hp->n_image_tokens = hp->n_patches + (hp->keep_cls ? 1 : 0);

    char act[32] = "gelu";
    if ((rc = vtrim_gguf_str(g, "vtrim.projector.act", act, sizeof act, false)) < 0) {
        return rc;
    }
    if (strcmp(act, "gelu") != 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "projector activation '%s' (only 'gelu')", act);
    }
    char proj[32] = "mlp";
    if ((rc = vtrim_gguf_str(g, "clip.projector_type", proj, sizeof proj, false)) < 0) {
        return rc;
    }
    if (strcmp(proj, "mlp") != 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "projector type '%s' (only LLaVA-1.5's 'mlp')", proj);
    }
    return 0;
}

static int32_t bind_layer(struct vtrim_clip * v, const struct vtrim_model * m, int il) {
    const struct vtrim_clip_hparams * hp = &v->hp;
    struct vtrim_clip_layer * l = &v->layers[il];
    const int64_t d = hp->n_embd;
    struct ggml_tensor * up_w, * up_b, * down_w, * down_b;
    int32_t rc;
    if ((rc = vtrim_model_tensorf(m, &l->ln1_w, d, 1, "v.blk.%d.ln1.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->ln1_b, d, 1, "v.blk.%d.ln1.bias", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->q_w, d, d, "v.blk.%d.attn_q.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->q_b, d, 1, "v.blk.%d.attn_q.bias", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->k_w, d, d, "v.blk.%d.attn_k.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->k_b, d, 1, "v.blk.%d.attn_k.bias", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->v_w, d, d, "v.blk.%d.attn_v.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->v_b, d, 1, "v.blk.%d.attn_v.bias", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->o_w, d, d, "v.blk.%d.attn_out.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->o_b, d, 1, "v.blk.%d.attn_out.bias", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->ln2_w, d, 1, "v.blk.%d.ln2.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &l->ln2_b, d, 1, "v.blk.%d.ln2.bias", il)) < 0 ||
        // fc1 (d -> n_ff) and fc2 (n_ff -> d): llama.cpp's legacy converter stores them under swapped names,
        // so take them by shape.
        (rc = vtrim_model_tensorf(m, &up_w, -1, -1, "v.blk.%d.ffn_up.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &up_b, -1, 1, "v.blk.%d.ffn_up.bias", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &down_w, -1, -1, "v.blk.%d.ffn_down.weight", il)) < 0 ||
        (rc = vtrim_model_tensorf(m, &down_b, -1, 1, "v.blk.%d.ffn_down.bias", il)) < 0) {
        return rc;
    }
    if (up_w->ne[0] == d && up_w->ne[1] == hp->n_ff && down_w->ne[0] == hp->n_ff && down_w->ne[1] == d) {
        l->fc1_w = up_w; l->fc1_b = up_b; l->fc2_w = down_w; l->fc2_b = down_b;
    } else if (down_w->ne[0] == d && down_w->ne[1] == hp->n_ff && up_w->ne[0] == hp->n_ff && up_w->ne[1] == d) {
        l->fc1_w = down_w; l->fc1_b = down_b; l->fc2_w = up_w; l->fc2_b = up_b;
    } else {
        return vtrim_fail(VTRIM_ERR_FORMAT, "v.blk.%d ffn weights do not match width %lld and ffn %d", il,
                          (long long) d, hp->n_ff);
    }
    if (l->fc1_b->ne[0] != hp->n_ff || l->fc2_b->ne[0] != d) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "v.blk.%d ffn biases have the wrong size", il);
    }
    return 0;
}

int32_t vtrim_clip_bind_tensors(struct vtrim_clip * v, const struct vtrim_model * m) {
    const struct vtrim_clip_hparams * hp = &v->hp;
    const int64_t d = hp->n_embd, p = hp->patch_size, n_embd_text = m->text.n_embd;
    int32_t rc;
    v->attn = m->vision_attn;
    if ((rc = vtrim_model_tensor(m, "v.patch_embd.weight", p, p, 3, &v->patch_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.class_embd", d, 1, 1, &v->class_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.position_embd.weight", d, hp->n_patches + 1, 1, &v->pos_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_ln.weight", d, 1, 1, &v->pre_ln_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "v.pre_ln.bias", d, 1, 1, &v->pre_ln_b)) < 0 ||
        (rc = vtrim_model_tensor(m, "mm.0.weight", d, -1, 1, &v->mm0_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "mm.0.bias", v->mm0_w->ne[1], 1, 1, &v->mm0_b)) < 0) {
        return rc;
    }
    // A projector whose output width is not the text model's is the usual symptom of an mmproj from another
    // model: say that, rather than which tensor's shape is off.
    const struct ggml_tensor * mm2 = ggml_get_tensor(m->ctx_w, "mm.2.weight");
    if (mm2 && mm2->ne[1] != n_embd_text) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "the vision projector outputs %lld-wide embeddings but the text model "
                          "is %lld wide: the vision tower (mmproj) and the text model are not from the same model",
                          (long long) mm2->ne[1], (long long) n_embd_text);
    }
    if ((rc = vtrim_model_tensor(m, "mm.2.weight", v->mm0_w->ne[1], n_embd_text, 1, &v->mm2_w)) < 0 ||
        (rc = vtrim_model_tensor(m, "mm.2.bias", n_embd_text, 1, 1, &v->mm2_b)) < 0) {
        return rc;
    }
    if (v->patch_embd->ne[3] != d) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "v.patch_embd.weight has %lld output channels, expected %lld",
                          (long long) v->patch_embd->ne[3], (long long) d);
    }
    if (ggml_is_quantized(v->patch_embd->type)) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "v.patch_embd.weight must be f32 or f16");
    }
    v->layers = calloc((size_t) hp->n_layer, sizeof *v->layers);
    if (!v->layers) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int il = 0; il < hp->n_layer_run; il++) {
        if ((rc = bind_layer(v, m, il)) < 0) {
            return rc;
        }
    }
    return 0;
}

void vtrim_clip_free(struct vtrim_clip * v) {
    free(v->layers);
    v->layers = NULL;
}

struct ggml_tensor * vtrim_clip_build_embed(struct ggml_context * ctx, const struct vtrim_clip * v,
                                            struct ggml_tensor ** pixels) {
    const struct vtrim_clip_hparams * hp = &v->hp;
    const int64_t d = hp->n_embd;
    *pixels = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, hp->image_size, hp->image_size, 3);
    ggml_set_name(*pixels, "pixels");
    ggml_set_input(*pixels);
    struct ggml_tensor * cur = vtrim_build_patch_embd(ctx, v->patch_embd, *pixels, hp->patch_size, d);
    cur = ggml_concat(ctx, ggml_reshape_2d(ctx, v->class_embd, d, 1), cur, 1);   // CLS first
    // The CPU backend adds only an f32 table to f32 activations; f16 files store the table as f16.
    cur = ggml_add(ctx, cur, vtrim_f32(ctx, v->pos_embd));
    cur = vtrim_build_layer_norm(ctx, cur, v->pre_ln_w, v->pre_ln_b, hp->eps);
    vtrim_cb(cur, "v_pre_ln", -1);
    return cur;
}

struct ggml_tensor * vtrim_clip_build_attn(struct ggml_context * ctx, const struct vtrim_clip * v,
                                           struct ggml_tensor * cur, int il, struct ggml_tensor ** q_out,
                                           struct ggml_tensor ** k_out) {
    const struct vtrim_clip_hparams * hp = &v->hp;
    const int64_t d = hp->n_embd, head_dim = d / hp->n_head, n_pos = cur->ne[1];
    const struct vtrim_clip_layer * l = &v->layers[il];
    struct ggml_tensor * residual = cur;
    cur = vtrim_build_layer_norm(ctx, cur, l->ln1_w, l->ln1_b, hp->eps);
    struct ggml_tensor * q = ggml_reshape_3d(ctx, vtrim_build_linear(ctx, cur, l->q_w, l->q_b), head_dim, hp->n_head, n_pos);
    struct ggml_tensor * k = ggml_reshape_3d(ctx, vtrim_build_linear(ctx, cur, l->k_w, l->k_b), head_dim, hp->n_head, n_pos);
    struct ggml_tensor * vv = ggml_reshape_3d(ctx, vtrim_build_linear(ctx, cur, l->v_w, l->v_b), head_dim, hp->n_head, n_pos);
    if (q_out) {
        *q_out = q;
        *k_out = k;
    }
    cur = vtrim_build_vision_attn(ctx, &v->attn, q, k, vv, NULL, vtrim_clip_attn_scale(v), n_pos);
    cur = vtrim_build_linear(ctx, cur, l->o_w, l->o_b);
    return ggml_add(ctx, cur, residual);
}

struct ggml_tensor * vtrim_clip_build_mlp(struct ggml_context * ctx, const struct vtrim_clip * v,
                                          struct ggml_tensor * cur, int il) {
    const struct vtrim_clip_hparams * hp = &v->hp;
    const struct vtrim_clip_layer * l = &v->layers[il];
    struct ggml_tensor * residual = cur;
    cur = vtrim_build_layer_norm(ctx, cur, l->ln2_w, l->ln2_b, hp->eps);
    cur = vtrim_build_linear(ctx, cur, l->fc1_w, l->fc1_b);
    cur = hp->use_gelu ? ggml_gelu_erf(ctx, cur) : vtrim_build_quick_gelu(ctx, cur);
    cur = vtrim_build_linear(ctx, cur, l->fc2_w, l->fc2_b);
    cur = ggml_add(ctx, cur, residual);
    vtrim_cb(cur, "v_l_out", il);
    return cur;
}

struct ggml_tensor * vtrim_clip_build_layers(struct ggml_context * ctx, const struct vtrim_clip * v,
                                             struct ggml_tensor * cur, int il0, int il1) {
    for (int il = il0; il < il1; il++) {
        cur = vtrim_clip_build_mlp(ctx, v, vtrim_clip_build_attn(ctx, v, cur, il, NULL, NULL), il);
    }
    return cur;
}

float vtrim_clip_attn_scale(const struct vtrim_clip * v) {
    return 1.0f / sqrtf((float) (v->hp.n_embd / v->hp.n_head));
}

// Matmul FLOPs (2 per multiply-add) of n rows: attention half (ln1, q/k/v/o, QK^T and AV), MLP half, head.
double vtrim_clip_attn_flops(const struct vtrim_clip * v, double n) {
    const double d = v->hp.n_embd;
    return 2.0 * n * 4.0 * d * d + 4.0 * n * n * d;
}

double vtrim_clip_mlp_flops(const struct vtrim_clip * v, double n) {
    return 2.0 * n * 2.0 * (double) v->hp.n_embd * v->hp.n_ff;
}

double vtrim_clip_head_flops(const struct vtrim_clip * v, double n) {
    const double n_out = v->hp.keep_cls ? n : n - 1.0;
    return 2.0 * n_out * ((double) v->mm0_w->ne[0] * v->mm0_w->ne[1] + (double) v->mm2_w->ne[0] * v->mm2_w->ne[1]);
}

struct ggml_tensor * vtrim_clip_build_head(struct ggml_context * ctx, const struct vtrim_clip * v,
                                           struct ggml_tensor * cur, bool head_drops_cls) {
    if (head_drops_cls && !v->hp.keep_cls) {
        cur = ggml_view_2d(ctx, cur, cur->ne[0], cur->ne[1] - 1, cur->nb[1], cur->nb[1]);
    }
    cur = vtrim_build_linear(ctx, cur, v->mm0_w, v->mm0_b);
    cur = ggml_gelu_erf(ctx, cur);
    cur = vtrim_build_linear(ctx, cur, v->mm2_w, v->mm2_b);
    vtrim_cb(cur, "image_embd", -1);
    return cur;
}
