// Attention masks from positions, not row indices: a query at position p sees a cached row whose position is
// <= p. Rows of one layer are sorted by position, so any set of kept rows (gaps allowed) masks correctly.
#pragma once

#include <stdint.h>

// mask[r][j], r < n_rows, j < width: 0 where j < n_cols and col_pos[j] <= row_pos[r], -INFINITY elsewhere
// (the columns past n_cols pad the cache to a multiple of VTRIM_KV_PAD).
void vtrim_kv_mask_fill(const int32_t * col_pos, int32_t n_cols, const int32_t * row_pos, int32_t n_rows,
                        int32_t width, float * mask);
