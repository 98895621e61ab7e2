// FiCoCo-L (arXiv 2411.17686; code kawhiiiileo/FiCoCo): filter-correlate-compress of the image rows inside
// the decoder. One step at each hook between layers l-1 and l for l = start_layer .. n_layer-1, on layer
// l-1's head-mean pre-softmax logits A among the current rows (the hook's matrix request):
//   s_i = beta * mean_{j same image, j != i} A[i, j] - (1 - beta) * mean_{t in T} A[t, i],
// T the text rows after the last image row (the last row when the prompt ends with an image). Then the
// shared step (reduce/ficoco.h): the r_i rows of largest s go, each merged into its most similar kept rows
// of the same image. Layers >= l run on the kept rows with their original positions (the hook's doing).
//
// Where this differs from the released code (llava/model/language_model/FiCoCo_L.py), and why:
// - Redundancy: there, the visual term is the row SUM of A over all image tokens, the row's own logit
//   included, and the text term is the image rows' logits FOR the text keys (A[i, t], a direction the
//   causal mask hides from the model). Here: the mean over the other rows of the same image, and the text
//   rows' logits for the image row (A[t, i]), the attention the model actually computes; the formula.
// - Correlate: there, targets are ranked by a mix 0.6 A_vv + 0.4 (A_vt A_tv) over ALL image tokens, the
//   dropped ones included (their merges are then thrown away with them), with one quantile threshold for the
//   whole step and weights from a softmax over every token. Here: the kept rows of the same image only, by
//   A[i, j], m per the eps quantile, weights a softmax over the m targets (reduce/ficoco.h).
// - Compress: there, the weighted sources are added to their targets with no division (the size it
//   tracks is discarded). Here the paper's self-preserving merge, (x_j + sum a x_i) / (1 + sum a).
// - Where the image is: there, the image tokens are the first v_tokens rows of the tensor, one image,
//   batch entry 0's merge choices for every entry. Here every image of the prompt is its own group with its
//   own budget (`tokens` each), wherever it sits, after earlier turns in the cache too.
// - Positions: as there, kept rows stay in prompt order; here they keep their original RoPE positions and
//   decoding continues at the full count (the released caller that sets positions ships only as bytecode,
//   so this is the rule, not a verified difference).
// - The prompt's last row is never dropped (its logits are the prefill's answer), even when it is an image
//   row; its image then keeps tokens + 1 rows.
#include "reduce/ficoco.h"

#include "api/error.h"

#include <math.h>
#include <stdlib.h>

void vtrim_ficoco_l_default(struct vtrim_ficoco_l_params * p) {
    if (p) {
        *p = (struct vtrim_ficoco_l_params) { .tokens = 64, .start_layer = 4, .beta = 0.6f, .eps = 0.998f };
    }
}

static int32_t ficoco_l_validate(const void * params, const struct vtrim_reduce_caps * caps) {
    const struct vtrim_ficoco_l_params * p = params;
    if (!caps->image_rows_in_decoder) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-L merges image tokens that are decoder rows; not on this "
                          "model (Llama-3.2-Vision): its image features are cross-attended, not decoder rows");
    }
    const int32_t n_patches = caps->vision_grid * caps->vision_grid;
    if (p->tokens < 1 || (n_patches > 0 && p->tokens > n_patches)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-L tokens=%d: must be in [1, %d] (image tokens kept per "
                          "image)", p->tokens, n_patches);
    }
    if (p->start_layer < 1 || p->start_layer >= caps->n_layer) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-L start_layer=%d: must be in [1, %d] (the decoder has %d "
                          "layers)", p->start_layer, caps->n_layer - 1, caps->n_layer);
    }
    if (!(p->beta >= 0.0f && p->beta <= 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-L beta=%g: must be in [0, 1]", (double) p->beta);
    }
    if (!(p->eps >= 0.0f && p->eps <= 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "FiCoCo-L eps=%g: must be in [0, 1]", (double) p->eps);
    }
    return 0;
}

static int32_t ficoco_l_layer(const void * params, const struct vtrim_reduce_caps * caps) {
    (void) caps;
    return ((const struct vtrim_ficoco_l_params *) params)->start_layer;
}

static int32_t ficoco_l_n_steps(const void * params, const struct vtrim_reduce_caps * caps) {
    return caps->n_layer - ((const struct vtrim_ficoco_l_params *) params)->start_layer;
}

static int32_t ficoco_l_step_layer(const void * params, const struct vtrim_reduce_caps * caps, int32_t step) {
    (void) caps;
    return ((const struct vtrim_ficoco_l_params *) params)->start_layer + step;
}

// One image's step: its candidates cand[0..n_cand) (rows, ascending) and the text rows T.
static int32_t image_step(const struct vtrim_ficoco_l_params * p, const struct vtrim_reduce_input * in,
                          const int32_t * cand, int32_t n_cand, const int32_t * t_rows, int32_t n_t, float * score,
                          bool * keep, struct vtrim_reduce_output * out) {
    // R = N - tokens over S steps, r_i = R / S (+1 in the first R % S): with D = n_cand - tokens rows still
    // to go over the S - step steps left, this step's share is D's first one, whatever N was.
    const int32_t r = vtrim_ficoco_step_drop(n_cand - p->tokens, in->n_steps - in->step, 0);
    if (r <= 0) {
        return 0;
    }
    const int32_t n = in->n;
    for (int32_t a = 0; a < n_cand; a++) {
        const float * row = in->attn + (size_t) cand[a] * n;
        double sim = 0.0, flow = 0.0;
        for (int32_t b = 0; b < n_cand; b++) {
            sim += b != a ? row[cand[b]] : 0.0;
        }
        for (int32_t t = 0; t < n_t; t++) {
            flow += in->attn[(size_t) t_rows[t] * n + cand[a]];
        }
        score[a] = (float) (p->beta * (n_cand > 1 ? sim / (n_cand - 1) : 0.0) - (1.0 - p->beta) * flow / n_t);
    }
    return vtrim_ficoco_step(cand, n_cand, in->attn, n, score, r, p->eps, keep, out);
}

static int32_t ficoco_l_apply(const void * params, const struct vtrim_reduce_input * in,
                              struct vtrim_reduce_output * out) {
    const struct vtrim_ficoco_l_params * p = params;
    const int32_t n = in->n;
    if (!in->attn) {
        return vtrim_fail(VTRIM_ERR_STATE, "FiCoCo-L: the hook passed no logit matrix");
    }
    bool * keep = malloc(sizeof(bool) * (size_t) n);
    int32_t * buf = malloc(sizeof(int32_t) * 2 * (size_t) n);   // candidates | T
    float * score = malloc(sizeof(float) * (size_t) n);
    if (!keep || !buf || !score) {
        free(keep); free(buf); free(score);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t i = 0; i < n; i++) {
        keep[i] = true;
    }
    int32_t * t_rows = buf + n;
    const int32_t n_t = vtrim_rows_after_last_image(in->is_image, n, t_rows);
    out->n_merge = 0;
    int32_t rc = 0;
    const int32_t n_groups = in->n_groups > 0 ? in->n_groups : 1;
    for (int32_t g = 0; g < n_groups && rc == 0; g++) {
        const int32_t a = in->n_groups > 0 ? in->group_off[g] : 0;
        const int32_t b = in->n_groups > 0 ? a + in->group_len[g] : n;
        int32_t n_cand = 0;
        for (int32_t i = a; i < b; i++) {
            if (in->is_image[i] && i != n - 1) {
                buf[n_cand++] = i;
            }
        }
        rc = image_step(p, in, buf, n_cand, t_rows, n_t, score, keep, out);
    }
    if (rc == 0) {
        out->n_kept = vtrim_mask_to_rows(keep, n, out->kept);
    }
    free(keep);
    free(buf);
    free(score);
    return rc;
}

const struct vtrim_reducer vtrim_reducer_ficoco_l = {
    .method = VTRIM_REDUCE_FICOCO_L,
    .name = "FiCoCo-L",
    .params_size = sizeof(struct vtrim_ficoco_l_params),
    .hook = VTRIM_HOOK_DECODER_LAYER,
    .one_per_context = true,
    .scores = { .per_head = false, .pre_softmax = true, .matrix = true },
    .validate = ficoco_l_validate,
    .layer = ficoco_l_layer,
    .apply = ficoco_l_apply,
    .n_steps = ficoco_l_n_steps,
    .step_layer = ficoco_l_step_layer,
};
