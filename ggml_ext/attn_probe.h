// Attention probes: the attention probabilities of a few query rows, averaged, without the full N x N
// matrix (flash attention returns no weights; docs/DESIGN.md rule 2); and, for the one method that ranks by
// it (FiCoCo), the head-mean logit matrix among a layer's rows. Stock ggml ops only.
#pragma once

#include "ggml.h"

// q: [head_dim, n_head, n_q]; k: [head_dim, n_head_kv, n_kv] (a cache view is fine; GQA by broadcast);
// mask: [n_kv, n_q] additive or NULL. softmax(q k^T * scale + mask) averaged over heads and query rows:
// F32 [n_kv].
struct ggml_tensor * vtrim_attn_probe_mean(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                           struct ggml_tensor * mask, float scale);
// The probabilities themselves, per query row and head: F32 [n_kv, n_q, n_head] (the caller keeps n_q small).
struct ggml_tensor * vtrim_attn_probe_probs(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                            struct ggml_tensor * mask, float scale);
// The same averaged over the query rows only: F32 [n_kv, n_head].
struct ggml_tensor * vtrim_attn_probe_per_head(struct ggml_context * ctx, struct ggml_tensor * q,
                                               struct ggml_tensor * k, struct ggml_tensor * mask, float scale);
// The head-mean pre-softmax logits (q k^T * scale, no mask, GQA keys by broadcast: query head h reads KV head
// h / (n_head / n_head_kv), as transformers' repeat_kv): F32 [n_kv, n_q], element (j, i) = query row i's logit
// for key row j averaged over the query heads.
struct ggml_tensor * vtrim_attn_logits_head_mean(struct ggml_context * ctx, struct ggml_tensor * q,
                                                 struct ggml_tensor * k, float scale);
