#include "attn_probe.h"

struct ggml_tensor * vtrim_attn_probe_probs(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                            struct ggml_tensor * mask, float scale) {
    q = ggml_permute(ctx, q, 0, 2, 1, 3);                          // [head_dim, n_q, n_head]
    k = ggml_permute(ctx, k, 0, 2, 1, 3);                          // [head_dim, n_kv, n_head_kv]
    return ggml_soft_max_ext(ctx, ggml_mul_mat(ctx, k, q), mask, scale, 0.0f);
}

struct ggml_tensor * vtrim_attn_probe_mean(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                           struct ggml_tensor * mask, float scale) {
    const int64_t n_head = q->ne[1], n_q = q->ne[2], n_kv = k->ne[2];
    struct ggml_tensor * p = vtrim_attn_probe_probs(ctx, q, k, mask, scale);
    // Sum over (query, head) pairs: put n_kv last, then sum each row of n_q * n_head values.
    p = ggml_cont(ctx, ggml_permute(ctx, p, 2, 0, 1, 3));          // [n_q, n_head, n_kv]
    p = ggml_sum_rows(ctx, ggml_reshape_2d(ctx, p, n_q * n_head, n_kv));   // [1, n_kv]
    return ggml_scale(ctx, ggml_reshape_1d(ctx, p, n_kv), 1.0f / (float) (n_q * n_head));
}

struct ggml_tensor * vtrim_attn_probe_per_head(struct ggml_context * ctx, struct ggml_tensor * q,
                                               struct ggml_tensor * k, struct ggml_tensor * mask, float scale) {
    const int64_t n_head = q->ne[1], n_q = q->ne[2], n_kv = k->ne[2];
    struct ggml_tensor * p = vtrim_attn_probe_probs(ctx, q, k, mask, scale);
    p = ggml_cont(ctx, ggml_permute(ctx, p, 1, 0, 2, 3));          // [n_q, n_kv, n_head]
    p = ggml_sum_rows(ctx, p);                                     // [1, n_kv, n_head]
    return ggml_scale(ctx, ggml_reshape_2d(ctx, p, n_kv, n_head), 1.0f / (float) n_q);
}

struct ggml_tensor * vtrim_attn_logits_head_mean(struct ggml_context * ctx, struct ggml_tensor * q,
                                                 struct ggml_tensor * k, float scale) {
    const int64_t n_head = q->ne[1], n_q = q->ne[2], n_kv = k->ne[2];
    struct ggml_tensor * kq = ggml_mul_mat(ctx, ggml_permute(ctx, k, 0, 2, 1, 3),
                                           ggml_permute(ctx, q, 0, 2, 1, 3));   // [n_kv, n_q, n_head]
    kq = ggml_cont(ctx, ggml_permute(ctx, kq, 1, 2, 0, 3));                      // [n_head, n_kv, n_q]
    kq = ggml_sum_rows(ctx, kq);                                                 // [1, n_kv, n_q]
    return ggml_scale(ctx, ggml_reshape_2d(ctx, kq, n_kv, n_q), scale / (float) n_head);
}
