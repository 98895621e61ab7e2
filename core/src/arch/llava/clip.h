// The CLIP ViT vision tower (LLaVA-1.5) and its mlp2x projector: hyperparameters, weights, graph.
#pragma once

#include "model/model.h"

#include <stdbool.h>

struct gguf_context;

struct vtrim_clip_hparams {
    int32_t image_size;
    int32_t patch_size;
    int32_t n_patches;        // (image_size / patch_size)^2
    int32_t n_embd;
    int32_t n_ff;
    int32_t n_head;
    int32_t n_layer;          // layers stored in the file
    int32_t n_layer_run;      // layers up to the selected feature layer
    float   eps;
    bool    use_gelu;         // exact GELU; else quick GELU (CLIP)
    bool    keep_cls;         // feature select "full"
    int32_t n_image_tokens;   // embeddings per image handed to the decoder
};

struct vtrim_clip_layer {
    struct ggml_tensor * ln1_w, * ln1_b;
    struct ggml_tensor * q_w, * q_b, * k_w, * k_b, * v_w, * v_b, * o_w, * o_b;
    struct ggml_tensor * ln2_w, * ln2_b;
    struct ggml_tensor * fc1_w, * fc1_b;   // n_embd -> n_ff
    struct ggml_tensor * fc2_w, * fc2_b;   // n_ff -> n_embd
};

struct vtrim_clip {
    struct vtrim_clip_hparams hp;
    struct ggml_tensor * patch_embd, * class_embd, * pos_embd, * pre_ln_w, * pre_ln_b;
    struct vtrim_clip_layer * layers;      // n_layer_run bound
    struct ggml_tensor * mm0_w, * mm0_b, * mm2_w, * mm2_b;
    struct vtrim_attn_plan attn;          // the model's (vtrim_model_params.vision_attn)
};

// legacy: llama.cpp's mmproj layout (see clip.c for how its layer count differs).
int32_t vtrim_clip_read_hparams(struct vtrim_clip * v, const struct gguf_context * g, bool legacy);
int32_t vtrim_clip_bind_tensors(struct vtrim_clip * v, const struct vtrim_model * m);
void    vtrim_clip_free(struct vtrim_clip * v);

// The tower in parts (embed, layers, head; a layer also in halves, below):
// embed: *pixels (F32 [image_size, image_size, 3], vtrim_image_preprocess's CHW floats) -> [n_embd, n_patches + 1];
// layers [il0, il1) on any number of rows; head: feature select and projector -> [n_embd_text, n_rows].
// head_drops_cls: the rows still hold the CLS row first, which the "default" feature select drops.
struct ggml_tensor * vtrim_clip_build_embed(struct ggml_context * ctx, const struct vtrim_clip * v,
                                            struct ggml_tensor ** pixels);
struct ggml_tensor * vtrim_clip_build_layers(struct ggml_context * ctx, const struct vtrim_clip * v,
                                             struct ggml_tensor * cur, int il0, int il1);
// One layer in two halves, so that a reduction can act inside it, after the attention residual and before the
// MLP (VTRIM_HOOK_VISION_ENCODER): attn: x + attn(ln1(x)), with the layer's q and k ([head_dim, n_head, n])
// when q_out is not NULL (a probe reads them); mlp: h + mlp(ln2(h)). build_layers is both, layer by layer.
struct ggml_tensor * vtrim_clip_build_attn(struct ggml_context * ctx, const struct vtrim_clip * v,
                                           struct ggml_tensor * cur, int il, struct ggml_tensor ** q_out,
                                           struct ggml_tensor ** k_out);
struct ggml_tensor * vtrim_clip_build_mlp(struct ggml_context * ctx, const struct vtrim_clip * v,
                                          struct ggml_tensor * cur, int il);
float vtrim_clip_attn_scale(const struct vtrim_clip * v);   // 1 / sqrt(head_dim)
// Estimated FLOPs of n rows through one layer's attention half, MLP half, and the head (projector).
double vtrim_clip_attn_flops(const struct vtrim_clip * v, double n);
double vtrim_clip_mlp_flops(const struct vtrim_clip * v, double n);
double vtrim_clip_head_flops(const struct vtrim_clip * v, double n);
struct ggml_tensor * vtrim_clip_build_head(struct ggml_context * ctx, const struct vtrim_clip * v,
                                           struct ggml_tensor * cur, bool head_drops_cls);
