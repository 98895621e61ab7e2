// The after-prefill hook's executor (VL-Cache): the query rows' Q, captured in every layer while the prompt
// ran, scored against each layer's whole cache (per-head probabilities, one layer at a time, digested by the
// method), the method's per-layer, per-KV-head choice, then one graph that compacts every layer it shrinks.
// docs/DESIGN.md, "The after-prefill executor".
#include "runtime/after_prefill.h"

#include "api/error.h"
#include "arch/llama/llama.h"
#include "kv/mask.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int32_t vtrim_capture_begin(struct vtrim_context * c, const struct vtrim_policy * p, const struct vtrim_rows * rows) {
    const struct vtrim_text_hparams * hp = &c->model->text;
    struct vtrim_q_capture * cap = calloc(1, sizeof *cap);
    int32_t * q_rows = malloc(sizeof(int32_t) * (size_t) rows->n);
    if (cap && q_rows) {
        cap->n = p->r->query_rows(p->params, rows->is_image, rows->n, q_rows);
        cap->n_embd_q = hp->head_dim * hp->n_head;
        cap->pos = malloc(sizeof(int32_t) * (size_t) cap->n);
        cap->q = malloc(sizeof(float) * (size_t) hp->n_layer * cap->n * cap->n_embd_q);
        cap->n_got = calloc((size_t) hp->n_layer, sizeof(int32_t));
    }
    if (!cap || !q_rows || !cap->pos || !cap->q || !cap->n_got) {
        free(q_rows);
        c->q_capture = cap;
        vtrim_capture_end(c);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the query rows of %s", p->r->name);
    }
    for (int32_t i = 0; i < cap->n; i++) {
        cap->pos[i] = rows->pos[q_rows[i]];
    }
    free(q_rows);
    c->q_capture = cap;
    return 0;
}

void vtrim_capture_end(struct vtrim_context * c) {
    struct vtrim_q_capture * cap = c->q_capture;
    if (cap) {
        free(cap->pos);
        free(cap->q);
        free(cap->n_got);
        free(cap);
    }
    c->q_capture = NULL;
}

static int64_t row_bytes(const struct vtrim_kv_cache * kv) {
    return 2 * (int64_t) ggml_row_size(kv->type, kv->n_embd_kv);   // K and V of one row, all heads
}

void vtrim_stage_after_prefill_none(struct vtrim_context * c, const struct vtrim_policy * p) {
    struct vtrim_reduce_stage * st = vtrim_stage_new(c, p);
    for (int il = 0; il < c->kv.n_layer; il++) {
        st->n_in = c->kv.n[il] > st->n_in ? c->kv.n[il] : st->n_in;
    }
    st->n_kept = st->n_in;
    st->kv_bytes_full = st->kv_bytes_kept = vtrim_kv_cache_bytes_used(&c->kv);
}

// Layer il's per-head probabilities of the captured query rows over its kv->n[il] rows, digested.
static int32_t score_layer(struct vtrim_context * c, const struct vtrim_policy * p, int il, float * density,
                           float * scores) {
    const struct vtrim_model * m = c->model;
    const struct vtrim_q_capture * cap = c->q_capture;
    const int32_t n_q = cap->n, n_kv = c->kv.n[il], n_head = m->text.n_head;
    if (cap->n_got[il] != n_q) {
        return vtrim_fail(VTRIM_ERR_STATE, "%s: layer %d ran %d of the %d query rows", p->r->name, il,
                          cap->n_got[il], n_q);
    }
    float * probs = malloc(sizeof(float) * (size_t) n_head * n_q * n_kv);
    float * mask = malloc(sizeof(float) * (size_t) n_q * n_kv);
    int32_t rc = probs && mask ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    const int32_t * kv_pos = vtrim_kv_positions(&c->kv, il, 0);
    struct ggml_context * gctx = NULL;
    struct ggml_cgraph * gf;
    if (rc == 0) {
        vtrim_kv_mask_fill(kv_pos, n_kv, cap->pos, n_q, n_kv, mask);
        rc = vtrim_context_graph_new(c, &gctx, &gf);
    }
    if (rc == 0) {
        struct ggml_tensor * q = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, m->text.head_dim, n_head, n_q);
        ggml_set_input(q);
        struct ggml_tensor * tmask;
        struct ggml_tensor * pr = vtrim_llama_build_attn_probs(gctx, m, &c->kv, il, q, &tmask);
        ggml_set_output(pr);
        ggml_build_forward_expand(gf, pr);
        const struct vtrim_tensor_io in[] = { { q, cap->q + (size_t) il * n_q * cap->n_embd_q }, { tmask, mask } };
        const struct vtrim_tensor_io out[] = { { pr, probs } };
        rc = vtrim_context_graph_run(c, gf, in, 2, out, 1);
        ggml_free(gctx);
    }
    if (rc == 0) {
        const struct vtrim_layer_attn a = { .n_q = n_q, .n_head = n_head, .n_head_kv = c->kv.n_head_kv,
                                            .n_kv = n_kv, .probs = probs, .q_pos = cap->pos, .kv_pos = kv_pos };
        rc = p->r->digest_layer(p->params, &a, density, scores);
    }
    free(probs);
    free(mask);
    return rc;
}

// One graph gathers every shrunk layer's rows per head; the positions are committed once it ran, so a failure
// leaves the cache as it was.
static int32_t compact(struct vtrim_context * c, const int32_t * n_rows, const int32_t * keep, int32_t * const * kept) {
    struct vtrim_kv_cache * kv = &c->kv;
    const int32_t L = kv->n_layer, nh = kv->n_head_kv;
    struct vtrim_tensor_io * in = calloc((size_t) L, sizeof *in);
    int n_in = 0;
    struct ggml_context * gctx = NULL;
    struct ggml_cgraph * gf;
    int32_t rc = in ? vtrim_context_graph_new(c, &gctx, &gf) : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    for (int il = 0; il < L && rc == 0; il++) {
        if (keep[il] == n_rows[il]) {
            continue;
        }
        int32_t * idx = malloc(sizeof(int32_t) * (size_t) nh * keep[il]);
        if (!idx) {
            rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
            break;
        }
        vtrim_kv_compact_index(kv, kept[il], keep[il], true, idx);
        struct ggml_tensor * t;
        vtrim_kv_build_compact(gctx, gf, kv, il, keep[il], &t);
        in[n_in++] = (struct vtrim_tensor_io) { t, idx };
    }
    if (rc == 0 && n_in > 0) {
        rc = vtrim_context_graph_run(c, gf, in, n_in, NULL, 0);
    }
    for (int il = 0; il < L && rc == 0; il++) {
        if (keep[il] != n_rows[il]) {
            rc = vtrim_kv_commit_compact(kv, il, kept[il], keep[il], true);
        }
    }
    for (int i = 0; i < n_in; i++) {
        free(in[i].data);
    }
    free(in);
    if (gctx) {
        ggml_free(gctx);
    }
    return rc;
}

int32_t vtrim_stage_after_prefill(struct vtrim_context * c, const struct vtrim_policy * p) {
    struct vtrim_kv_cache * kv = &c->kv;
    const int32_t L = kv->n_layer, nh = kv->n_head_kv;
    if (!p->r->digest_layer || !p->r->scores.per_head || p->r->scores.pre_softmax || !c->q_capture) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "%s: the after-prefill hook gives per-head probabilities of its "
                          "query rows to digest_layer only", p->r->name);
    }
    const int64_t t0 = ggml_time_us();
    int32_t * n_rows = calloc((size_t) L, sizeof(int32_t));
    int32_t * keep = calloc((size_t) L, sizeof(int32_t));
    float * density = calloc((size_t) L, sizeof(float));
    float ** scores = calloc((size_t) L, sizeof(float *));
    int32_t ** kept = calloc((size_t) L, sizeof(int32_t *));
    int32_t rc = n_rows && keep && density && scores && kept ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    for (int il = 0; il < L && rc == 0; il++) {
        if (c->model->layers[il].foreign || kv->n[il] == 0) {
            continue;   // no self-attention rows
        }
        n_rows[il] = kv->n[il];
        scores[il] = malloc(sizeof(float) * (size_t) nh * n_rows[il]);
        kept[il] = malloc(sizeof(int32_t) * (size_t) nh * n_rows[il]);
        rc = scores[il] && kept[il] ? score_layer(c, p, il, &density[il], scores[il])
                                    : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    if (rc == 0) {
        const struct vtrim_reduce_input in = { .n_layer = L, .n_head_kv = nh, .layer_rows = n_rows,
                                               .layer_density = density,
                                               .layer_scores = (const float * const *) scores };
        struct vtrim_reduce_output o = { .layer_keep = keep, .layer_kept = kept };
        rc = p->r->apply(p->params, &in, &o);
    }
    if (rc == 0) {
        rc = compact(c, n_rows, keep, kept);
    }
    if (rc == 0) {
        struct vtrim_reduce_stage * st = vtrim_stage_new(c, p);
        int64_t rows_full = 0, rows_kept = 0;
        int32_t n_attn = 0;
        for (int il = 0; il < L; il++) {
            st->n_in = n_rows[il] > st->n_in ? n_rows[il] : st->n_in;
            rows_full += n_rows[il];
            rows_kept += keep[il];
            n_attn += n_rows[il] > 0;
        }
        st->n_kept = n_attn > 0 ? (int32_t) floor((double) rows_kept / n_attn + 0.5) : 0;
        st->kv_bytes_full = rows_full * row_bytes(kv);
        st->kv_bytes_kept = rows_kept * row_bytes(kv);
        st->t_ms = (ggml_time_us() - t0) / 1000.0;
    }
    for (int il = 0; scores && kept && il < L; il++) {
        free(scores[il]);
        free(kept[il]);
    }
    free(n_rows);
    free(keep);
    free(density);
    free(scores);
    free(kept);
    return rc;
}
