#include "runtime/stages.h"

#include "api/error.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

double vtrim_layer_flops(const struct vtrim_text_hparams * hp, double n, double n_cached) {
    const double d = hp->n_embd, d_kv = (double) hp->head_dim * hp->n_head_kv;
    const double matmuls = 2.0 * n * (2.0 * d * d + 2.0 * d * d_kv + 3.0 * d * hp->n_ff);
    const double attn = 4.0 * d * (n * n_cached + n * (n + 1.0) / 2.0);
    return matmuls + attn;
}

struct vtrim_reduce_stage * vtrim_stage_new(struct vtrim_context * c, const struct vtrim_policy * p) {
    struct vtrim_reduce_stage * st = &c->stages[c->n_stages++];   // sized for every policy by the prefill
    memset(st, 0, sizeof *st);
    st->method = p->r->method;
    st->hook = p->r->hook;
    st->layer = p->layer;
    return st;
}

// The pass's image rows grouped per image: rows of one image are contiguous in the pass (they were in the
// prompt and rows keep their order). Without image_row (rows that did not enter at layer 0): one group.
static int32_t image_groups(const struct vtrim_context * c, const struct vtrim_rows * rows, int32_t * off,
                            int32_t * len) {
    if (!rows->image_row) {
        return 0;
    }
    int32_t n_groups = 0, image = -1, end = 0, last = -1;
    for (int32_t i = 0; i < rows->n; i++) {
        if (!rows->is_image[i]) {
            continue;
        }
        while (rows->image_row[i] >= end && image + 1 < c->img.n_images) {
            end += c->img.n_rows[++image];
        }
        if (image != last) {
            off[n_groups] = i;
            len[n_groups++] = 0;
            last = image;
        }
        len[n_groups - 1]++;
    }
    return n_groups;
}

// Merges into h ([n][n_embd]) as the reducer's output says: x_j <- (x_j + sum w x_src) / (1 + sum w). Every
// merge reads the states before any: sources are dropped rows, targets kept ones, so none is both.
static int32_t merge_rows(float * h, int32_t n, int32_t n_embd, const struct vtrim_reduce_output * o) {
    float * acc = calloc((size_t) n, sizeof(float));
    if (!acc) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t i = 0; i < o->n_merge; i++) {
        const float * src = h + (size_t) o->merge_src[i] * n_embd;
        float * dst = h + (size_t) o->merge_dst[i] * n_embd;
        for (int32_t e = 0; e < n_embd; e++) {
            dst[e] += o->merge_w[i] * src[e];
        }
        acc[o->merge_dst[i]] += o->merge_w[i];
    }
    for (int32_t j = 0; j < o->n_kept; j++) {
        if (acc[o->kept[j]] == 0.0f) {   // nothing merged into it: its state as it was, bit for bit
            continue;
        }
        float * dst = h + (size_t) o->kept[j] * n_embd;
        const float scale = 1.0f / (1.0f + acc[o->kept[j]]);
        for (int32_t e = 0; e < n_embd; e++) {
            dst[e] *= scale;
        }
    }
    free(acc);
    return 0;
}

// The policy's stage of this prefill, made on its first step (a multi-step policy, or an encoder policy
// over several images, records into one).
static struct vtrim_reduce_stage * stage_of(struct vtrim_context * c, const struct vtrim_policy * p) {
    for (int32_t i = 0; i < c->n_stages; i++) {
        struct vtrim_reduce_stage * st = &c->stages[i];
        if (st->method == p->r->method && st->hook == p->r->hook && st->layer == p->layer) {
            return st;
        }
    }
    return vtrim_stage_new(c, p);
}

int32_t vtrim_stage_decoder(struct vtrim_context * c, const struct vtrim_policy * p, int32_t step,
                            struct vtrim_rows * rows, float * h_out, const float * h_in, const float * q) {
    const struct vtrim_text_hparams * hp = &c->model->text;
    const struct vtrim_score_request * req = &p->r->scores;
    const int k = p->step_layers[step], il = k - 1, n = rows->n;
    if (req->per_head || (req->pre_softmax && !req->matrix)) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "%s: the decoder-layer hook gives head-mean probabilities or the "
                          "head-mean logit matrix only", p->r->name);
    }
    const int32_t n_before = c->kv.n[il] - n, n_rows = n, n_img = vtrim_rows_count_image(rows);
    // A step that drops r of an image's c rows into m targets each makes r m <= r (c - r) <= c^2 / 4 merges.
    const int32_t merge_cap = req->matrix ? n + n_img / 2 * ((n_img + 1) / 2) : n;
    int32_t * ibuf = malloc(sizeof(int32_t) * (4 * (size_t) n + 2 * (size_t) merge_cap));   // q|kept|off|len|src|dst
    float * scores = req->matrix ? NULL : malloc(sizeof(float) * (size_t) c->kv.n[il]);
    float * attn = req->matrix ? malloc(sizeof(float) * (size_t) n * (size_t) n) : NULL;
    float * w = malloc(sizeof(float) * (size_t) merge_cap);
    struct vtrim_rows out = {0};
    int32_t rc = (ibuf && (scores || attn) && w) ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    int32_t n_groups = 0;
    if (rc == 0 && req->matrix) {
        rc = vtrim_probe_logits(c, rows, q, il, attn);
        n_groups = image_groups(c, rows, ibuf + 2 * n, ibuf + 3 * n);
    } else if (rc == 0) {
        const int32_t n_q = p->r->query_rows(p->params, rows->is_image, n, ibuf);
        rc = vtrim_probe_attention(c, rows, h_in, il, ibuf, n_q, scores);
    }
    struct vtrim_reduce_output o = { .kept = ibuf + n, .merge_src = ibuf + 4 * n,
                                     .merge_dst = ibuf + 4 * n + merge_cap, .merge_w = w, .merge_cap = merge_cap };
    if (rc == 0) {
        const struct vtrim_reduce_input in = { .n = n, .is_image = rows->is_image,
                                               .scores = scores ? scores + n_before : NULL, .n_head = 1,
                                               .n_groups = n_groups, .group_off = ibuf + 2 * n,
                                               .group_len = ibuf + 3 * n, .attn = attn, .orig = rows->pos,
                                               .step = step, .n_steps = p->n_steps };
        rc = p->r->apply(p->params, &in, &o);
    }
    if (rc == 0 && o.n_merge > 0) {
        rc = merge_rows(h_out, n, hp->n_embd, &o);
    }
    if (rc == 0) {
        rc = vtrim_rows_keep(rows, o.kept, o.n_kept, h_out, hp->n_embd, &out);
    }
    free(ibuf);
    free(scores);
    free(attn);
    free(w);
    if (rc < 0) {
        return rc;
    }
    vtrim_rows_free(rows);
    *rows = out;
    // One record per policy: step 0 sets what went in and the KV bytes had nothing been dropped; each step
    // takes off what its dropped rows would have cost in the layers from it on.
    struct vtrim_reduce_stage * st = stage_of(c, p);
    const int32_t dropped = n_rows - rows->n;
    const int64_t row_bytes = 2 * (int64_t) ggml_row_size(c->kv.type, (int64_t) hp->head_dim * hp->n_head_kv);
    if (step == 0) {
        st->n_in = n_img;
        for (int l = k; l < hp->n_layer; l++) {
            st->kv_bytes_full += (int64_t) (c->kv.n[l] + n_rows) * row_bytes;
        }
        st->kv_bytes_kept = st->kv_bytes_full;
    }
    st->n_kept = vtrim_rows_count_image(rows);
    st->kv_bytes_kept -= (int64_t) dropped * (hp->n_layer - k) * row_bytes;
    for (int l = k; l < hp->n_layer; l++) {
        st->flops_saved += vtrim_layer_flops(hp, n_rows, c->kv.n[l]) - vtrim_layer_flops(hp, rows->n, c->kv.n[l]);
    }
    return 0;
}

int32_t vtrim_stage_vision(struct vtrim_context * c, const struct vtrim_policy * p, const struct vtrim_vision_step * s,
                           float * hidden, int32_t n, int32_t n_embd, int32_t * n_out,
                           struct vtrim_reduce_stage ** stage) {
    const struct vtrim_score_request * req = &p->r->scores;
    if (req->per_head || (!req->matrix && req->pre_softmax)) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "%s: the vision-encoder hook gives the head-mean logit matrix only",
                          p->r->name);
    }
    if (req->matrix && !s->attn) {
        return vtrim_fail(VTRIM_ERR_STATE, "%s: the vision tower gave no logit matrix", p->r->name);
    }
    // Every (dropped, kept) pair at most once.
    const size_t cap = (size_t) n * (size_t) n;
    int32_t * buf = malloc(sizeof(int32_t) * ((size_t) n + 2 * cap));
    float * w = malloc(sizeof(float) * cap);
    float * acc = calloc((size_t) n, sizeof(float));
    if (!buf || !w || !acc) {
        free(buf); free(w); free(acc);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    struct vtrim_reduce_output o = { .kept = buf, .merge_src = buf + n, .merge_dst = buf + n + cap, .merge_w = w,
                                     .merge_cap = (int32_t) (cap < INT32_MAX ? cap : INT32_MAX) };
    const struct vtrim_reduce_input in = { .n = n, .hidden = hidden, .n_embd = n_embd, .attn = s->attn,
                                           .orig = s->orig, .step = s->step, .n_steps = p->n_steps,
                                           .grid = s->grid };
    int32_t rc = p->r->apply(p->params, &in, &o);
    if (rc == 0 && (o.n_kept < 1 || o.kept[0] != 0)) {
        rc = vtrim_fail(VTRIM_ERR_STATE, "%s dropped the vision tower's CLS row", p->r->name);
    }
    for (int32_t i = 0; rc == 0 && i < o.n_merge; i++) {
        if (o.merge_src[i] <= 0 || o.merge_src[i] >= n || o.merge_dst[i] < 0 || o.merge_dst[i] >= n) {
            rc = vtrim_fail(VTRIM_ERR_STATE, "%s merged outside the rows", p->r->name);
        }
    }
    if (rc == 0) {
        // Merges read the states before any move: x_j <- (x_j + sum w x_src) / (1 + sum w), targets kept.
        for (int32_t i = 0; i < o.n_merge; i++) {
            const float * src = hidden + (size_t) o.merge_src[i] * n_embd;
            float * dst = hidden + (size_t) o.merge_dst[i] * n_embd;
            for (int32_t e = 0; e < n_embd; e++) {
                dst[e] += o.merge_w[i] * src[e];
            }
            acc[o.merge_dst[i]] += o.merge_w[i];
        }
        // The kept rows move up in order: row j's source is at or after j.
        for (int32_t j = 0; j < o.n_kept; j++) {
            float * dst = hidden + (size_t) j * n_embd;
            const float * src = hidden + (size_t) o.kept[j] * n_embd;
            const float scale = 1.0f / (1.0f + acc[o.kept[j]]);
            for (int32_t e = 0; e < n_embd; e++) {
                dst[e] = src[e] * scale;
            }
            s->orig[j] = s->orig[o.kept[j]];
        }
        *n_out = o.n_kept;
        struct vtrim_reduce_stage * st = stage_of(c, p);
        st->n_in += s->step == 0 ? n - 1 : 0;
        st->n_kept += s->step == p->n_steps - 1 ? o.n_kept - 1 : 0;
        *stage = st;
    }
    free(buf);
    free(w);
    free(acc);
    return rc;
}

void vtrim_stage_vision_decoder(struct vtrim_context * c, int64_t n_full) {
    const struct vtrim_text_hparams * hp = &c->model->text;
    const int64_t row_bytes = 2 * (int64_t) ggml_row_size(c->kv.type, (int64_t) hp->head_dim * hp->n_head_kv);
    double rows = (double) n_full;
    for (int32_t i = 0; i < c->n_stages; i++) {
        struct vtrim_reduce_stage * st = &c->stages[i];
        if (st->hook != VTRIM_HOOK_VISION_ENCODER) {
            continue;
        }
        const double after = rows - (st->n_in - st->n_kept);
        for (int l = 0; l < hp->n_layer; l++) {
            st->kv_bytes_full += ((int64_t) c->kv.n[l] + (int64_t) rows) * row_bytes;
            st->kv_bytes_kept += ((int64_t) c->kv.n[l] + (int64_t) after) * row_bytes;
            st->flops_saved += vtrim_layer_flops(hp, rows, c->kv.n[l]) - vtrim_layer_flops(hp, after, c->kv.n[l]);
        }
        rows = after;
    }
}
