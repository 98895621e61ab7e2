#include "kv/mask.h"

#include <math.h>
#include <stddef.h>

void vtrim_kv_mask_fill(const int32_t * col_pos, int32_t n_cols, const int32_t * row_pos, int32_t n_rows,
                        int32_t width, float * mask) {
    for (int32_t r = 0; r < n_rows; r++) {
        float * m = mask + (size_t) r * width;
        for (int32_t j = 0; j < width; j++) {
            m[j] = j < n_cols && col_pos[j] <= row_pos[r] ? 0.0f : -INFINITY;
        }
    }
}
