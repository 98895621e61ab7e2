// Trimmed Llama (arXiv 2504.00557; no public code), as DESIGN.md decides: rank each image's states by the
// first cross-attention layer's probabilities of the text rows that see it, keep per head (union) or by
// the head mean (budget); padded tiles are never candidates.
#include "reduce/reduce.h"

#include "error.h"

#include <stdlib.h>
#include <string.h>

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

int32_t vtrim_trim_select(const struct vtrim_reduce_params * p, const float * scores, int32_t n_head, int32_t n_x,
                          const int32_t * off, const int32_t * visible, int32_t n_images, int32_t * kept,
                          int32_t * n_kept) {
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
            s += scores[(size_t) h * n_x + j];
        }
        mean[j] = (float) (s / n_head);
    }
    for (int32_t i = 0; i < n_images; i++) {
        const float frac = p->trim_mode == VTRIM_TRIM_UNION ? p->trim_k_ratio : p->trim_keep;
        int32_t n = (int32_t) ((double) frac * visible[i] + 1e-6);
        n = n < 1 ? 1 : n;
        if (p->trim_mode == VTRIM_TRIM_UNION) {
            for (int32_t h = 0; h < n_head; h++) {
                mark_top(r, scores + (size_t) h * n_x, off[i], visible[i], n, keep);
            }
        } else {
            mark_top(r, mean, off[i], visible[i], n, keep);
        }
    }
    *n_kept = 0;
    for (int32_t j = 0; j < n_x; j++) {
        if (keep[j]) {
            kept[(*n_kept)++] = j;
        }
    }
    free(keep);
    free(r);
    free(mean);
    return 0;
}
