// Graph pieces of Llama-3.2-Vision (mllama_graph.c).
#pragma once

#include "kv_cache.h"
#include "model.h"

struct vtrim_mllama_vision_inputs {
    struct ggml_tensor * pixels;   // F32 [tile, tile, 3, max_tiles]: vtrim_mllama_preprocess's output
    struct ggml_tensor * ar_id;    // I32 [1]: the aspect ratio id (1-based)
    struct ggml_tensor * mask;     // F16 [L, L], L = max_tiles * (n_pos + n_pad): see vtrim_mllama_vision_mask
};

// One image through the vision tower and the projector: [n_embd_text, max_tiles * n_pos] states.
struct ggml_tensor * vtrim_mllama_build_vision(struct ggml_context * ctx, struct ggml_cgraph * gf,
                                               const struct vtrim_model * m, struct vtrim_mllama_vision_inputs * in);

// HF's aspect-ratio attention mask: a row and a column that are both padding (a padded tile, or a row
// padding a tile to a multiple of 8) are masked; every other pair is visible. mask: L * L halves.
void vtrim_mllama_vision_mask(const struct vtrim_model * m, int32_t n_tiles, ggml_fp16_t * mask);

// K (k_norm applied) and V of the image states for cross layers [i0, i1), written at row0.
void vtrim_mllama_build_cross_kv(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_model * m,
                                 const struct vtrim_cross_cache * xc, struct ggml_tensor * states, int32_t row0,
                                 int32_t i0, int32_t i1);

// Per-head cross-attention probabilities of cross layer il for n_q query rows (h: their states entering the
// layer, [n_embd, n_q]; mask: [xc->n, n_q]), averaged over the rows: F32 [xc->n, n_head].
struct ggml_tensor * vtrim_mllama_build_cross_probe(struct ggml_context * ctx, const struct vtrim_model * m,
                                                    const struct vtrim_cross_cache * xc, int il, struct ggml_tensor * h,
                                                    struct ggml_tensor * mask);

// A gated cross-attention decoder layer. cross_mask: [xc->n, n] additive; row_mask: [1, n], 0 for rows that
// see no image.
struct ggml_tensor * vtrim_mllama_build_cross_layer(struct ggml_context * ctx, const struct vtrim_model * m,
                                                    const struct vtrim_llama_layer * l,
                                                    const struct vtrim_cross_cache * xc, struct ggml_tensor * cur,
                                                    struct ggml_tensor * cross_mask, struct ggml_tensor * row_mask,
                                                    int il);
