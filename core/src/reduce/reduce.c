#include "reduce/reduce.h"

#include "context.h"
#include "error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int by_score_then_row(const void * a, const void * b) {
    const struct vtrim_ranked * x = a, * y = b;
    if (x->score != y->score) {
        return x->score > y->score ? -1 : 1;
    }
    return (x->row > y->row) - (x->row < y->row);
}

void vtrim_rank_sort(struct vtrim_ranked * r, int32_t n) {
    qsort(r, (size_t) n, sizeof *r, by_score_then_row);
}

void vtrim_reduce_params_default(int32_t method, struct vtrim_reduce_params * p) {
    if (!p) {
        return;
    }
    memset(p, 0, sizeof *p);
    p->method = method;
    p->fastv_k = 2;
    p->fastv_ratio = 0.5f;
    p->fastv_score = VTRIM_FASTV_SCORE_LAST;
    p->trim_k_ratio = 0.25f;
    p->trim_mode = VTRIM_TRIM_UNION;
    p->trim_keep = 0.5f;
    p->trim_first_layer = false;
}

int32_t vtrim_reduce_validate(const struct vtrim_model * m, const struct vtrim_reduce_params * p) {
    switch (p->method) {
        case VTRIM_REDUCE_FASTV:
            if (!m->has_vision || m->arch != VTRIM_ARCH_LLAVA) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FastV prunes image tokens in the decoder's self-attention; "
                                  "this model has none");
            }
            if (p->fastv_k < 1 || p->fastv_k >= m->text.n_layer) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FastV k=%d: must be in [1, %d] (the decoder has %d layers)",
                                  p->fastv_k, m->text.n_layer - 1, m->text.n_layer);
            }
            if (!(p->fastv_ratio >= 0.0f && p->fastv_ratio <= 1.0f)) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FastV ratio=%g: must be in [0, 1]", (double) p->fastv_ratio);
            }
            if (p->fastv_score != VTRIM_FASTV_SCORE_LAST && p->fastv_score != VTRIM_FASTV_SCORE_MEAN) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FastV score %d: must be last (0) or mean (1)", p->fastv_score);
            }
            return 0;
        case VTRIM_REDUCE_TRIM:
            if (m->arch != VTRIM_ARCH_MLLAMA || m->mllama.n_cross == 0) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn trims cross-attended image states; this model "
                                  "has no cross-attention layers");
            }
            if (m->mllama.cross_layers[0] < 1) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn needs a self-attention layer before the first "
                                  "cross-attention layer");
            }
            if (p->trim_mode != VTRIM_TRIM_UNION && p->trim_mode != VTRIM_TRIM_BUDGET) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn mode %d: must be union (0) or budget (1)",
                                  p->trim_mode);
            }
            if (p->trim_mode == VTRIM_TRIM_UNION && !(p->trim_k_ratio > 0.0f && p->trim_k_ratio <= 1.0f)) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn k_ratio=%g: must be in (0, 1]",
                                  (double) p->trim_k_ratio);
            }
            if (p->trim_mode == VTRIM_TRIM_BUDGET && !(p->trim_keep > 0.0f && p->trim_keep <= 1.0f)) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "TrimCrossAttn keep=%g: must be in (0, 1]",
                                  (double) p->trim_keep);
            }
            return 0;
        default:
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "unknown reduction method %d", p->method);
    }
}

enum vtrim_hook vtrim_reduce_hook(const struct vtrim_reduce_params * p) {
    return p->method == VTRIM_REDUCE_TRIM ? VTRIM_HOOK_CROSS_ATTN : VTRIM_HOOK_DECODER_LAYER;
}

int32_t vtrim_reduce_layer(const struct vtrim_reduce_params * p) { return p->fastv_k; }

int32_t vtrim_reduce_add(struct vtrim_context * c, const struct vtrim_reduce_params * p) {
    if (!c || !p) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_reduce_add: ctx and params are required");
    }
    int32_t rc = vtrim_reduce_validate(c->model, p);
    if (rc < 0) {
        return rc;
    }
    for (int i = 0; i < c->n_policies; i++) {
        if (vtrim_reduce_hook(&c->policies[i]) == VTRIM_HOOK_CROSS_ATTN && vtrim_reduce_hook(p) == VTRIM_HOOK_CROSS_ATTN) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "one cross-attention trim per context");
        }
    }
    if (c->n_policies == VTRIM_MAX_POLICIES) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "at most %d reduction policies", VTRIM_MAX_POLICIES);
    }
    for (int i = 0; i < c->n_policies; i++) {
        const struct vtrim_reduce_params * q = &c->policies[i];
        if (vtrim_reduce_hook(q) == VTRIM_HOOK_DECODER_LAYER && vtrim_reduce_hook(p) == VTRIM_HOOK_DECODER_LAYER &&
            vtrim_reduce_layer(q) >= vtrim_reduce_layer(p)) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "decoder-layer policies must come in increasing layer order "
                              "(layer %d after layer %d)", vtrim_reduce_layer(p), vtrim_reduce_layer(q));
        }
    }
    c->policies[c->n_policies++] = *p;
    return 0;
}

int32_t vtrim_reduce_clear(struct vtrim_context * c) {
    if (!c) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_reduce_clear: ctx is NULL");
    }
    c->n_policies = 0;
    return 0;
}

int32_t vtrim_get_reduce_stage(const struct vtrim_context * c, int32_t i, struct vtrim_reduce_stage * out) {
    if (!c || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_get_reduce_stage: ctx and out are required");
    }
    if (i < 0 || i >= c->n_stages) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "stage %d of %d", i, c->n_stages);
    }
    *out = c->stages[i];
    return 0;
}

int32_t vtrim_get_kept_image_rows(const struct vtrim_context * c, int32_t * rows, int32_t n_max, int32_t * n_out) {
    if (!c || !n_out || n_max < 0 || (!rows && n_max > 0)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_get_kept_image_rows: invalid arguments");
    }
    *n_out = c->n_kept_image_rows;
    if (c->n_kept_image_rows > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_get_kept_image_rows: needs %d", c->n_kept_image_rows);
    }
    memcpy(rows, c->kept_image_rows, sizeof(int32_t) * (size_t) c->n_kept_image_rows);
    return 0;
}
