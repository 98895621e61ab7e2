// FiCoCo's filter-correlate-compress step (arXiv 2411.17686; code kawhiiiileo/FiCoCo), shared by its two
// variants (reduce/ficoco_v.c in the vision tower, reduce/ficoco_l.c in the decoder). The variants compute the
// redundancy scores (their formulas differ); the step below is the same for both. Exact rules: docs/DESIGN.md,
// "FiCoCo". Only the FiCoCo files include this header.
#pragma once

#include "reduce/reduce.h"

// How many candidates step i (0-based) of n_steps removes when `total` go in all: total / n_steps, one more
// in the first total % n_steps steps.
int32_t vtrim_ficoco_step_drop(int32_t total, int32_t n_steps, int32_t step);

// FiCoCo-V's local penalty. The original grid x grid patch grid is cut into 2x2 windows (rows 2a..2a+1, columns
// 2b..2b+1; narrower at the edge when grid is odd). In each window holding >= 2 of the n candidates, the one of
// largest score (ties: the lower patch index) gets score <- 2 score if score > 0, else score / 2.
// patch[k]: candidate k's patch index (row-major, 0 .. grid * grid - 1), distinct.
int32_t vtrim_ficoco_local_penalty(float * score, const int32_t * patch, int32_t n, int32_t grid);

// One step over n_cand candidates of one image. cand[k] is candidate k's row in attn (ascending: candidates
// stay in their original order); attn[a * ld + b] is row a's head-mean pre-softmax logit for row b; score[k]
// is candidate k's redundancy.
// Filter: the r candidates of largest score (ties: the lower k) are dropped: keep[cand[k]] <- false.
// Correlate: each dropped candidate i picks among the KEPT candidates only the m = max(1, ceil((1 - eps) *
// n_kept - 1e-6)) of largest attn[i][j] (ties: the lower row), with weights softmax over those m of attn[i][j].
// The merges (src, dst = rows of attn, w) are appended to out->merge_* (capacity out->merge_cap, 0: n_cand);
// compress is the hook's (x_j <- (x_j + sum w x_src) / (1 + sum w), every merge reading the step's states).
// 0 < r < n_cand is required.
int32_t vtrim_ficoco_step(const int32_t * cand, int32_t n_cand, const float * attn, int32_t ld, const float * score,
                          int32_t r, float eps, bool * keep, struct vtrim_reduce_output * out);
