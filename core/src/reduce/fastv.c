// FastV (arXiv 2403.06764; code pkunlp-icler/FastV), as DESIGN.md decides: rank the image rows by the
// head-mean attention of layer K-1, keep the top (1 - R) of them, with all text rows, in their order and
// with their original positions.
#include "reduce/reduce.h"

#include "error.h"

#include <math.h>
#include <stdlib.h>

int32_t vtrim_fastv_query_rows(const struct vtrim_reduce_params * p, const bool * is_image, int32_t n,
                               int32_t * q_rows) {
    if (p->fastv_score == VTRIM_FASTV_SCORE_LAST) {
        q_rows[0] = n - 1;
        return 1;
    }
    int32_t last_image = -1;
    for (int32_t i = 0; i < n; i++) {
        last_image = is_image[i] ? i : last_image;
    }
    int32_t n_q = 0;
    for (int32_t i = last_image + 1; i < n; i++) {
        q_rows[n_q++] = i;
    }
    if (n_q == 0) {           // the prompt ends with an image: only its last row can look at it
        q_rows[n_q++] = n - 1;
    }
    return n_q;
}

int32_t vtrim_fastv_select(const struct vtrim_reduce_params * p, const bool * is_image, const float * scores,
                           int32_t n, bool * keep) {
    int32_t n_image = 0;
    for (int32_t i = 0; i < n; i++) {
        n_image += is_image[i];
        keep[i] = !is_image[i];
    }
    // int() of the kept fraction as the official code does, guarded against 0.3 * 10 = 2.9999...
    const int32_t n_keep = (int32_t) floor((1.0 - (double) p->fastv_ratio) * n_image + 1e-6);
    struct vtrim_ranked * r = malloc(sizeof *r * (size_t) (n_image > 0 ? n_image : 1));
    if (!r) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    int32_t k = 0;
    for (int32_t i = 0; i < n; i++) {
        if (is_image[i]) {
            r[k++] = (struct vtrim_ranked) { scores[i], i };
        }
    }
    vtrim_rank_sort(r, n_image);
    for (int32_t i = 0; i < n_keep; i++) {
        keep[r[i].row] = true;
    }
    free(r);
    keep[n - 1] = true;   // the row whose logits we return
    int32_t kept = 0;
    for (int32_t i = 0; i < n; i++) {
        kept += keep[i] && is_image[i];
    }
    return kept;
}
