// Graph pieces of the Llama decoder, shared by LLaVA (and the text stack of mllama).
#pragma once

#include "kv_cache.h"
#include "model.h"

#define VTRIM_MAX_MASKS 8

// Self-attention reads the cache in multiples of VTRIM_KV_PAD rows (the rows past the sequence masked), as
// llama.cpp pads n_kv: the product of the probabilities with V then has an aligned inner dimension, which the
// tinyBLAS kernels need (an unaligned one falls back to ggml's generic path, ~10% of a prefill).
#define VTRIM_KV_PAD 32
int32_t vtrim_llama_n_kv_padded(int32_t n_kv, int32_t n_ctx);

// Input tensors a decoder graph asks the caller to fill (NULL when absent).
struct vtrim_llama_inputs {
    struct ggml_tensor * text_ids;    // I32 [n_text]: token ids of the text rows, in order      (il0 == 0)
    struct ggml_tensor * image_embd;  // F32 [n_embd, n_image]: image embeddings, in order        (il0 == 0)
    struct ggml_tensor * order;       // I32 [n]: row of [text..., image...] for each row          (il0 == 0)
    struct ggml_tensor * hidden;      // F32 [n_embd, n]: the rows' hidden states entering il0     (il0 > 0)
    struct ggml_tensor * pos;         // I32 [n]: RoPE positions
    // Causal masks, one per distinct number of cached rows among the layers: mask[i] is
    // [vtrim_llama_n_kv_padded(n_cached + n), n], row r seeing columns 0 .. n_cached + r.
    struct ggml_tensor * cross_mask;  // F32 [xc->n, n]: image states each row sees (mllama)
    struct ggml_tensor * cross_mask_kept;  // F32 [xc->n_kept, n]: the same, columns of the kept states only
    struct ggml_tensor * row_mask;    // F32 [1, n]: 0 for rows that see no image
    int                  n_masks;
    struct ggml_tensor * mask[VTRIM_MAX_MASKS];
    int32_t              mask_n_cached[VTRIM_MAX_MASKS];
};

enum vtrim_llama_want {
    VTRIM_WANT_LOGITS    = 1,   // logits of the last row ([n_vocab, 1]); needs il1 == n_layer
    VTRIM_WANT_HIDDEN    = 2,   // the rows' hidden states after layer il1 - 1
    VTRIM_WANT_H_IN_LAST = 4,   // the rows' hidden states entering layer il1 - 1 (to probe its attention)
};

struct vtrim_llama_outputs {
    struct ggml_tensor * logits;
    struct ggml_tensor * hidden;
    struct ggml_tensor * h_in_last;
};

// Layers [il0, il1) over n rows (n_text + n_image of them when il0 == 0), appending their K/V at row
// kv->n[il] of each layer. Does not advance kv->n.
// xc: mllama's cross-attention cache, or NULL.
void vtrim_llama_build(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_model * m,
                       const struct vtrim_kv_cache * kv, const struct vtrim_cross_cache * xc, int il0, int il1,
                       int32_t n_text, int32_t n_image, int32_t n, int want, struct vtrim_llama_inputs * in,
                       struct vtrim_llama_outputs * out);

// Mean attention probabilities of layer il for n_q query rows (their hidden states entering layer il,
// [n_embd, n_q]) over the layer's kv->n[il] cached rows: F32 [kv->n[il]]. Fills *pos (I32 [n_q]) and
// *mask (F32 [kv->n[il], n_q]) as inputs.
struct ggml_tensor * vtrim_llama_build_attn_probe(struct ggml_context * ctx, const struct vtrim_model * m,
                                                  const struct vtrim_kv_cache * kv, int il, struct ggml_tensor * h,
                                                  struct ggml_tensor ** pos, struct ggml_tensor ** mask);
