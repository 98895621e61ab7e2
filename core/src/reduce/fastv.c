// FastV (arXiv 2403.06764; code pkunlp-icler/FastV), as docs/DESIGN.md decides: rank the image rows by the
// head-mean attention of layer K-1, keep the top (1 - R) of them, with all text rows, in their order and
// with their original positions.
#include "reduce/reduce.h"

#include "api/error.h"

#include <math.h>
#include <stdlib.h>

void vtrim_fastv_default(struct vtrim_fastv_params * p) {
    if (p) {
        *p = (struct vtrim_fastv_params) { .k = 2, .ratio = 0.5f, .score = VTRIM_FASTV_SCORE_LAST };
    }
}

static int32_t fastv_validate(const void * params, const struct vtrim_reduce_caps * caps) {
    const struct vtrim_fastv_params * p = params;
    if (!caps->image_rows_in_decoder) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FastV prunes image tokens in the decoder's self-attention; "
                          "this model has none");
    }
    if (p->k < 1 || p->k >= caps->n_layer) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FastV k=%d: must be in [1, %d] (the decoder has %d layers)",
                          p->k, caps->n_layer - 1, caps->n_layer);
    }
    if (!(p->ratio >= 0.0f && p->ratio <= 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FastV ratio=%g: must be in [0, 1]", (double) p->ratio);
    }
    if (p->score != VTRIM_FASTV_SCORE_LAST && p->score != VTRIM_FASTV_SCORE_MEAN) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FastV score %d: must be last (0) or mean (1)", p->score);
    }
    return 0;
}

static int32_t fastv_layer(const void * params, const struct vtrim_reduce_caps * caps) {
    return ((const struct vtrim_fastv_params *) params)->k;
}

// The last row, or the text rows after the last image row.
static int32_t fastv_query_rows(const void * params, const bool * is_image, int32_t n, int32_t * q_rows) {
    const struct vtrim_fastv_params * p = params;
    if (p->score == VTRIM_FASTV_SCORE_LAST) {
        q_rows[0] = n - 1;
        return 1;
    }
    return vtrim_rows_after_last_image(is_image, n, q_rows);
}

// The top int((1 - ratio) * n_image) image rows by score (ties: lower row first), every text row, and the
// last row (whose logits the prefill returns).
static int32_t fastv_apply(const void * params, const struct vtrim_reduce_input * in, struct vtrim_reduce_output * out) {
    const struct vtrim_fastv_params * p = params;
    const int32_t n = in->n;
    bool * keep = malloc(sizeof(bool) * (size_t) n);
    int32_t n_image = 0;
    for (int32_t i = 0; keep && i < n; i++) {
        n_image += in->is_image[i];
        keep[i] = !in->is_image[i];
    }
    // int() of the kept fraction as the official code does, guarded against 0.3 * 10 = 2.9999...
    const int32_t n_keep = (int32_t) floor((1.0 - (double) p->ratio) * n_image + 1e-6);
    struct vtrim_ranked * r = malloc(sizeof *r * (size_t) (n_image > 0 ? n_image : 1));
    if (!keep || !r) {
        free(keep);
        free(r);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    int32_t k = 0;
    for (int32_t i = 0; i < n; i++) {
        if (in->is_image[i]) {
            r[k++] = (struct vtrim_ranked) { in->scores[i], i };
        }
    }
    vtrim_rank_sort(r, n_image);
    for (int32_t i = 0; i < n_keep; i++) {
        keep[r[i].row] = true;
    }
    keep[n - 1] = true;
    out->n_kept = vtrim_mask_to_rows(keep, n, out->kept);
    out->n_merge = 0;
    free(r);
    free(keep);
    return 0;
}

const struct vtrim_reducer vtrim_reducer_fastv = {
    .method = VTRIM_REDUCE_FASTV,
    .name = "FastV",
    .params_size = sizeof(struct vtrim_fastv_params),
    .hook = VTRIM_HOOK_DECODER_LAYER,
    .scores = { .per_head = false, .pre_softmax = false },
    .validate = fastv_validate,
    .layer = fastv_layer,
    .query_rows = fastv_query_rows,
    .apply = fastv_apply,
};
