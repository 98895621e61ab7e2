// Trimmed Llama (arXiv 2504.00557; no public code), as docs/DESIGN.md decides: rank each image's states by the
// first cross-attention layer's probabilities of the text rows that see it, keep per head (union) or by
// the head mean (budget); padded tiles are never candidates (each group is an image's real tiles).
#include "reduce/reduce.h"

#include "api/error.h"

#include <stdlib.h>
#include <string.h>

void vtrim_trim_default(struct vtrim_trim_params * p) {
    if (p) {
        *p = (struct vtrim_trim_params) { .k_ratio = 0.25f, .mode = VTRIM_TRIM_UNION, .keep = 0.5f,
                                          .first_layer = false };
    }
}

static int32_t trim_validate(const void * params, const struct vtrim_reduce_caps * caps) {
    const struct vtrim_trim_params * p = params;
    if (caps->n_cross == 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn trims cross-attended image states; this model "
                          "has no cross-attention layers");
    }
    if (caps->first_cross_layer < 1) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn needs a self-attention layer before the first "
                          "cross-attention layer");
    }
    if (p->mode != VTRIM_TRIM_UNION && p->mode != VTRIM_TRIM_BUDGET) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn mode %d: must be union (0) or budget (1)", p->mode);
    }
    if (p->mode == VTRIM_TRIM_UNION && !(p->k_ratio > 0.0f && p->k_ratio <= 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn k_ratio=%g: must be in (0, 1]", (double) p->k_ratio);
    }
    if (p->mode == VTRIM_TRIM_BUDGET && !(p->keep > 0.0f && p->keep <= 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn keep=%g: must be in (0, 1]", (double) p->keep);
    }
    return 0;
}

static int32_t trim_layer(const void * params, const struct vtrim_reduce_caps * caps) {
    return caps->first_cross_layer;
}

// Marks the top n of rows [off, off + count) by score(row) in keep.
static void mark_top(struct vtrim_ranked * r, const float * score, int32_t off, int32_t count, int32_t n, bool * keep) {
    for (int32_t j = 0; j < count; j++) {
        r[j] = (struct vtrim_ranked) { score[off + j], off + j };
    }
    vtrim_rank_sort(r, count);
    for (int32_t j = 0; j < n && j < count; j++) {
        keep[r[j].row] = true;
    }
}

// Each image keeps its own share: union mode, the union over heads of each head's top int(k_ratio * visible)
// (at least 1); budget mode, the top int(keep * visible) (at least 1) by the head mean. Ties: lower row first.
static int32_t trim_apply(const void * params, const struct vtrim_reduce_input * in, struct vtrim_reduce_output * out) {
    const struct vtrim_trim_params * p = params;
    const int32_t n_x = in->n, n_head = in->n_head;
    bool * keep = calloc((size_t) n_x, sizeof(bool));
    struct vtrim_ranked * r = malloc(sizeof *r * (size_t) n_x);
    float * mean = malloc(sizeof(float) * (size_t) n_x);
    if (!keep || !r || !mean) {
        free(keep); free(r); free(mean);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t j = 0; j < n_x; j++) {
        double s = 0.0;
        for (int32_t h = 0; h < n_head; h++) {
            s += in->scores[(size_t) h * n_x + j];
        }
        mean[j] = (float) (s / n_head);
    }
    for (int32_t i = 0; i < in->n_groups; i++) {
        const int32_t off = in->group_off[i], count = in->group_len[i];
        const float frac = p->mode == VTRIM_TRIM_UNION ? p->k_ratio : p->keep;
        int32_t n = (int32_t) ((double) frac * count + 1e-6);
        n = n < 1 ? 1 : n;
        if (p->mode == VTRIM_TRIM_UNION) {
            for (int32_t h = 0; h < n_head; h++) {
                mark_top(r, in->scores + (size_t) h * n_x, off, count, n, keep);
            }
        } else {
            mark_top(r, mean, off, count, n, keep);
        }
    }
    out->n_kept = vtrim_mask_to_rows(keep, n_x, out->kept);
    out->n_merge = 0;
    out->include_hook_layer = p->first_layer;
    free(keep);
    free(r);
    free(mean);
    return 0;
}

const struct vtrim_reducer vtrim_reducer_trim = {
    .method = VTRIM_REDUCE_TRIM,
    .name = "cross-attention trim",
    .params_size = sizeof(struct vtrim_trim_params),
    .hook = VTRIM_HOOK_CROSS_ATTN,
    .one_per_context = true,
    .scores = { .per_head = true, .pre_softmax = false },
    .validate = trim_validate,
    .layer = trim_layer,
    .apply = trim_apply,
};
