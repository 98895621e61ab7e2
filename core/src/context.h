// The context's internals, shared by the prefill/decode code and the reduction policies.
#pragma once

#include "kv_cache.h"
#include "model.h"
#include "reduce/reduce.h"
#include "vtrim.h"

#include "ggml-backend.h"

struct vtrim_context {
    struct vtrim_model *        model;
    struct vtrim_context_params params;

    ggml_backend_t       backends[2];   // [GPU,] CPU
    int                  n_backends;
    ggml_backend_t       cpu;
    ggml_backend_sched_t sched;
    void *               meta;          // memory for graph metadata (tensors, nodes), reused by every graph
    size_t               meta_size;

    struct vtrim_kv_cache kv;
    struct vtrim_cross_cache xc;        // mllama: image states' K/V per cross-attention layer
    int32_t               xc_n_images;
    int32_t               xc_off[8];     // first row of each image in xc
    int32_t               xc_visible[8]; // rows of each image's real tiles (the padded tiles follow, masked)
    uint32_t              last_sees;     // images the sequence's last row sees (decoding continues it)
    int32_t               n_past;       // positions used by the sequence
    float *               logits;       // n_vocab
    bool                  has_logits;
    float *               img_embd;     // image embeddings of the current prefill
    size_t                img_embd_cap; // floats

    struct vtrim_reduce_params policies[VTRIM_MAX_POLICIES];
    int                        n_policies;
    struct vtrim_reduce_stage  stages[VTRIM_MAX_POLICIES];   // of the last prefill
    int                        n_stages;
    int32_t *                  kept_image_rows;   // of the last prefill, into its expanded prompt
    int32_t                    n_kept_image_rows;

    struct vtrim_stats stats;
    bool ops_seen[GGML_OP_COUNT + GGML_UNARY_OP_COUNT + GGML_GLU_OP_COUNT];   // see vtrim_graph_ops
};

int32_t vtrim_context_n_vocab(const struct vtrim_context * ctx);

// Graph plumbing: begin a graph in the context's metadata memory, allocate it with the scheduler, run it.
struct ggml_context * vtrim_context_graph_begin(struct vtrim_context * ctx, struct ggml_cgraph ** gf);
int32_t vtrim_context_graph_alloc(struct vtrim_context * ctx, struct ggml_cgraph * gf);
int32_t vtrim_context_graph_compute(struct vtrim_context * ctx, struct ggml_cgraph * gf);
