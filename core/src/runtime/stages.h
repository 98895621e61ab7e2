// The hook executors the runtime owns: a decoder-layer hook (FastV, FiCoCo-L) and the vision-encoder hook. Each computes
// the scores its method asks for, calls the method's apply and carries out the answer; the cross-attention
// hook is its architecture's (arch->cross_attn_stage).
#pragma once

#include "runtime/forward.h"

// Decoder FLOPs of n new rows after n_cached cached ones, one layer: the matmuls and QK^T, AV.
double vtrim_layer_flops(const struct vtrim_text_hparams * hp, double n, double n_cached);

// A new stage record of the current prefill (zeroed, method and hook set).
struct vtrim_reduce_stage * vtrim_stage_new(struct vtrim_context * ctx, const struct vtrim_policy * p);

// Step `step` of policy p: rows just ran up to layer K = p->step_layers[step] (h_out: their states after
// K - 1; h_in: entering K - 1, for a probe of probabilities; q: K - 1's queries, for a matrix request).
// Computes the scores the method asks for from layer K - 1 (head-mean probabilities of its query rows, or the
// head-mean logit matrix among the rows), merges rows into h_out and keeps what the method says; rows
// becomes the kept rows. A multi-step policy has one stage record.
int32_t vtrim_stage_decoder(struct vtrim_context * ctx, const struct vtrim_policy * p, int32_t step,
                            struct vtrim_rows * rows, float * h_out, const float * h_in, const float * q);

// One step of an encoder policy inside the vision tower, for the image being encoded.
struct vtrim_vision_step {
    int32_t       step;     // of the policy's n_steps
    const float * attn;     // [n][n] head-mean pre-softmax logits among the rows (query-major) for a .matrix
                            // score request; NULL when the method asks for no scores
    int32_t *     orig;     // [n] each row's original tower row (CLS 0); rewritten to the kept rows'
    int32_t       grid;     // patches per side of the tower's grid
};

// Inside a vision layer: hidden ([n][n_embd]) becomes the *n_out kept rows, merged as the method says. The CLS
// row (row 0) is always kept. The policy's stage (one per prefill, over its steps and images: n_in patches
// in at step 0, n_kept out at the last) is *stage, for the tower's own FLOPs saved; the decoder's savings
// are added once the prompt is known (vtrim_stage_vision_decoder).
int32_t vtrim_stage_vision(struct vtrim_context * ctx, const struct vtrim_policy * p, const struct vtrim_vision_step * s,
                           float * hidden, int32_t n, int32_t n_embd, int32_t * n_out,
                           struct vtrim_reduce_stage ** stage);

// After the encode, before the decoder: the vision-encoder stages' decoder savings (KV bytes of all layers,
// FLOPs) for a prompt of n_full rows had no image row been dropped, in stage order.
void vtrim_stage_vision_decoder(struct vtrim_context * ctx, int64_t n_full);
