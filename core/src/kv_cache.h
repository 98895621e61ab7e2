// The decoder's self-attention KV cache: per layer, K token-major (a row of n_embd_kv values per token) and
// V transposed (a row of n_ctx values per channel), so that attention reads V as a matrix operand without a
// copy, as llama.cpp does without flash attention. Each layer counts its own rows: after FastV the layers
// past K hold fewer tokens than the layers before it.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <stdbool.h>
#include <stdint.h>

struct vtrim_kv_cache {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    enum ggml_type        type;
    int32_t               n_layer;
    int32_t               n_ctx;
    int32_t               n_embd_kv;
    struct ggml_tensor ** k;      // [n_embd_kv, n_ctx] per layer
    struct ggml_tensor ** v;      // [n_ctx, n_embd_kv] per layer (transposed)
    int32_t *             n;      // rows in use per layer
};

// skip[il] (or NULL): layers that keep no rows (mllama's cross-attention layers) get a 1-row placeholder.
int32_t vtrim_kv_cache_init(struct vtrim_kv_cache * kv, int32_t n_layer, int32_t n_ctx, int32_t n_embd_kv,
                            enum ggml_type type, ggml_backend_buffer_type_t buft, const bool * skip);
void    vtrim_kv_cache_free(struct vtrim_kv_cache * kv);
void    vtrim_kv_cache_clear(struct vtrim_kv_cache * kv);
// Bytes of K and V rows in use, all layers.
int64_t vtrim_kv_cache_bytes_used(const struct vtrim_kv_cache * kv);

// Writes v [n_embd_kv, n] (one column per token) into the transposed V cache `cache_v` at token row0.
struct ggml_tensor * vtrim_v_cache_store(struct ggml_context * ctx, struct ggml_tensor * cache_v,
                                         struct ggml_tensor * v, int64_t row0);
// The first n tokens of a transposed V cache as attention's vt operand: [n, head_dim, n_head_kv].
struct ggml_tensor * vtrim_v_cache_view(struct ggml_context * ctx, struct ggml_tensor * cache_v, int64_t head_dim,
                                        int64_t n_head_kv, int64_t n);

// mllama's cross-attention cache: K and V of the image states for every cross-attention layer, computed
// once per prefill that brings images and reused by every later token. Rows: image-major, tile, patch.
struct vtrim_cross_cache {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf;
    enum ggml_type        type;
    int32_t               n_layer;     // cross-attention layers
    int32_t               n_rows;      // capacity
    int32_t               n_embd_kv;
    struct ggml_tensor ** k;           // [n_embd_kv, n_rows] per cross layer
    struct ggml_tensor ** v;           // [n_rows, n_embd_kv] per cross layer (transposed)
    int32_t               n;           // rows in use (0: no image yet, the cross layers are skipped)
    // Trimmed Llama: the layers marked trimmed hold only the kept states (their first n_kept rows),
    // in the order of kept[] (ascending original rows).
    int32_t               n_kept;
    int32_t *             kept;
    bool                  trimmed[64];
    struct ggml_tensor *  states;      // F32 [n_embd, n_rows]: the image states, when a trim is to come
};

// n_embd_states > 0 also keeps the image states (for a trim that computes later layers' K/V from them).
int32_t vtrim_cross_cache_init(struct vtrim_cross_cache * xc, int32_t n_layer, int32_t n_rows, int32_t n_embd_kv,
                               enum ggml_type type, ggml_backend_buffer_type_t buft, int32_t n_embd_states);
// Rows cross layer i attends to.
int32_t vtrim_cross_layer_rows(const struct vtrim_cross_cache * xc, int32_t i);
void    vtrim_cross_cache_free(struct vtrim_cross_cache * xc);
int64_t vtrim_cross_cache_bytes_used(const struct vtrim_cross_cache * xc);
