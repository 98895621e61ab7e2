// FiCoCo's filter and correlate, on the scores and logits a variant hands it (reduce/ficoco.h).
#include "reduce/ficoco.h"

#include "api/error.h"

#include <math.h>
#include <stdlib.h>

int32_t vtrim_ficoco_step_drop(int32_t total, int32_t n_steps, int32_t step) {
    if (n_steps <= 0 || step < 0 || step >= n_steps || total <= 0) {
        return 0;
    }
    return total / n_steps + (step < total % n_steps ? 1 : 0);
}

int32_t vtrim_ficoco_local_penalty(float * score, const int32_t * patch, int32_t n, int32_t grid) {
    const int32_t wg = (grid + 1) / 2;   // windows per side
    int32_t * best = malloc(sizeof(int32_t) * (size_t) wg * (size_t) wg);
    int32_t * count = calloc((size_t) wg * (size_t) wg, sizeof(int32_t));
    if (!best || !count) {
        free(best);
        free(count);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t k = 0; k < n; k++) {
        const int32_t w = (patch[k] / grid / 2) * wg + (patch[k] % grid) / 2;
        // strictly larger wins; an equal score keeps the lower patch index
        if (count[w] == 0 || score[k] > score[best[w]] ||
            (score[k] == score[best[w]] && patch[k] < patch[best[w]])) {
            best[w] = k;
        }
        count[w]++;
    }
    for (int32_t w = 0; w < wg * wg; w++) {
        if (count[w] >= 2) {
            float * s = &score[best[w]];
            *s = *s > 0.0f ? 2.0f * *s : 0.5f * *s;
        }
    }
    free(best);
    free(count);
    return 0;
}

int32_t vtrim_ficoco_step(const int32_t * cand, int32_t n_cand, const float * attn, int32_t ld, const float * score,
                          int32_t r, float eps, bool * keep, struct vtrim_reduce_output * out) {
    if (r <= 0 || r >= n_cand) {
        return vtrim_fail(VTRIM_ERR_STATE, "FiCoCo: a step must drop between 1 and %d of %d candidates, not %d",
                          n_cand - 1, n_cand, r);
    }
    const int32_t n_kept = n_cand - r;
    const int32_t m = (int32_t) fmax(1.0, ceil((1.0 - (double) eps) * n_kept - 1e-6));
    const int32_t cap = out->merge_cap > 0 ? out->merge_cap : n_cand;
    if (out->n_merge + r * m > cap) {
        return vtrim_fail(VTRIM_ERR_STATE, "FiCoCo: %d merges do not fit in %d", out->n_merge + r * m, cap);
    }
    struct vtrim_ranked * rk = malloc(sizeof *rk * (size_t) n_cand);
    int32_t * kept = malloc(sizeof(int32_t) * (size_t) n_kept);
    if (!rk || !kept) {
        free(rk);
        free(kept);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    // Filter: rank by (score desc, k asc); vtrim_rank_sort breaks ties by the lower .row, here k.
    for (int32_t k = 0; k < n_cand; k++) {
        rk[k] = (struct vtrim_ranked) { score[k], k };
    }
    vtrim_rank_sort(rk, n_cand);
    for (int32_t i = 0; i < r; i++) {
        keep[cand[rk[i].row]] = false;
    }
    for (int32_t k = 0, j = 0; k < n_cand; k++) {
        if (keep[cand[k]]) {
            kept[j++] = cand[k];
        }
    }
    // Correlate: the dropped in their original order, each over the kept candidates; rows ascending in
    // kept[], so the rank sort's tie on the lower index is the tie on the lower row.
    for (int32_t k = 0; k < n_cand; k++) {
        const int32_t src = cand[k];
        if (keep[src]) {
            continue;
        }
        const float * a = attn + (size_t) src * (size_t) ld;
        for (int32_t j = 0; j < n_kept; j++) {
            rk[j] = (struct vtrim_ranked) { a[kept[j]], j };
        }
        vtrim_rank_sort(rk, n_kept);
        const double top = rk[0].score;
        double sum = 0.0;
        for (int32_t t = 0; t < m; t++) {
            sum += exp((double) rk[t].score - top);
        }
        for (int32_t t = 0; t < m; t++) {
            const int32_t e = out->n_merge++;
            out->merge_src[e] = src;
            out->merge_dst[e] = kept[rk[t].row];
            out->merge_w[e] = (float) (exp((double) rk[t].score - top) / sum);
        }
    }
    free(rk);
    free(kept);
    return 0;
}
