// The context's internals: one sequence's KV cache, scheduler and buffers, shared by the prefill/decode code,
// the hook executors and the architectures' context parts (which keep their own state in arch_state).
#pragma once

#include "graph/graph.h"
#include "kv/kv_cache.h"
#include "model/model.h"
#include "reduce/reduce.h"
#include "vtrim.h"

#include "ggml-backend.h"

#include <stdatomic.h>

// Image rows that enter the decoder (LLaVA): the embeddings of the current prefill's images, image-major,
// and how many rows each image kept after the vision tower (an encoder reduction may keep fewer).
struct vtrim_image_rows {
    float *   embd;         // [total][n_embd]
    size_t    cap;          // floats
    int32_t * n_rows;       // per image
    // [total]: each row's index among its image's unreduced rows (an encoder reduction keeps some, in order);
    // filled by the architecture's encode when image rows are decoder rows
    int32_t * src;
    size_t    src_cap;
    int32_t   n_images;
    int32_t   cap_images;
    int32_t   n_cached;     // of n_images, taken from the model's image cache
};

// The query rows an after-prefill policy scores with: their post-RoPE Q in every layer, captured by the
// prefill's forward passes (runtime/forward.c) while ctx->q_capture is set (runtime/after_prefill.c).
struct vtrim_q_capture {
    int32_t   n;          // query rows
    int32_t * pos;        // their positions, ascending
    int32_t   n_embd_q;   // head_dim * n_head
    float *   q;          // [n_layer][n][n_embd_q]
    int32_t * n_got;      // per layer: rows captured
};

struct vtrim_context {
    struct vtrim_model *        model;
    struct vtrim_context_params params;
    void *                      arch_state;   // the architecture's (arch/arch.h)

    ggml_backend_t       backends[VTRIM_MAX_SPLIT + 1];   // [GPU,] the RPC devices, CPU
    int                  n_backends;
    ggml_backend_t       cpu;
    ggml_backend_sched_t sched;
    void *               meta;          // memory for graph metadata (tensors, nodes), reused by every graph
    size_t               meta_size;

    struct vtrim_kv_cache   kv;
    int32_t                 n_past;       // positions used by the sequence
    float *                 logits;       // n_vocab
    bool                    has_logits;
    struct vtrim_image_rows img;

    struct vtrim_policy_list policies;
    struct vtrim_reduce_stage * stages;           // of the last prefill, one per policy that ran
    int32_t                     n_stages;
    int32_t *                   kept_image_rows;  // of the last prefill, into its expanded prompt
    int32_t                     n_kept_image_rows;

    struct vtrim_stats stats;
    int64_t host_bytes_in, host_bytes_out;   // all transfers so far (the stats take a prefill's difference)
    atomic_bool          abort_flag;      // vtrim_context_abort
    vtrim_abort_callback abort_callback;  // vtrim_context_set_abort_callback
    void *               abort_data;
    bool ops_seen[GGML_OP_COUNT + GGML_UNARY_OP_COUNT + GGML_GLU_OP_COUNT];   // see vtrim_graph_ops
    struct vtrim_q_capture * q_capture;   // during a prefill with an after-prefill policy, else NULL
};

// Graph plumbing: a graph in the context's metadata memory; run = allocate with the scheduler, upload the
// inputs, compute, download the outputs. Failures carry a message.
int32_t vtrim_context_graph_new(struct vtrim_context * ctx, struct ggml_context ** gctx, struct ggml_cgraph ** gf);
// alloc + exec, for graphs whose inputs are all in `in`; exec alone after an alloc that inputs were set after.
int32_t vtrim_context_graph_alloc(struct vtrim_context * ctx, struct ggml_cgraph * gf);
int32_t vtrim_context_graph_exec(struct vtrim_context * ctx, struct ggml_cgraph * gf, const struct vtrim_tensor_io * in,
                                 int n_in, const struct vtrim_tensor_io * out, int n_out);
int32_t vtrim_context_graph_run(struct vtrim_context * ctx, struct ggml_cgraph * gf, const struct vtrim_tensor_io * in,
                                int n_in, const struct vtrim_tensor_io * out, int n_out);

// Room for n_images images of at most n_rows_max rows each in ctx->img.
int32_t vtrim_context_reserve_images(struct vtrim_context * ctx, int32_t n_images, int32_t n_rows_max);
// Records the image rows the decoder's last layers hold (vtrim_get_kept_image_rows).
int32_t vtrim_context_set_kept(struct vtrim_context * ctx, const int32_t * rows, int32_t n);
