// The immutable model: hyperparameters, weight tensors in one backend buffer, vocabulary, image settings.
#pragma once

#include "image.h"
#include "vtrim.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <stdbool.h>
#include <stdint.h>

struct gguf_context;
struct vtrim_vocab;

enum vtrim_arch {
    VTRIM_ARCH_LLAMA,   // text only
    VTRIM_ARCH_LLAVA,   // llama + CLIP ViT + mlp2x projector
    VTRIM_ARCH_MLLAMA,  // Llama-3.2-Vision: tiled ViT + gated cross-attention layers in the decoder
};

struct vtrim_text_hparams {
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_ff;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;
    int32_t n_rot;
    float   rms_eps;
    float   rope_theta;
};

struct vtrim_vision_hparams {
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

struct vtrim_llama_layer {
    struct ggml_tensor * attn_norm;
    struct ggml_tensor * wq, * wk, * wv, * wo;
    struct ggml_tensor * ffn_norm;
    struct ggml_tensor * ffn_gate, * ffn_up, * ffn_down;
    // mllama cross-attention layers (is_cross): wq..wo are the cross projections, applied to the image states
    bool                 is_cross;
    int32_t              cross_index;          // among the cross layers
    struct ggml_tensor * q_norm, * k_norm;     // RMSNorm over head_dim
    struct ggml_tensor * attn_gate, * mlp_gate;  // [1], tanh-gated
};

// mllama's vision tower: local layers over all tiles, then gated global layers.
struct vtrim_mllama_vision_layer {
    struct ggml_tensor * ln1_w, * ln1_b, * ln2_w, * ln2_b;
    struct ggml_tensor * q_w, * k_w, * v_w, * o_w;
    struct ggml_tensor * fc1_w, * fc1_b, * fc2_w, * fc2_b;
    struct ggml_tensor * gate_attn, * gate_ffn;   // global layers only
};

struct vtrim_mllama_hparams {
    int32_t tile_size;          // pixels per tile side
    int32_t patch_size;
    int32_t n_pos;              // patches per tile + CLS
    int32_t n_pad;              // rows padding each tile to a multiple of 8 (as HF)
    int32_t n_embd, n_ff, n_head;
    int32_t n_layer, n_global_layer;
    float   eps;
    int32_t max_tiles;
    int32_t n_inter;            // intermediate layers concatenated to the output
    int32_t inter[16];
    int32_t output_dim;         // n_embd * (1 + n_inter)
    int32_t n_cross;            // cross-attention layers in the decoder
    int32_t max_images;         // images one prompt may hold
    int32_t cross_layers[64];   // decoder indices of the cross-attention layers
};

struct vtrim_model {
    enum vtrim_arch arch;
    char name[128];
    char chat_format[32];

    struct vtrim_text_hparams   text;
    struct vtrim_vision_hparams vision;
    bool has_vision;

    struct vtrim_vocab * vocab;
    int32_t image_token_id;
    struct vtrim_image_pp image_pp;

    // weights: metadata in ctx_w, data in buf_w on the chosen device
    struct ggml_context * ctx_w;
    ggml_backend_buffer_t buf_w;
    ggml_backend_dev_t    dev;        // device holding the weights (CPU or a GPU)
    int64_t n_params;
    int64_t n_bytes;

    // text
    struct ggml_tensor * tok_embd, * output_norm, * output;
    struct vtrim_llama_layer * layers;

    // vision tower and projector
    struct ggml_tensor * patch_embd, * class_embd, * pos_embd;
    struct ggml_tensor * pre_ln_w, * pre_ln_b, * post_ln_w, * post_ln_b;
    struct vtrim_clip_layer * vlayers;
    struct ggml_tensor * mm0_w, * mm0_b, * mm2_w, * mm2_b;

    // mllama
    struct vtrim_mllama_hparams mllama;
    struct vtrim_mllama_pp mllama_pp;                  // MllamaImageProcessor settings (aspect ratios too)
    struct ggml_tensor * rope_freqs;                   // llama3 RoPE frequency factors, or NULL
    struct ggml_tensor * mv_pos_gate, * mv_tile_pos, * mv_pre_tile, * mv_pre_tile_gate, * mv_post_tile,
                       * mv_post_tile_gate;
    struct vtrim_mllama_vision_layer * mvlayers;       // n_layer local, then n_global_layer global
    struct ggml_tensor * mm_w, * mm_b;
};


// A weight by name with its shape checked (a negative extent is not checked); VTRIM_ERR_FORMAT otherwise.
int32_t vtrim_model_tensor(const struct vtrim_model * model, const char * name, int64_t ne0, int64_t ne1, int64_t ne2,
                           struct ggml_tensor ** out);
