#include "graph/graph.h"

#include "vtrim.h"

struct ggml_tensor * vtrim_f32(struct ggml_context * ctx, struct ggml_tensor * t) {
    return t->type == GGML_TYPE_F32 ? t : ggml_cast(ctx, t, GGML_TYPE_F32);
}

void vtrim_cb(struct ggml_tensor * t, const char * name, int il) {
    if (il >= 0) {
        ggml_format_name(t, "%s-%d", name, il);
    } else {
        ggml_set_name(t, name);
    }
}

struct ggml_tensor * vtrim_build_rms_norm(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * w,
                                          float eps) {
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), w);
}

struct ggml_tensor * vtrim_build_layer_norm(struct ggml_context * ctx, struct ggml_tensor * x,
                                            struct ggml_tensor * w, struct ggml_tensor * b, float eps) {
    x = ggml_norm(ctx, x, eps);
    x = ggml_mul(ctx, x, w);
    return b ? ggml_add(ctx, x, b) : x;
}

struct ggml_tensor * vtrim_build_linear(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * w,
                                        struct ggml_tensor * b) {
    x = ggml_mul_mat(ctx, w, x);
    return b ? ggml_add(ctx, x, b) : x;
}

struct ggml_tensor * vtrim_build_quick_gelu(struct ggml_context * ctx, struct ggml_tensor * x) {
    return ggml_mul(ctx, x, ggml_sigmoid(ctx, ggml_scale(ctx, x, 1.702f)));
}

struct ggml_tensor * vtrim_build_swiglu_ffn(struct ggml_context * ctx, struct ggml_tensor * x,
                                            struct ggml_tensor * gate, struct ggml_tensor * up,
                                            struct ggml_tensor * down) {
    struct ggml_tensor * g = ggml_silu(ctx, ggml_mul_mat(ctx, gate, x));
    struct ggml_tensor * u = ggml_mul_mat(ctx, up, x);
    return ggml_mul_mat(ctx, down, ggml_mul(ctx, g, u));
}

struct ggml_tensor * vtrim_build_attn_vt(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                         struct ggml_tensor * vt, struct ggml_tensor * mask, float scale, int il) {
    const int64_t head_dim = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_q = q->ne[2];

    q = ggml_permute(ctx, q, 0, 2, 1, 3);                      // [head_dim, n_q, n_head]
    k = ggml_permute(ctx, k, 0, 2, 1, 3);                      // [head_dim, n_kv, n_head_kv]
    struct ggml_tensor * kq = ggml_mul_mat(ctx, k, q);         // [n_kv, n_q, n_head]; GQA by broadcast
    kq = ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);
    vtrim_cb(kq, "kq_soft_max", il);

    struct ggml_tensor * kqv = ggml_mul_mat(ctx, vt, kq);      // [head_dim, n_q, n_head]
    kqv = ggml_permute(ctx, kqv, 0, 2, 1, 3);                  // [head_dim, n_head, n_q]
    return ggml_cont_2d(ctx, kqv, head_dim * n_head, n_q);
}

struct ggml_tensor * vtrim_build_flash_attn(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                            struct ggml_tensor * v, struct ggml_tensor * mask, float scale) {
    const int64_t head_dim = q->ne[0], n_head = q->ne[1], n_q = q->ne[2];
    struct ggml_tensor * out = ggml_flash_attn_ext(ctx, ggml_permute(ctx, q, 0, 2, 1, 3), ggml_permute(ctx, k, 0, 2, 1, 3),
                                                   ggml_permute(ctx, v, 0, 2, 1, 3), mask, scale, 0.0f, 0.0f);
    ggml_prec_set_acc(out, GGML_PREC_F32);
    return ggml_reshape_2d(ctx, out, head_dim * n_head, n_q);             // out: [head_dim, n_head, n_q]
}

// Joins [d, rows_i] parts along the rows, pairwise (each row copied log2(n) times, not n times).
static struct ggml_tensor * concat_rows(struct ggml_context * ctx, struct ggml_tensor ** parts, int n) {
    while (n > 1) {
        int m = 0;
        for (int i = 0; i < n; i += 2) {
            parts[m++] = i + 1 < n ? ggml_concat(ctx, parts[i], parts[i + 1], 1) : parts[i];
        }
        n = m;
    }
    return parts[0];
}

struct ggml_tensor * vtrim_build_chunked_attn(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                              struct ggml_tensor * v, struct ggml_tensor * mask, float scale,
                                              int64_t chunk_bytes, int64_t tail_from) {
    const int64_t head_dim = q->ne[0], n_head = q->ne[1], n_q = q->ne[2], n_kv = k->ne[2], n_head_kv = k->ne[1];
    struct ggml_tensor * vt = ggml_cont(ctx, ggml_permute(ctx, v, 1, 2, 0, 3));   // [n_kv, head_dim, n_head_kv]
    struct ggml_tensor * parts[2 * VTRIM_CHUNKED_ATTN_MAX];
    int n_parts = 0;
    tail_from = tail_from < 0 || tail_from > n_q ? n_q : tail_from;
    for (int region = 0; region < 2; region++) {
        const int64_t r0 = region == 0 ? 0 : tail_from, r1 = region == 0 ? tail_from : n_q;
        const int64_t nk = region == 0 ? n_kv : tail_from;
        if (r1 <= r0 || nk <= 0) {
            continue;
        }
        int64_t rows = chunk_bytes / (nk * n_head * (int64_t) sizeof(float));
        const int64_t fewest = (r1 - r0 + VTRIM_CHUNKED_ATTN_MAX - 1) / VTRIM_CHUNKED_ATTN_MAX;
        rows = rows < fewest ? fewest : rows;
        struct ggml_tensor * kc = ggml_permute(ctx, ggml_view_3d(ctx, k, head_dim, n_head_kv, nk, k->nb[1], k->nb[2], 0),
                                               0, 2, 1, 3);                                   // [head_dim, nk, n_head_kv]
        struct ggml_tensor * vc = ggml_view_3d(ctx, vt, nk, head_dim, n_head_kv, vt->nb[1], vt->nb[2], 0);
        for (int64_t c0 = r0; c0 < r1; c0 += rows) {
            const int64_t m = rows < r1 - c0 ? rows : r1 - c0;
            // contiguous, so that the product takes the tiled matrix kernel (llamafile's sgemm on the CPU)
            struct ggml_tensor * qc = ggml_cont(ctx, ggml_permute(ctx, ggml_view_3d(ctx, q, head_dim, n_head, m, q->nb[1],
                                                                                    q->nb[2], c0 * q->nb[2]), 0, 2, 1, 3));
            struct ggml_tensor * kq = ggml_mul_mat(ctx, kc, qc);                              // [nk, m, n_head]
            struct ggml_tensor * mc = NULL;
            if (mask) {
                mc = ggml_view_2d(ctx, mask, nk, m, mask->nb[1], c0 * mask->nb[1]);
                mc = nk == mask->ne[0] ? mc : ggml_cont(ctx, mc);   // ggml_soft_max_ext takes a contiguous mask
            }
            kq = ggml_soft_max_ext(ctx, kq, mc, scale, 0.0f);
            struct ggml_tensor * kqv = ggml_mul_mat(ctx, vc, kq);                             // [head_dim, m, n_head]
            parts[n_parts++] = ggml_cont_2d(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3), head_dim * n_head, m);
        }
    }
    return concat_rows(ctx, parts, n_parts);
}

struct ggml_tensor * vtrim_build_vision_attn(struct ggml_context * ctx, const struct vtrim_attn_plan * a,
                                             struct ggml_tensor * q, struct ggml_tensor * k, struct ggml_tensor * v,
                                             struct ggml_tensor * mask, float scale, int64_t tail_from) {
    const bool chunked = a->mode == VTRIM_VISION_ATTN_CHUNKED ||
                         (a->mode == VTRIM_VISION_ATTN_AUTO && a->cpu && q->ne[2] >= VTRIM_CHUNKED_ATTN_MIN_ROWS);
    return chunked ? vtrim_build_chunked_attn(ctx, q, k, v, mask, scale, VTRIM_CHUNKED_ATTN_BYTES, tail_from)
                   : vtrim_build_flash_attn(ctx, q, k, v, mask, scale);
}

struct ggml_tensor * vtrim_build_patch_embd(struct ggml_context * ctx, struct ggml_tensor * kernel,
                                            struct ggml_tensor * pixels, int32_t patch, int64_t d) {
    struct ggml_tensor * cols = ggml_im2col(ctx, kernel, pixels, patch, patch, 0, 0, 1, 1, true, GGML_TYPE_F32);
    cols = ggml_reshape_2d(ctx, cols, cols->ne[0], ggml_nelements(cols) / cols->ne[0]);
    return ggml_mul_mat(ctx, ggml_reshape_2d(ctx, kernel, cols->ne[0], d), cols);
}
