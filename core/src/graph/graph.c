#include "graph/graph.h"

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

struct ggml_tensor * vtrim_build_patch_embd(struct ggml_context * ctx, struct ggml_tensor * kernel,
                                            struct ggml_tensor * pixels, int32_t patch, int64_t d) {
    struct ggml_tensor * cols = ggml_im2col(ctx, kernel, pixels, patch, patch, 0, 0, 1, 1, true, GGML_TYPE_F32);
    cols = ggml_reshape_2d(ctx, cols, cols->ne[0], ggml_nelements(cols) / cols->ne[0]);
    return ggml_mul_mat(ctx, ggml_reshape_2d(ctx, kernel, cols->ne[0], d), cols);
}
