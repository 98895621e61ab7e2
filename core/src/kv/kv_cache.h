// The decoder's self-attention KV cache. Per layer: K token-major ([head_dim, n_head_kv] per row) and V
// transposed (a row of n_ctx values per channel), so that attention reads V as a matrix operand without a
// copy, as llama.cpp does without flash attention (docs/DESIGN.md, "The KV cache": why V stays transposed).
// Each layer counts its own rows and stores each row's position: after FastV the layers past K hold fewer
// rows than the layers before it, with gaps in their positions; masks are built from those positions.
// A layer's KV heads may hold different rows (VL-Cache keeps its own rows per head), as many per head;
// until a per-head compaction they share one position list.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"
#include "model/split.h"

#include <stdbool.h>
#include <stdint.h>

struct vtrim_kv_cache {
    struct ggml_context * ctx;
    ggml_backend_buffer_t buf[VTRIM_MAX_SPLIT];   // [0]: the local device's; then one per RPC device
    enum ggml_type        type;
    int32_t               n_layer;
    int32_t               n_ctx;
    int32_t               head_dim;
    int32_t               n_head_kv;
    int32_t               n_embd_kv;     // head_dim * n_head_kv
    struct ggml_tensor ** k;             // [n_embd_kv, n_ctx] per layer
    struct ggml_tensor ** v;             // [n_ctx, n_embd_kv] per layer (transposed)
    int32_t *             n;             // rows in use per layer (each KV head holds as many)
    int32_t *             pos;           // [n_layer][n_ctx]: the position of each row (head 0's, or all heads')
    int32_t **            pos_head;      // per layer: NULL (heads share pos), or [n_head_kv][n_ctx]
};

// The storage both this cache and mllama's cross cache use: K ([n_embd_kv, n_rows]) and transposed V
// ([n_rows, n_embd_kv]) of n_layer layers, named "<name>_k_<il>" and "<name>_v_<il>", in buf[0] of buft;
// layer_buft (or NULL) gives each layer's buffer type, and the layers of another type than buft go to
// buf[1..] (buf: VTRIM_MAX_SPLIT entries, NULL at first). one_row[il] (or NULL) gives a layer a 1-row
// placeholder; extra_ne0 > 0 adds one F32 [extra_ne0, n_rows] tensor (*extra) to buf[0]. On failure
// everything is freed and the message says what did not fit.
int32_t vtrim_kv_tensors_init(struct ggml_context ** ctx, ggml_backend_buffer_t * buf, struct ggml_tensor *** k,
                              struct ggml_tensor *** v, int32_t n_layer, int32_t n_embd_kv, int32_t n_rows,
                              const bool * one_row, enum ggml_type type, ggml_backend_buffer_type_t buft,
                              const ggml_backend_buffer_type_t * layer_buft, const char * name, int64_t extra_ne0,
                              struct ggml_tensor ** extra);
void    vtrim_kv_tensors_free(struct ggml_context ** ctx, ggml_backend_buffer_t * buf, struct ggml_tensor *** k,
                              struct ggml_tensor *** v);

// skip[il] (or NULL): layers that keep no rows (mllama's cross-attention layers) get a 1-row placeholder.
// layer_buft (or NULL): each layer's buffer type, as for vtrim_kv_tensors_init.
int32_t vtrim_kv_cache_init(struct vtrim_kv_cache * kv, int32_t n_layer, int32_t n_ctx, int32_t head_dim,
                            int32_t n_head_kv, enum ggml_type type, ggml_backend_buffer_type_t buft,
                            const ggml_backend_buffer_type_t * layer_buft, const bool * skip);
void    vtrim_kv_cache_free(struct vtrim_kv_cache * kv);
void    vtrim_kv_cache_clear(struct vtrim_kv_cache * kv);
// Bytes of K and V rows in use, all layers.
int64_t vtrim_kv_cache_bytes_used(const struct vtrim_kv_cache * kv);

// The positions of layer il's rows for KV head h.
const int32_t * vtrim_kv_positions(const struct vtrim_kv_cache * kv, int32_t il, int32_t h);
// Whether layers a and b hold the same rows (count and positions, every head): they can share a mask.
bool    vtrim_kv_same_rows(const struct vtrim_kv_cache * kv, int32_t a, int32_t b);
// Records n rows appended to layer il (written by the graph at row kv->n[il]) at positions pos; every head
// gets them. Fails when a position is not after the layer's last one (rows stay sorted by position).
int32_t vtrim_kv_append(struct vtrim_kv_cache * kv, int32_t il, const int32_t * pos, int32_t n);
// Prefix reuse across turns: drops every row after position p, in every layer. Fails (changing nothing) when
// the heads of a layer would then hold different numbers of rows.
int32_t vtrim_kv_truncate(struct vtrim_kv_cache * kv, int32_t p);

// Compaction of layer il to n_keep rows: rows[h * n_keep + i] (per_head; else rows[i] for every head) is the
// i-th row head h keeps, ascending. build adds the gathers to gf (idx: an I32 [n_keep, n_head_kv] input the
// caller fills with the rows; per head, so that every head gathers its own); commit then records the
// positions and the count, once the graph ran.
void    vtrim_kv_build_compact(struct ggml_context * ctx, struct ggml_cgraph * gf, const struct vtrim_kv_cache * kv,
                               int32_t il, int32_t n_keep, struct ggml_tensor ** idx);
int32_t vtrim_kv_commit_compact(struct vtrim_kv_cache * kv, int32_t il, const int32_t * rows, int32_t n_keep,
                                bool per_head);
// The index input of build for the rows (n_keep * n_head_kv values).
void    vtrim_kv_compact_index(const struct vtrim_kv_cache * kv, const int32_t * rows, int32_t n_keep, bool per_head,
                               int32_t * idx);

// Writes v [n_embd_kv, n] (one column per token) into the transposed V cache `cache_v` at token row0.
struct ggml_tensor * vtrim_v_cache_store(struct ggml_context * ctx, struct ggml_tensor * cache_v,
                                         struct ggml_tensor * v, int64_t row0);
// The first n tokens of a transposed V cache as attention's vt operand: [n, head_dim, n_head_kv].
struct ggml_tensor * vtrim_v_cache_view(struct ggml_context * ctx, struct ggml_tensor * cache_v, int64_t head_dim,
                                        int64_t n_head_kv, int64_t n);
