// Shared graph builders on stock ggml ops (docs/DESIGN.md rule 1): every backend runs what they make.
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stdint.h>

// A graph input or output and its host data (nbytes(t)); an input whose tensor got no buffer (no node reads
// it) is skipped.
struct vtrim_tensor_io {
    struct ggml_tensor * t;
    void *               data;
};

// t as f32 (weights such as position embeddings may be stored f16; elementwise ops want f32).
struct ggml_tensor * vtrim_f32(struct ggml_context * ctx, struct ggml_tensor * t);

// Names an intermediate "<name>-<il>" so it can be found in the graph for inspection and tests.
void vtrim_cb(struct ggml_tensor * t, const char * name, int il);

struct ggml_tensor * vtrim_build_rms_norm(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * w,
                                          float eps);
struct ggml_tensor * vtrim_build_layer_norm(struct ggml_context * ctx, struct ggml_tensor * x,
                                            struct ggml_tensor * w, struct ggml_tensor * b, float eps);
// y = W x + b; w is [n_in, n_out] in ggml order, b may be NULL.
struct ggml_tensor * vtrim_build_linear(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * w,
                                        struct ggml_tensor * b);
// x * sigmoid(1.702 x) in f32 (ggml_gelu_quick reads an f16 table on the CPU: too coarse for parity).
struct ggml_tensor * vtrim_build_quick_gelu(struct ggml_context * ctx, struct ggml_tensor * x);
// down(silu(gate(x)) * up(x))
struct ggml_tensor * vtrim_build_swiglu_ffn(struct ggml_context * ctx, struct ggml_tensor * x,
                                            struct ggml_tensor * gate, struct ggml_tensor * up,
                                            struct ggml_tensor * down);

// Softmax attention with explicit probabilities (kept so that reduction methods can read them).
// q: [head_dim, n_head, n_q]; k: [head_dim, n_head_kv, n_kv] and vt: V transposed, [n_kv, head_dim, n_head_kv]
// (views of the caches, which store V transposed so that no copy of V is made per call); mask: [n_kv, n_q]
// additive (0 / -INF) or NULL. n_head must be a multiple of n_head_kv (GQA). Returns [head_dim * n_head, n_q].
struct ggml_tensor * vtrim_build_attn_vt(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                         struct ggml_tensor * vt, struct ggml_tensor * mask, float scale, int il);

// Attention without a probability matrix in memory (ggml_flash_attn_ext, f32 accumulation): for the vision
// towers, whose thousands of rows would make explicit scores gigabytes and whose scores no reduction reads.
// q: [head_dim, n_head, n_q]; k, v: [head_dim, n_head_kv, n_kv]; mask: F16 [n_kv, n_q] or NULL.
struct ggml_tensor * vtrim_build_flash_attn(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                            struct ggml_tensor * v, struct ggml_tensor * mask, float scale);

// How a vision tower computes attention. ggml's CPU flash-attention kernel walks the keys one query row at a
// time; over thousands of positions the explicit form (scores as a matrix product, softmax, times V) on the
// matrix kernels is faster there, by chunks of query rows so that the score matrix stays small. GPU kernels
// do flash attention well. mode: enum vtrim_vision_attn (AUTO: chunked on the CPU for n_q >=
// VTRIM_CHUNKED_ATTN_MIN_ROWS); cpu: the tower runs on the CPU.
#define VTRIM_CHUNKED_ATTN_MIN_ROWS 1024
#define VTRIM_CHUNKED_ATTN_BYTES    ((int64_t) 256 << 20)   // one chunk's score matrix, at most
struct vtrim_attn_plan {
    int32_t mode;
    bool    cpu;
};

// q: [head_dim, n_head, n_q]; k, v: [head_dim, n_head_kv, n_kv]; mask: F16 [n_kv, n_q] or NULL. Query rows
// from tail_from on may attend only to the keys before tail_from (the mask hides the rest from them: HF's
// padded tiles), so those keys are left out of their products; tail_from = n_q when there is no such tail.
struct ggml_tensor * vtrim_build_vision_attn(struct ggml_context * ctx, const struct vtrim_attn_plan * a,
                                             struct ggml_tensor * q, struct ggml_tensor * k, struct ggml_tensor * v,
                                             struct ggml_tensor * mask, float scale, int64_t tail_from);
// The explicit form itself (what vtrim_build_vision_attn picks on the CPU), chunk_bytes bounding each chunk's
// scores; at most VTRIM_CHUNKED_ATTN_MAX chunks per region.
#define VTRIM_CHUNKED_ATTN_MAX 32
struct ggml_tensor * vtrim_build_chunked_attn(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                              struct ggml_tensor * v, struct ggml_tensor * mask, float scale,
                                              int64_t chunk_bytes, int64_t tail_from);

// Patch embedding of images (a stride-p convolution) as im2col + one matmul: ggml_conv_2d would round the
// pixels to f16 in its im2col; this keeps them f32. pixels: [W, H, 3(, T)]; kernel: [p, p, 3, d].
// Returns [d, patches of every image], patches row-major as HF flattens them.
struct ggml_tensor * vtrim_build_patch_embd(struct ggml_context * ctx, struct ggml_tensor * kernel,
                                            struct ggml_tensor * pixels, int32_t patch, int64_t d);
