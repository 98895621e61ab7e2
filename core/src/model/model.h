// The immutable model: what every architecture has (the Llama text stack, the vocabulary, the weights'
// buffer) and a pointer to its architecture's entry and state (arch/arch.h), which own the rest.
#pragma once

#include "vtrim.h"

#include "graph/graph.h"
#include "model/mmap.h"
#include "model/split.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <stdbool.h>
#include <stdint.h>

struct vtrim_arch;
struct vtrim_chat_template;
struct vtrim_vocab;
struct vtrim_image_cache;

struct vtrim_text_hparams {
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_ff;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;
    int32_t n_rot;
    float   rms_eps;
    float   rope_theta;
};

// What vtrim_model_info reports of the vision tower; the tower's own hyperparameters live in its arch state.
struct vtrim_vision_summary {
    int32_t image_size;       // input side, pixels
    int32_t n_layer_run;      // layers that run
    int32_t n_image_tokens;   // rows one image becomes (LLaVA: decoder rows; mllama: cross-attended states)
};

// A decoder layer. Layers an architecture builds itself (mllama's cross-attention layers: `foreign`) have
// no self-attention weights here; their norms and MLP are bound all the same.
struct vtrim_llama_layer {
    struct ggml_tensor * attn_norm;
    struct ggml_tensor * wq, * wk, * wv, * wo;
    struct ggml_tensor * ffn_norm;
    struct ggml_tensor * ffn_gate, * ffn_up, * ffn_down;
    bool                 foreign;
};

#define VTRIM_MAX_WEIGHT_FILES 2   // a single file, or llama.cpp's text + mmproj

struct vtrim_model {
    const struct vtrim_arch * arch;
    void *                    arch_state;   // the architecture's own (vision tower, cross layers, ...)
    char name[128];
    const struct vtrim_chat_template * chat;   // vtrim_chat_format's template

    struct vtrim_text_hparams   text;
    struct vtrim_vision_summary vision;
    bool has_vision;

    struct vtrim_vocab * vocab;
    int32_t image_token_id;

    // weights: metadata in ctx_w, data in buf_w on the chosen device, but for the decoder layers that
    // vtrim_layer_device puts on RPC servers (their data in rpc_buf)
    struct ggml_context * ctx_w;
    ggml_backend_buffer_t buf_w;
    ggml_backend_dev_t    dev;        // the local device (CPU or a GPU)
    int32_t               n_rpc;
    ggml_backend_dev_t    rpc_dev[VTRIM_MAX_RPC];
    ggml_backend_buffer_t rpc_buf[VTRIM_MAX_RPC];
    int64_t               n_bytes_rpc;   // of n_bytes, on the RPC devices
    // with use_mmap on the CPU: each file mapped, its tensor data a buffer over the mapping (buf_w then NULL)
    struct vtrim_mapping  map[VTRIM_MAX_WEIGHT_FILES];
    ggml_backend_buffer_t map_buf[VTRIM_MAX_WEIGHT_FILES];
    int64_t               n_bytes_mapped;
    struct vtrim_image_cache * image_cache;   // encoded images, shared by the contexts (runtime/image_cache.c)
    struct vtrim_attn_plan   vision_attn;   // how the vision towers compute attention (graph/graph.h)
    int64_t n_params;
    int64_t n_bytes;

    struct ggml_tensor * tok_embd, * output_norm, * output;
    struct ggml_tensor * rope_freqs;   // llama3 RoPE frequency factors, or NULL
    struct vtrim_llama_layer * layers;
};

// A weight by name with its shape checked (a negative extent is not checked); VTRIM_ERR_FORMAT otherwise.
int32_t vtrim_model_tensor(const struct vtrim_model * model, const char * name, int64_t ne0, int64_t ne1, int64_t ne2,
                           struct ggml_tensor ** out);
// The same with the name formatted (printf), as the per-layer weights are named ("blk.%d.attn_q.weight").
int32_t vtrim_model_tensorf(const struct vtrim_model * model, struct ggml_tensor ** out, int64_t ne0, int64_t ne1,
                            const char * fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;

// The device the weights go to (model/backend.c).
ggml_backend_dev_t vtrim_pick_device(int32_t device, int32_t * rc);
// RPC servers from "host:port,host:port" into m->rpc_dev (model/rpc.c); an unreachable one is an error.
int32_t vtrim_rpc_connect(struct vtrim_model * m, const char * servers);
// Where decoder layer il's weights and KV cache live (m->dev for anything that is not a decoder layer).
ggml_backend_dev_t vtrim_layer_device(const struct vtrim_model * m, int32_t il);
