// Visual-token reduction policies (DESIGN.md rule 5). A policy is data plus pure functions: the forward
// pass calls it at its hook with the scores it asked for, and it answers which rows survive. It never
// reaches back into the context or the API.
#pragma once

#include "model.h"
#include "vtrim.h"

#include <stdbool.h>

#define VTRIM_MAX_POLICIES 4

// A score and the row it ranks, sorted by vtrim_rank_sort: higher score first, then the lower row.
struct vtrim_ranked {
    float   score;
    int32_t row;
};
void vtrim_rank_sort(struct vtrim_ranked * r, int32_t n);

// Checks p against the model; VTRIM_ERR_INVALID_ARG with the reason.
int32_t vtrim_reduce_validate(const struct vtrim_model * m, const struct vtrim_reduce_params * p);
enum vtrim_hook vtrim_reduce_hook(const struct vtrim_reduce_params * p);
// For VTRIM_HOOK_DECODER_LAYER: the first layer that runs on the reduced rows.
int32_t vtrim_reduce_layer(const struct vtrim_reduce_params * p);

// Trimmed Llama (trim.c). scores: [n_head][n_x] per-head mean probabilities of the first cross layer's
// query rows. Each image i (states [off[i], off[i] + visible[i]), its real tiles) keeps its own share:
// union mode, the union over heads of each head's top int(k_ratio * visible) (at least 1); budget mode,
// the top int(keep * visible) (at least 1) by the head-mean. Ties: lower row first. kept: ascending rows.
int32_t vtrim_trim_select(const struct vtrim_reduce_params * p, const float * scores, int32_t n_head, int32_t n_x,
                          const int32_t * off, const int32_t * visible, int32_t n_images, int32_t * kept,
                          int32_t * n_kept);

// FastV (fastv.c). The query rows whose layer-(K-1) attention ranks the image rows: the last row, or the
// text rows after the last image row. Returns their count in q_rows (capacity n).
int32_t vtrim_fastv_query_rows(const struct vtrim_reduce_params * p, const bool * is_image, int32_t n,
                               int32_t * q_rows);
// Marks the image rows to keep: the top int((1 - ratio) * n_image) by score (ties: lower row first).
// Text rows are always kept. Returns the number of image rows kept.
int32_t vtrim_fastv_select(const struct vtrim_reduce_params * p, const bool * is_image, const float * scores,
                           int32_t n, bool * keep);
