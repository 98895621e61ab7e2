// Llama-3.2-Vision (HF MllamaForConditionalGeneration): its model state (tiled vision tower, gated
// cross-attention layers), its context state (the cross-attention cache) and the pieces the entry in
// mllama.c puts together: vision.c (tower graph), cross.c (cross cache and layers), prefill.c (encode,
// which rows see which image, the cross-attention trim hook).
#pragma once

#include "image/image.h"
#include "kv/kv_cache.h"
#include "model/model.h"

struct vtrim_context;
struct vtrim_rows;
struct vtrim_policy;

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
    int32_t * inter;            // their indices, ascending
    int32_t output_dim;         // n_embd * (1 + n_inter)
    int32_t n_cross;            // cross-attention layers in the decoder
    int32_t * cross_layers;     // their decoder indices, ascending
    int32_t max_images;         // images one prompt may hold
};

// A vision layer: local layers over all tiles, then gated global layers.
struct vtrim_mllama_vision_layer {
    struct ggml_tensor * ln1_w, * ln1_b, * ln2_w, * ln2_b;
    struct ggml_tensor * q_w, * k_w, * v_w, * o_w;
    struct ggml_tensor * fc1_w, * fc1_b, * fc2_w, * fc2_b;
    struct ggml_tensor * gate_attn, * gate_ffn;   // global layers only
};

// A cross-attention decoder layer's own weights (its norms and MLP are the decoder layer's).
struct vtrim_mllama_cross_layer {
    struct ggml_tensor * wq, * wk, * wv, * wo;
    struct ggml_tensor * q_norm, * k_norm;       // RMSNorm over head_dim
    struct ggml_tensor * attn_gate, * mlp_gate;  // [1], tanh-gated
};

struct vtrim_mllama {
    struct vtrim_mllama_hparams hp;
    struct vtrim_mllama_pp      pp;             // MllamaImageProcessor settings (aspect ratios too)
    struct ggml_tensor * patch_embd, * class_embd, * pos_embd, * pos_gate, * tile_pos, * pre_tile, * pre_tile_gate,
                       * post_tile, * post_tile_gate, * pre_ln_w, * pre_ln_b, * post_ln_w, * post_ln_b;
    struct vtrim_mllama_vision_layer * vlayers; // n_layer local, then n_global_layer global
    struct vtrim_mllama_cross_layer *  xlayers; // per cross-attention layer
    int32_t *                          cross_index;   // per decoder layer: its index among the cross layers, or -1
    struct ggml_tensor * mm_w, * mm_b;
};

static inline const struct vtrim_mllama * vtrim_mllama_of(const struct vtrim_model * m) { return m->arch_state; }

// ---- vision.c ----

struct vtrim_mllama_vision_inputs {
    struct ggml_tensor * pixels;   // F32 [tile, tile, 3, max_tiles]: vtrim_mllama_preprocess's output
    struct ggml_tensor * ar_id;    // I32 [1]: the aspect ratio id (1-based)
    struct ggml_tensor * mask;     // F16 [L, L], L = max_tiles * (n_pos + n_pad): see vtrim_mllama_vision_mask
};

// One image of n_tiles real tiles through the vision tower and the projector: [n_embd_text, max_tiles * n_pos]
// states.
struct ggml_tensor * vtrim_mllama_build_vision(struct ggml_context * ctx, struct ggml_cgraph * gf,
                                               const struct vtrim_mllama * v, const struct vtrim_attn_plan * attn,
                                               int32_t n_tiles, struct vtrim_mllama_vision_inputs * in);
// HF's aspect-ratio attention mask: a row and a column that are both padding (a padded tile, or a row
// padding a tile to a multiple of 8) are masked; every other pair is visible. mask: L * L halves.
void vtrim_mllama_vision_mask(const struct vtrim_mllama * v, int32_t n_tiles, ggml_fp16_t * mask);

// ---- cross.c ----

// The cross-attention cache: K and V of the image states for every cross-attention layer, computed once per
// prefill that brings images and reused by every later token. Rows: image-major, tile, patch.
struct vtrim_cross_cache {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf[VTRIM_MAX_SPLIT];   // buf[0]: every layer's (the cache stays on the local device)
    enum ggml_type        type;
    int32_t               n_layer;     // cross-attention layers
    int32_t               n_rows;      // capacity
    int32_t               n_embd_kv;
    struct ggml_tensor ** k;           // [n_embd_kv, n_rows] per cross layer
    struct ggml_tensor ** v;           // [n_rows, n_embd_kv] per cross layer (transposed)
    int32_t               n;           // rows in use (0: no image yet, the cross layers are skipped)
    // After a trim, the layers marked trimmed hold only the kept states (their first n_kept rows), in the
    // order of kept[] (ascending original rows).
    int32_t               n_kept;
    int32_t *             kept;
    bool *                trimmed;     // per cross layer
    struct ggml_tensor *  states;      // F32 [n_embd, n_rows]: the image states, when a trim is to come
};

// n_embd_states > 0 also keeps the image states (for a trim that computes later layers' K/V from them).
int32_t vtrim_cross_cache_init(struct vtrim_cross_cache * xc, int32_t n_layer, int32_t n_rows, int32_t n_embd_kv,
                               enum ggml_type type, ggml_backend_buffer_type_t buft, int32_t n_embd_states);
void    vtrim_cross_cache_free(struct vtrim_cross_cache * xc);
// Rows cross layer i attends to.
int32_t vtrim_cross_layer_rows(const struct vtrim_cross_cache * xc, int32_t i);
int64_t vtrim_cross_cache_bytes_used(const struct vtrim_cross_cache * xc);

// K (k_norm applied) and V of the image states for cross layers [i0, i1), written at row0.
void vtrim_mllama_build_cross_kv(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_model * m,
                                 const struct vtrim_cross_cache * xc, struct ggml_tensor * states, int32_t row0,
                                 int32_t i0, int32_t i1);
// Per-head cross-attention probabilities of decoder layer il (a cross layer) for n_q query rows (h: their
// states entering the layer, [n_embd, n_q]; mask: [xc->n, n_q]), averaged over the rows: F32 [xc->n, n_head].
struct ggml_tensor * vtrim_mllama_build_cross_probe(struct ggml_context * ctx, const struct vtrim_model * m,
                                                    const struct vtrim_cross_cache * xc, int il, struct ggml_tensor * h,
                                                    struct ggml_tensor * mask);
// A gated cross-attention decoder layer. cross_mask: [rows of the layer, n] additive; row_mask: [1, n], 0 for
// rows that see no image.
struct ggml_tensor * vtrim_mllama_build_cross_layer(struct ggml_context * ctx, const struct vtrim_model * m, int il,
                                                    const struct vtrim_cross_cache * xc, struct ggml_tensor * cur,
                                                    struct ggml_tensor * cross_mask, struct ggml_tensor * row_mask);

// ---- prefill.c: the context state and the prefill parts ----

struct vtrim_mllama_ctx;
int32_t vtrim_mllama_context_init(struct vtrim_context * c);
void    vtrim_mllama_context_free(struct vtrim_context * c);
void    vtrim_mllama_context_reset(struct vtrim_context * c);
int32_t vtrim_mllama_truncate(struct vtrim_context * c, int32_t n_keep);
int64_t vtrim_mllama_cache_bytes(const struct vtrim_context * c);
int32_t vtrim_mllama_prefill_check(const struct vtrim_context * c, int32_t n_images);
int32_t vtrim_mllama_encode(struct vtrim_context * c, struct vtrim_image * const * images, int32_t n_images);
int32_t vtrim_mllama_prepare_rows(struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens,
                                  struct vtrim_rows * rows);
void    vtrim_mllama_prefill_end(struct vtrim_context * c, const struct vtrim_rows * rows, bool ok);
int32_t vtrim_mllama_image_result(struct vtrim_context * c, int32_t n_images, int32_t * n_image_tokens,
                                  int32_t * n_kept);
const struct vtrim_decoder_ext * vtrim_mllama_decoder_ext(struct vtrim_context * c);
int32_t vtrim_mllama_cross_attn_stage(struct vtrim_context * c, const struct vtrim_policy * p,
                                      const struct vtrim_rows * rows, const float * h_in);
// The images each prompt row cross-attends to (bit i: image i), as HF's get_cross_attention_token_mask.
int32_t vtrim_mllama_cross_visibility(int32_t image_token_id, const int32_t * tokens, int32_t n, uint32_t * sees);
