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

// Between vision layers: hidden ([n][n_embd]) becomes the *n_out kept rows, merged as the method says.
// The CLS row (row 0) is always kept. No method uses this hook yet: it passes no scores.
int32_t vtrim_stage_vision(struct vtrim_context * ctx, const struct vtrim_policy * p, float * hidden, int32_t n,
                           int32_t n_embd, int32_t * n_out);
