// Visual-token reduction methods behind one table of functions each (docs/DESIGN.md, rule 5 and
// "The reducer interface"). A method is data plus pure functions: the hook that fires it computes the scores
// it asks for, calls apply, and carries out the answer (kept rows, merges). A method never sees the context,
// the model's internals or the API; what it may know of the model is vtrim_reduce_caps.
#pragma once

#include "vtrim.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// What a model offers the methods, filled by its architecture (arch->reduce_caps).
struct vtrim_reduce_caps {
    int32_t n_layer;                // decoder layers
    bool    image_rows_in_decoder;  // image tokens are decoder rows (LLaVA)
    int32_t n_cross;                // cross-attention layers (mllama), 0 if none
    int32_t first_cross_layer;      // decoder index of the first, or -1
    int32_t n_vision_layer;         // vision tower layers that run, 0 without a tower
    int32_t vision_grid;            // patches per side of the tower's square grid, 0 without a tower
};

// The attention scores a method ranks by, which its hook computes with an explicit probe (docs/DESIGN.md rule 2).
struct vtrim_score_request {
    bool per_head;      // [n_head][n] per-head scores; else the mean over heads, [n]
    bool pre_softmax;   // attention logits; else probabilities
    bool matrix;        // the head-mean logits among ALL candidates, [n][n] in vtrim_reduce_input.attn (FiCoCo)
};

// What a hook hands apply. Candidates are indexed 0..n-1 in their order (the pass's rows for a decoder hook,
// the image states for a cross-attention hook, the tower's rows for an encoder hook).
struct vtrim_reduce_input {
    int32_t        n;
    const bool *   is_image;    // decoder hooks: the image rows (the rest are kept); NULL elsewhere
    const float *  scores;      // as the score request says, averaged over the query rows; NULL: none asked
    int32_t        n_head;
    // Candidates grouped per image ([group_off[i], group_off[i] + group_len[i]) of image i), n_groups 0: one group.
    int32_t        n_groups;
    const int32_t * group_off;
    const int32_t * group_len;
    const float *  hidden;      // encoder hooks: the rows' states [n][n_embd]; NULL elsewhere
    int32_t        n_embd;
    // A .matrix request: attn[i * n + j] = candidate i's (query) logit for candidate j (key), before any mask.
    const float *  attn;
    // Each candidate's original index (its patch in the image grid, its prompt row): candidates keep their
    // original order, so ties by index are ties by original index. NULL: the identity.
    const int32_t * orig;
    int32_t        step;        // multi-step methods: this step, 0-based, of the policy's n_steps
    int32_t        n_steps;     // the policy's n_steps (as its n_steps() said for this model)
    // Encoder hooks: the tower's patch grid (patches per side): candidate 0 is the CLS row, orig k >= 1 is
    // patch k - 1 of the grid, row-major.
    int32_t        grid;
    // After-prefill hook: per decoder layer, the rows each KV head holds, what digest_layer made of the
    // layer's attention (a density, scores [n_head_kv][layer_rows[il]]); NULL elsewhere.
    int32_t        n_layer;
    int32_t        n_head_kv;
    const int32_t * layer_rows;
    const float *  layer_density;
    const float * const * layer_scores;
};

// What apply answers: the kept candidates in ascending order, and optionally merges: each dropped candidate
// src[i] adds w[i] times its state into kept candidate dst[i]; a kept row j then becomes
// (x_j + sum_i w_i x_src_i) / (1 + sum_i w_i) (FiCoCo's self-preserving merge). Hooks that cannot merge
// (decoder, cross) refuse a non-zero n_merge.
struct vtrim_reduce_output {
    int32_t * kept;        // capacity n
    int32_t   n_kept;
    int32_t * merge_src, * merge_dst;   // capacity n (NULL when the hook takes no merges)
    float *   merge_w;
    int32_t   n_merge;
    // A cross-attention hook: the kept set applies to the ranking layer itself too (else from the next one).
    bool      include_hook_layer;
    int32_t   merge_cap;   // capacity of the merge arrays; 0: n
    // After-prefill hook: per layer the rows each KV head keeps (layer_keep[il] <= layer_rows[il]) and which:
    // layer_kept[il][h * layer_keep[il] + i], ascending per head (capacity n_head_kv * layer_rows[il]).
    int32_t *  layer_keep;
    int32_t ** layer_kept;
};

// What an after-prefill hook hands digest_layer for one layer: the causal softmax probabilities of the query
// rows over the layer's cached rows, per query head: probs[(h * n_q + q) * n_kv + j]. Entry (q, j) is causally
// valid when kv_pos[j] <= q_pos[q] (kv_pos: head 0's positions; rows that differ between heads all come
// before every query row, so the validity is the same for every head).
struct vtrim_layer_attn {
    int32_t         n_q, n_head, n_head_kv, n_kv;
    const float *   probs;
    const int32_t * q_pos;
    const int32_t * kv_pos;
};

struct vtrim_reducer {
    int32_t      method;        // enum vtrim_reduce_method: what vtrim_reduce_stage.method reports
    const char * name;
    size_t       params_size;   // of the method's public params struct
    int32_t      hook;          // enum vtrim_hook
    bool         one_per_context;
    struct vtrim_score_request scores;
    // VTRIM_ERR_INVALID_ARG with the reason when the params do not fit the model.
    int32_t (*validate)(const void * params, const struct vtrim_reduce_caps * caps);
    // Where the hook fires: the decoder layer the reduced rows enter (decoder hook), the decoder index of the
    // cross-attention layer that ranks (cross hook), the vision layer the reduced rows enter (encoder hook).
    int32_t (*layer)(const void * params, const struct vtrim_reduce_caps * caps);
    // Decoder hooks: the query rows whose attention of layer()-1 ranks the candidates; returns their count
    // (capacity n). NULL elsewhere (a cross hook's queries are the rows that see an image).
    int32_t (*query_rows)(const void * params, const bool * is_image, int32_t n, int32_t * q_rows);
    int32_t (*apply)(const void * params, const struct vtrim_reduce_input * in, struct vtrim_reduce_output * out);
    // Methods that act at several layers of their hook (FiCoCo: one step per layer of a range): how many steps
    // and step i's layer (increasing; step 0's is layer()). NULL: one step, at layer().
    int32_t (*n_steps)(const void * params, const struct vtrim_reduce_caps * caps);
    int32_t (*step_layer)(const void * params, const struct vtrim_reduce_caps * caps, int32_t step);
    // After-prefill hooks: one layer's attention -> *density and scores [n_head_kv][n_kv] (the per-layer
    // summary apply reads, so that no hook holds every layer's probabilities at once). NULL elsewhere.
    int32_t (*digest_layer)(const void * params, const struct vtrim_layer_attn * a, float * density, float * scores);
};

extern const struct vtrim_reducer vtrim_reducer_fastv;   // reduce/fastv.c
extern const struct vtrim_reducer vtrim_reducer_trim;    // reduce/trim.c
extern const struct vtrim_reducer vtrim_reducer_ficoco_v;   // reduce/ficoco_v.c
extern const struct vtrim_reducer vtrim_reducer_ficoco_l;   // reduce/ficoco_l.c
extern const struct vtrim_reducer vtrim_reducer_vlcache; // reduce/vlcache.c

// One method with its params (a copy) at its layer; a multi-step method at each of its step layers.
struct vtrim_policy {
    const struct vtrim_reducer * r;
    void *                       params;
    int32_t                      layer;        // step 0's
    int32_t                      n_steps;      // >= 1
    int32_t *                    step_layers;  // [n_steps], increasing; step_layers[0] == layer
};

struct vtrim_policy_list {
    struct vtrim_policy * items;
    int32_t               n, cap;
};

// Validates and appends; on error nothing changes. Policies of one hook come in increasing layer order and
// do not interleave: a policy's first step comes after the last step of every earlier one of its hook.
int32_t vtrim_policy_list_add(struct vtrim_policy_list * l, const struct vtrim_reducer * r, const void * params,
                              const struct vtrim_reduce_caps * caps);
void    vtrim_policy_list_clear(struct vtrim_policy_list * l);
void    vtrim_policy_list_free(struct vtrim_policy_list * l);
bool    vtrim_policy_list_has_hook(const struct vtrim_policy_list * l, int32_t hook);
// The policies of hooks other than `except` in the order the prompt meets them (by layer, then as added):
// order[i] indexes l->items; returns the count.
int32_t vtrim_policy_list_order(const struct vtrim_policy_list * l, int32_t except, int32_t * order);

// A score and the row it ranks, sorted by vtrim_rank_sort: higher score first, then the lower row.
struct vtrim_ranked {
    float   score;
    int32_t row;
};
void vtrim_rank_sort(struct vtrim_ranked * r, int32_t n);
// out: the rows of the kept mask in ascending order; returns their count.
int32_t vtrim_mask_to_rows(const bool * keep, int32_t n, int32_t * out);
// The rows after the last image row (the text that follows every image), or the last row when the prompt
// ends with an image; out has capacity n; returns the count (>= 1 for n >= 1).
int32_t vtrim_rows_after_last_image(const bool * is_image, int32_t n, int32_t * out);
