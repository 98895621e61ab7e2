// Runs sets of rows through ranges of decoder layers, chunk by chunk, appending to the KV cache.
#pragma once

#include "runtime/context.h"

// The rows of a pass, in sequence order.
struct vtrim_rows {
    int32_t   n;
    int32_t * pos;        // RoPE position of each row (kept rows keep their original positions)
    int32_t * token;      // text token id, or -1 for an image row          (entering layer 0)
    int32_t * image_row;  // row of ctx->img.embd for image rows (entering layer 0; kept rows keep it), or NULL
    bool *    is_image;   // image rows (the candidates of decoder-layer reductions)
    float *   hidden;     // [n][n_embd] hidden states                      (entering a later layer)
    void *    arch_rows;  // the architecture's per-row data (mllama: the images each row sees), or NULL
};

void    vtrim_rows_free(struct vtrim_rows * r);
// The kept rows of `from` (ascending indices), with their hidden states taken from h ([from.n][n_embd]).
int32_t vtrim_rows_keep(const struct vtrim_rows * from, const int32_t * kept, int32_t n_kept, const float * h,
                        int32_t n_embd, struct vtrim_rows * to);
int32_t vtrim_rows_count_image(const struct vtrim_rows * r);

// Layers [il0, il1) over the rows. h_out ([n][n_embd]) receives the states after layer il1 - 1,
// h_in_last those entering layer il1 - 1, q_last ([n][head_dim * n_head]) layer il1 - 1's queries with RoPE;
// any may be NULL. With logits, il1 must be n_layer and
// ctx->logits receives the last row's logits. Advances kv->n of the layers it ran; on error the caller
// restores them.
int32_t vtrim_forward(struct vtrim_context * ctx, const struct vtrim_rows * rows, int il0, int il1, float * h_out,
                      float * h_in_last, float * q_last, bool logits);

// Mean attention probabilities of layer il over its cached rows, for the query rows q_rows (indices
// into rows, which must be the rows just appended to layer il, with h_in their states entering it).
// scores receives kv->n[il] floats.
int32_t vtrim_probe_attention(struct vtrim_context * ctx, const struct vtrim_rows * rows, const float * h_in, int il,
                              const int32_t * q_rows, int32_t n_q, float * scores);

// Head-mean pre-softmax logits of layer il among the rows (the rows just appended to layer il, with q their
// queries in it, as vtrim_forward's q_last), before any mask: attn[i * rows->n + j] = row i's (query) logit
// for row j (key).
int32_t vtrim_probe_logits(struct vtrim_context * ctx, const struct vtrim_rows * rows, const float * q, int il,
                           float * attn);
