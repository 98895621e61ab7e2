// The Llama decoder, which every architecture here runs as its text stack: hyperparameters, weights, graph.
#pragma once

#include "graph/graph.h"
#include "kv/kv_cache.h"
#include "model/model.h"

struct gguf_context;
struct vtrim_rows;

// arch: the key prefix ("llama", "mllama").
int32_t vtrim_llama_read_hparams(struct vtrim_model * m, const struct gguf_context * g, const char * arch);
// foreign[il] (or NULL): layers an architecture builds itself; only their norms and MLP are bound here.
int32_t vtrim_llama_bind_tensors(struct vtrim_model * m, const bool * foreign);

// Layers the decoder does not build itself (mllama's cross-attention layers): the architecture adds their
// inputs to the graph, builds them, and fills those inputs before it runs.
struct vtrim_decoder_ext {
    void * user;
    // Called once per graph, before any layer, for n rows and layers [il0, il1).
    void (*begin)(void * user, struct ggml_context * ctx, int il0, int il1, int32_t n);
    // A foreign layer il on cur ([n_embd, n]); returns its output (cur itself when the layer is skipped).
    struct ggml_tensor * (*build_layer)(void * user, struct ggml_context * ctx, int il, struct ggml_tensor * cur);
    // The data of the inputs begin made, for rows [a, a + n) of the pass: up to VTRIM_EXT_MAX_IO entries in io.
    int32_t (*set_inputs)(void * user, const struct vtrim_rows * rows, int32_t a, int32_t n,
                          struct vtrim_tensor_io * io, int * n_io);
};

#define VTRIM_EXT_MAX_IO 4

// Self-attention reads the cache in multiples of VTRIM_KV_PAD rows (the rows past the sequence masked), as
// llama.cpp pads n_kv: the product of the probabilities with V then has an aligned inner dimension, which the
// tinyBLAS kernels need (an unaligned one falls back to ggml's generic path, ~10% of a prefill).
#define VTRIM_KV_PAD 32
int32_t vtrim_llama_n_kv_padded(int32_t n_kv, int32_t n_ctx);

// Input tensors a decoder graph asks the caller to fill (NULL when absent).
struct vtrim_llama_inputs {
    struct ggml_tensor * text_ids;    // I32 [n_text]: token ids of the text rows, in order      (il0 == 0)
    struct ggml_tensor * image_embd;  // F32 [n_embd, n_image]: image embeddings, in order        (il0 == 0)
    struct ggml_tensor * order;       // I32 [n]: row of [text..., image...] for each row          (il0 == 0)
    struct ggml_tensor * hidden;      // F32 [n_embd, n]: the rows' hidden states entering il0     (il0 > 0)
    struct ggml_tensor * pos;         // I32 [n]: RoPE positions
    // Causal masks, one per distinct row set among the layers (any number of them): mask[i] is
    // [vtrim_llama_n_kv_padded(n_cached + n), n], built by vtrim_kv_mask_fill from layer mask_layer[i]'s
    // cached positions and the new rows' positions.
    int                   n_masks;
    struct ggml_tensor ** mask;       // il1 - il0 slots
    int32_t *             mask_layer;
    struct ggml_tensor *  q_rows;     // I32 [n_q_rows]: rows whose Q is an output (n_q_rows > 0)
};

void vtrim_llama_inputs_free(struct vtrim_llama_inputs * in);

enum vtrim_llama_want {
    VTRIM_WANT_LOGITS    = 1,   // logits of the last row ([n_vocab, 1]); needs il1 == n_layer
    VTRIM_WANT_HIDDEN    = 2,   // the rows' hidden states after layer il1 - 1
    VTRIM_WANT_H_IN_LAST = 4,   // the rows' hidden states entering layer il1 - 1 (to probe its attention)
    VTRIM_WANT_Q_LAST    = 8,   // layer il1 - 1's queries, RoPE applied ([head_dim, n_head, n]: its logit matrix)
};

struct vtrim_llama_outputs {
    struct ggml_tensor * logits;
    struct ggml_tensor * hidden;
    struct ggml_tensor * h_in_last;
    struct ggml_tensor * q_last;
    // n_q_rows > 0: per layer il0 + i, the post-RoPE Q of the rows in->q_rows, F32 [head_dim * n_head, n_q_rows]
    // (NULL for foreign layers): what an after-prefill policy scores with (runtime/after_prefill.c).
    struct ggml_tensor ** q;
};

void vtrim_llama_outputs_free(struct vtrim_llama_outputs * out);

// Layers [il0, il1) over n rows (n_text + n_image of them when il0 == 0), appending their K/V at row
// kv->n[il] of each layer. Does not advance kv->n. ext: foreign layers, or NULL. n_q_rows > 0: also output
// the Q of that many rows (out->q).
int32_t vtrim_llama_build(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_model * m,
                          const struct vtrim_kv_cache * kv, const struct vtrim_decoder_ext * ext, int il0, int il1,
                          int32_t n_text, int32_t n_image, int32_t n, int want, int32_t n_q_rows,
                          struct vtrim_llama_inputs * in, struct vtrim_llama_outputs * out);

// Attention probabilities of layer il for n_q query rows (their hidden states entering layer il,
// [n_embd, n_q]) over the layer's kv->n[il] cached rows, averaged over heads and rows: F32 [kv->n[il]].
// Fills *pos (I32 [n_q]) and *mask (F32 [kv->n[il], n_q]) as inputs.
// The per-head causal softmax probabilities of n_q query rows (q: their post-RoPE Q, F32 [head_dim, n_head,
// n_q], an input) over layer il's kv->n[il] cached rows: F32 [kv->n[il], n_q, n_head]. *mask (F32
// [kv->n[il], n_q]) is an input.
struct ggml_tensor * vtrim_llama_build_attn_probs(struct ggml_context * ctx, const struct vtrim_model * m,
                                                  const struct vtrim_kv_cache * kv, int il, struct ggml_tensor * q,
                                                  struct ggml_tensor ** mask);

struct ggml_tensor * vtrim_llama_build_attn_probe(struct ggml_context * ctx, const struct vtrim_model * m,
                                                  const struct vtrim_kv_cache * kv, int il, struct ggml_tensor * h,
                                                  struct ggml_tensor ** pos, struct ggml_tensor ** mask);

// Head-mean pre-softmax logits of layer il (no mask; GQA keys repeated) for the queries q (the layer's own,
// VTRIM_WANT_Q_LAST: [head_dim, n_head, n_q]) over the n_k cached keys from row k0: F32 [n_k, n_q]. Queries
// and keys are the ones the layer's attention used.
struct ggml_tensor * vtrim_llama_build_logits_probe(struct ggml_context * ctx, const struct vtrim_model * m,
                                                    const struct vtrim_kv_cache * kv, int il, struct ggml_tensor * q,
                                                    int32_t k0, int32_t n_k);
