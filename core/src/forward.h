// Runs sets of rows through ranges of decoder layers, chunk by chunk, appending to the KV cache.
#pragma once

#include "context.h"

// The rows of a pass, in sequence order.
struct vtrim_rows {
    int32_t   n;
    int32_t * pos;        // RoPE position of each row (kept rows keep their original positions)
    int32_t * token;      // text token id, or -1 for an image row          (entering layer 0)
    int32_t * image_row;  // row of ctx->img_embd for image rows            (entering layer 0)
    float *   hidden;     // [n][n_embd] hidden states                      (entering a later layer)
    uint32_t * sees;      // mllama: the cached images each row cross-attends to (bit i: image i);
                          // NULL: every row sees what the sequence's last row saw
};

// Layers [il0, il1) over the rows. h_out ([n][n_embd]) receives the states after layer il1 - 1,
// h_in_last those entering layer il1 - 1; either may be NULL. With logits, il1 must be n_layer and
// ctx->logits receives the last row's logits. Advances kv->n of the layers it ran; on error the caller
// restores them.
int32_t vtrim_forward(struct vtrim_context * ctx, const struct vtrim_rows * rows, int il0, int il1, float * h_out,
                      float * h_in_last, bool logits);

// Mean attention probabilities of layer il over its cached rows, for the query rows q_rows (indices
// into rows, which must be the rows just appended to layer il, with h_in their states entering it).
// scores receives kv->n[il] floats.
int32_t vtrim_probe_attention(struct vtrim_context * ctx, const struct vtrim_rows * rows, const float * h_in, int il,
                              const int32_t * q_rows, int32_t n_q, float * scores);

// mllama: the cross-attention mask ([n][xc.n]) of n rows (sees: their images; NULL: the sequence's last row's),
// and their row mask (n floats, 0 for rows that see no image; may be NULL). A row that sees no image attends
// uniformly to every state, as HF does.
void vtrim_fill_cross_mask(const struct vtrim_context * ctx, const uint32_t * sees, int32_t n, float * cross_mask,
                           float * row_mask);
