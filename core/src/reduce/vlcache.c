// VL-Cache (arXiv 2410.23317, no official code), as docs/DESIGN.md decides: after the prefill, the post-vision
// query rows' attention gives each layer a density (its share of the budget) and each KV head a score per
// cached row; every KV head keeps its layer's most recent rows plus its best-scoring others.
#include "reduce/reduce.h"

#include "api/error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void vtrim_vlcache_default(struct vtrim_vlcache_params * p) {
    if (p) {
        *p = (struct vtrim_vlcache_params) { .budget = 0.1f, .threshold = 0.01f, .recent = 0.1f };
    }
}

static int32_t vlcache_validate(const void * params, const struct vtrim_reduce_caps * caps) {
    const struct vtrim_vlcache_params * p = params;
    if (!caps->image_rows_in_decoder) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "VL-Cache ranks the decoder's self-attention KV rows of the image "
                          "tokens; this model's images are not decoder rows (Llama-3.2-Vision attends to them "
                          "through cross-attention, whose cache VL-Cache does not cover)");
    }
    if (!(p->budget > 0.0f && p->budget <= (float) caps->n_layer)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "VL-Cache budget=%g: must be in (0, %d] (the decoder has %d layers)",
                          (double) p->budget, caps->n_layer, caps->n_layer);
    }
    if (!(p->threshold >= 0.0f && p->threshold < 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "VL-Cache threshold=%g: must be in [0, 1)", (double) p->threshold);
    }
    if (!(p->recent >= 0.0f && p->recent <= 1.0f)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "VL-Cache recent=%g: must be in [0, 1]", (double) p->recent);
    }
    return 0;
}

// It runs after every layer.
static int32_t vlcache_layer(const void * params, const struct vtrim_reduce_caps * caps) {
    (void) params;
    return caps->n_layer;
}

// The rows after the last image row, or the last row when the prompt ends with an image.
static int32_t vlcache_query_rows(const void * params, const bool * is_image, int32_t n, int32_t * q_rows) {
    (void) params;
    return vtrim_rows_after_last_image(is_image, n, q_rows);
}

// density = 1 - mean over query heads of the share of valid entries below threshold * row max;
// scores[g][j] = mean over group g's query heads of the sum over the query rows of A[q][j].
static int32_t vlcache_digest(const void * params, const struct vtrim_layer_attn * a, float * density,
                              float * scores) {
    const struct vtrim_vlcache_params * p = params;
    const int32_t n_kv = a->n_kv, n_rep = a->n_head / a->n_head_kv;
    double * acc = calloc((size_t) a->n_head_kv * (size_t) n_kv, sizeof(double));
    if (!acc) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    double sparsity = 0.0;
    for (int32_t h = 0; h < a->n_head; h++) {
        double * s = acc + (size_t) (h / n_rep) * n_kv;
        int64_t n_valid = 0, n_small = 0;
        for (int32_t q = 0; q < a->n_q; q++) {
            const float * row = a->probs + ((size_t) h * a->n_q + q) * n_kv;
            float mx = 0.0f;
            int32_t n_vis = 0;
            while (n_vis < n_kv && a->kv_pos[n_vis] <= a->q_pos[q]) {   // kv_pos ascending
                mx = row[n_vis] > mx ? row[n_vis] : mx;
                n_vis++;
            }
            const float cut = p->threshold * mx;
            for (int32_t j = 0; j < n_vis; j++) {
                n_small += row[j] < cut;
                s[j] += row[j];
            }
            n_valid += n_vis;
        }
        sparsity += n_valid > 0 ? (double) n_small / (double) n_valid : 0.0;
    }
    *density = (float) (1.0 - sparsity / a->n_head);
    for (size_t i = 0; i < (size_t) a->n_head_kv * n_kv; i++) {
        scores[i] = (float) (acc[i] / n_rep);
    }
    free(acc);
    return 0;
}

// beta_l = clip(d_l / sum d * budget * L, 0.01, 1), k_l = max(1, floor(beta_l * n_l + 0.5)); per KV head the
// w_l most recent rows and the k_l - w_l best-scoring others (ties: the lower row, i.e. position).
static int32_t vlcache_apply(const void * params, const struct vtrim_reduce_input * in,
                             struct vtrim_reduce_output * out) {
    const struct vtrim_vlcache_params * p = params;
    const int32_t L = in->n_layer;
    double sum_d = 0.0;
    int32_t n_max = 1;
    for (int32_t il = 0; il < L; il++) {
        sum_d += in->layer_rows[il] > 0 ? in->layer_density[il] : 0.0;
        n_max = in->layer_rows[il] > n_max ? in->layer_rows[il] : n_max;
    }
    struct vtrim_ranked * r = malloc(sizeof *r * (size_t) n_max);
    bool * keep = malloc(sizeof(bool) * (size_t) n_max);
    if (!r || !keep) {
        free(r);
        free(keep);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t il = 0; il < L; il++) {
        const int32_t n = in->layer_rows[il];
        if (n == 0) {
            out->layer_keep[il] = 0;
            continue;
        }
        double beta = sum_d > 0.0 ? in->layer_density[il] / sum_d * p->budget * L : 1.0;
        beta = beta < 0.01 ? 0.01 : beta > 1.0 ? 1.0 : beta;
        int32_t k = (int32_t) floor(beta * n + 0.5);
        k = k < 1 ? 1 : k > n ? n : k;
        int32_t w = (int32_t) floor((double) p->recent * k + 0.5);
        w = w < 1 ? 1 : w > k ? k : w;
        out->layer_keep[il] = k;
        for (int32_t g = 0; g < in->n_head_kv; g++) {
            const float * s = in->layer_scores[il] + (size_t) g * n;
            const int32_t n_old = n - w;
            for (int32_t j = 0; j < n; j++) {
                keep[j] = j >= n_old;
            }
            for (int32_t j = 0; j < n_old; j++) {
                r[j] = (struct vtrim_ranked) { s[j], j };
            }
            vtrim_rank_sort(r, n_old);
            for (int32_t i = 0; i < k - w; i++) {
                keep[r[i].row] = true;
            }
            vtrim_mask_to_rows(keep, n, out->layer_kept[il] + (size_t) g * k);
        }
    }
    out->n_kept = 0;
    out->n_merge = 0;
    free(r);
    free(keep);
    return 0;
}

const struct vtrim_reducer vtrim_reducer_vlcache = {
    .method = VTRIM_REDUCE_VLCACHE,
    .name = "VL-Cache",
    .params_size = sizeof(struct vtrim_vlcache_params),
    .hook = VTRIM_HOOK_AFTER_PREFILL,
    .one_per_context = true,
    .scores = { .per_head = true, .pre_softmax = false },
    .validate = vlcache_validate,
    .layer = vlcache_layer,
    .query_rows = vlcache_query_rows,
    .apply = vlcache_apply,
    .digest_layer = vlcache_digest,
};
