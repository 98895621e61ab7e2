// FiCoCo-V (arXiv 2411.17686; code kawhiiiileo/FiCoCo): token merging inside LLaVA's CLIP tower. One step per
// vision layer start_layer .. f (f: the last layer that runs), after the layer's attention residual and before
// its MLP (the tower's hook; docs/DESIGN.md "FiCoCo-V"). Step i removes r_i of the R = N - tokens patches:
// scores from the layer's head-mean pre-softmax logits A among the current rows,
// s_i = lam * mean_{j current patches} A[i, j] - (1 - lam) * A[CLS, i], then the 2x2 local penalty, then
// the shared filter / correlate (reduce/ficoco.c). The hook compresses and keeps the rows in order, CLS first.
// Departures from the released code (each a defect there): CLS stays row 0 (it reorders so CLS ends last);
// merge targets are kept patches only, indexed in the current rows (it merges into dropped tokens and mixes
// index spaces); each image is scored on its own (a global score is never reset between images); patch
// indices are the image's own (it assumes the image starts at position 0).
#include "reduce/ficoco.h"

#include "api/error.h"

#include <stdlib.h>

void vtrim_ficoco_v_default(struct vtrim_ficoco_v_params * p) {
    if (p) {
        *p = (struct vtrim_ficoco_v_params) { .tokens = 64, .start_layer = 12, .lam = 0.35f, .eps = 0.998f };
    }
}

static int32_t ficoco_v_validate(const void * params, const struct vtrim_reduce_caps * caps) {
    const struct vtrim_ficoco_v_params * p = params;
    if (!caps->image_rows_in_decoder || caps->vision_grid <= 0 || caps->n_vision_layer <= 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-V merges patch tokens inside a CLIP vision tower whose "
                          "output rows are decoder rows (LLaVA); not on Llama-3.2-Vision because its image "
                          "features reach the decoder through cross-attention, not as decoder tokens, and its "
                          "tower is tiled (use TrimCrossAttn there)");
    }
    const int32_t n = caps->vision_grid * caps->vision_grid, f = caps->n_vision_layer - 1;
    if (p->tokens < 1 || p->tokens > n) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-V tokens=%d: must be in [1, %d] (the tower has %d patches)",
                          p->tokens, n, n);
    }
    if (p->start_layer < 0 || p->start_layer > f) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-V start_layer=%d: must be in [0, %d] (the tower runs %d "
                          "layers)", p->start_layer, f, caps->n_vision_layer);
    }
    if (!(p->lam >= 0.0f && p->lam <= 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-V lam=%g: must be in [0, 1]", (double) p->lam);
    }
    if (!(p->eps >= 0.0f && p->eps <= 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-V eps=%g: must be in [0, 1]", (double) p->eps);
    }
    return 0;
}

static int32_t ficoco_v_layer(const void * params, const struct vtrim_reduce_caps * caps) {
    return ((const struct vtrim_ficoco_v_params *) params)->start_layer;
}

static int32_t ficoco_v_n_steps(const void * params, const struct vtrim_reduce_caps * caps) {
    return caps->n_vision_layer - ((const struct vtrim_ficoco_v_params *) params)->start_layer;
}

static int32_t ficoco_v_step_layer(const void * params, const struct vtrim_reduce_caps * caps, int32_t step) {
    return ((const struct vtrim_ficoco_v_params *) params)->start_layer + step;
}

// Candidates: row 0 the CLS (always kept), rows 1..n-1 the current patches; in->attn the [n][n] logits.
static int32_t ficoco_v_apply(const void * params, const struct vtrim_reduce_input * in,
                              struct vtrim_reduce_output * out) {
    const struct vtrim_ficoco_v_params * p = params;
    const int32_t n = in->n, n_cand = n - 1, n_patches = in->grid * in->grid;
    if (!in->attn || !in->orig || in->grid <= 0 || n_cand < 1) {
        return vtrim_fail(VTRIM_ERR_STATE, "FiCoCo-V: the hook gave no logit matrix, patch indices or grid");
    }
    const int32_t r = vtrim_ficoco_step_drop(n_patches - p->tokens, in->n_steps, in->step);
    bool * keep = malloc(sizeof(bool) * (size_t) n);
    int32_t * cand = malloc(sizeof(int32_t) * (size_t) n_cand * 2);
    float * score = malloc(sizeof(float) * (size_t) n_cand);
    if (!keep || !cand || !score) {
        free(keep); free(cand); free(score);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    int32_t * patch = cand + n_cand;
    int32_t rc = 0;
    out->n_merge = 0;
    for (int32_t i = 0; i < n; i++) {
        keep[i] = true;
    }
    if (r > 0) {
        for (int32_t k = 0; k < n_cand; k++) {
            const int32_t i = k + 1;
            const float * a = in->attn + (size_t) i * (size_t) n;
            double sum = 0.0;
            for (int32_t j = 1; j < n; j++) {
                sum += a[j];
            }
            score[k] = (float) ((double) p->lam * (sum / n_cand) - (1.0 - (double) p->lam) * in->attn[i]);
            cand[k] = i;
            patch[k] = in->orig[i] - 1;
        }
        rc = vtrim_ficoco_local_penalty(score, patch, n_cand, in->grid);
        if (rc == 0) {
            rc = vtrim_ficoco_step(cand, n_cand, in->attn, n, score, r, p->eps, keep, out);
        }
    }
    if (rc == 0) {
        out->n_kept = vtrim_mask_to_rows(keep, n, out->kept);
    }
    free(keep);
    free(cand);
    free(score);
    return rc;
}

const struct vtrim_reducer vtrim_reducer_ficoco_v = {
    .method = VTRIM_REDUCE_FICOCO_V,
    .name = "FiCoCo-V",
    .params_size = sizeof(struct vtrim_ficoco_v_params),
    .hook = VTRIM_HOOK_VISION_ENCODER,
    .one_per_context = true,
    .scores = { .per_head = false, .pre_softmax = true, .matrix = true },
    .validate = ficoco_v_validate,
    .layer = ficoco_v_layer,
    .apply = ficoco_v_apply,
    .n_steps = ficoco_v_n_steps,
    .step_layer = ficoco_v_step_layer,
};
