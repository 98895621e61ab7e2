#include "runtime/forward.h"

#include "api/error.h"
#include "arch/arch.h"
#include "arch/llama/llama.h"
#include "kv/mask.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void vtrim_rows_free(struct vtrim_rows * r) {
    free(r->pos);
    free(r->token);
    free(r->image_row);
    free(r->is_image);
    free(r->hidden);
    free(r->arch_rows);
    memset(r, 0, sizeof *r);
}

int32_t vtrim_rows_keep(const struct vtrim_rows * from, const int32_t * kept, int32_t n_kept, const float * h,
                        int32_t n_embd, struct vtrim_rows * to) {
    if (from->arch_rows) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "dropping decoder rows of this architecture");
    }
    memset(to, 0, sizeof *to);
    to->n = n_kept;
    to->pos = malloc(sizeof(int32_t) * (size_t) n_kept);
    to->hidden = malloc(sizeof(float) * (size_t) n_kept * n_embd);
    to->is_image = malloc(sizeof(bool) * (size_t) n_kept);
    to->image_row = from->image_row ? malloc(sizeof(int32_t) * (size_t) n_kept) : NULL;
    if (!to->pos || !to->hidden || !to->is_image || (from->image_row && !to->image_row)) {
        vtrim_rows_free(to);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t j = 0; j < n_kept; j++) {
        const int32_t i = kept[j];
        to->pos[j] = from->pos[i];
        to->is_image[j] = from->is_image[i];
        if (to->image_row) {
            to->image_row[j] = from->image_row[i];
        }
        memcpy(to->hidden + (size_t) j * n_embd, h + (size_t) i * n_embd, sizeof(float) * (size_t) n_embd);
    }
    return 0;
}

int32_t vtrim_rows_count_image(const struct vtrim_rows * r) {
    int32_t k = 0;
    for (int32_t i = 0; r->is_image && i < r->n; i++) {
        k += r->is_image[i];
    }
    return k;
}

struct scratch {
    int32_t * ids;       // n
    int32_t * order;     // n
    float *   img;       // n * n_embd
    float *   mask;      // n_kv * n
    int32_t * cols;      // n_kv: positions of the cached rows, then the new rows'
    int32_t * cap_rows;  // n: rows of the chunk whose Q ctx->q_capture wants, and their slots in it
    int32_t * cap_slot;
};

// Rows of [a, b) whose positions the capture lists (both ascending); returns their count.
static int32_t capture_rows(const struct vtrim_q_capture * cap, const struct vtrim_rows * rows, int32_t a, int32_t b,
                            int32_t * cap_rows, int32_t * cap_slot) {
    int32_t n = 0, k = 0;
    for (int32_t i = a; cap && i < b; i++) {
        while (k < cap->n && cap->pos[k] < rows->pos[i]) {
            k++;
        }
        if (k < cap->n && cap->pos[k] == rows->pos[i]) {
            cap_rows[n] = i - a;
            cap_slot[n++] = k;
        }
    }
    return n;
}

// The captured Q (tmp: [il1 - il0][n_cap][n_embd_q]) into the capture's slots.
static void capture_store(struct vtrim_q_capture * cap, const struct vtrim_llama_outputs * out, int il0, int il1,
                          const float * tmp, const int32_t * cap_slot, int32_t n_cap) {
    const size_t d = (size_t) cap->n_embd_q;
    for (int il = il0; il < il1; il++) {
        if (!out->q[il - il0]) {
            continue;
        }
        for (int32_t k = 0; k < n_cap; k++) {
            memcpy(cap->q + ((size_t) il * cap->n + cap_slot[k]) * d, tmp + ((size_t) (il - il0) * n_cap + k) * d,
                   sizeof(float) * d);
        }
        cap->n_got[il] += n_cap;
    }
}

// One chunk: rows [a, b).
static int32_t forward_chunk(struct vtrim_context * c, const struct vtrim_rows * rows, int32_t a, int32_t b, int il0,
                             int il1, float * h_out, float * h_in_last, float * q_last, bool logits,
                             struct scratch * s) {
    const struct vtrim_model * m = c->model;
    const int32_t n = b - a, n_embd = m->text.n_embd;
    int32_t n_text = 0, n_image = 0;
    if (il0 == 0) {
        for (int32_t i = a; i < b; i++) {
            if (rows->token[i] >= 0) {
                s->order[i - a] = n_text;
                s->ids[n_text++] = rows->token[i];
            } else {
                memcpy(s->img + (size_t) n_image * n_embd, c->img.embd + (size_t) rows->image_row[i] * n_embd,
                       sizeof(float) * (size_t) n_embd);
                s->order[i - a] = -1 - n_image++;
            }
        }
        for (int32_t i = 0; i < n; i++) {
            s->order[i] = s->order[i] >= 0 ? s->order[i] : n_text + (-1 - s->order[i]);
        }
    }
    struct ggml_context * gctx;
    struct ggml_cgraph * gf;
    int32_t rc = vtrim_context_graph_new(c, &gctx, &gf);
    if (rc < 0) {
        return rc;
    }
    const int want = (logits && b == rows->n ? VTRIM_WANT_LOGITS : 0) | (h_out ? VTRIM_WANT_HIDDEN : 0) |
                     (h_in_last ? VTRIM_WANT_H_IN_LAST : 0) | (q_last ? VTRIM_WANT_Q_LAST : 0);
    const struct vtrim_decoder_ext * ext = m->arch->decoder_ext ? m->arch->decoder_ext(c) : NULL;
    struct vtrim_llama_inputs in = {0};
    struct vtrim_llama_outputs out = {0};
    const int32_t n_cap = capture_rows(c->q_capture, rows, a, b, s->cap_rows, s->cap_slot);
    const int n_lay = il1 - il0;
    float * cap_q = n_cap > 0 ? malloc(sizeof(float) * (size_t) n_lay * n_cap * c->q_capture->n_embd_q) : NULL;
    struct vtrim_tensor_io * io_out = malloc(sizeof *io_out * (size_t) (4 + n_lay));
    rc = io_out && (cap_q || n_cap == 0) ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    if (rc == 0) {
        rc = vtrim_llama_build(gctx, gf, m, &c->kv, ext, il0, il1, n_text, n_image, n, want, n_cap, &in, &out);
    }
    struct vtrim_tensor_io io_in[6 + VTRIM_EXT_MAX_IO];
    int n_ext = 0;
    if (rc == 0 && ext) {
        rc = ext->set_inputs(ext->user, rows, a, n, io_in + 5, &n_ext);
    }
    if (rc == 0) {
        // The masks share one buffer: each is uploaded before the next is filled.
        rc = vtrim_context_graph_alloc(c, gf);
    }
    for (int i = 0; rc == 0 && i < in.n_masks; i++) {
        if (!in.mask[i]->buffer) {
            // No node reads it: a pass whose last layer only stores K and V for this chunk (its output unwanted).
            continue;
        }
        const int il = in.mask_layer[i];
        const int32_t n_cached = c->kv.n[il];
        memcpy(s->cols, vtrim_kv_positions(&c->kv, il, 0), sizeof(int32_t) * (size_t) n_cached);
        memcpy(s->cols + n_cached, rows->pos + a, sizeof(int32_t) * (size_t) n);
        vtrim_kv_mask_fill(s->cols, n_cached + n, rows->pos + a, n, (int32_t) in.mask[i]->ne[0], s->mask);
        ggml_backend_tensor_set(in.mask[i], s->mask, 0, ggml_nbytes(in.mask[i]));
        c->host_bytes_in += (int64_t) ggml_nbytes(in.mask[i]);
    }
    if (rc == 0) {
        io_in[0] = (struct vtrim_tensor_io) { in.text_ids, s->ids };
        io_in[1] = (struct vtrim_tensor_io) { in.image_embd, s->img };
        io_in[2] = (struct vtrim_tensor_io) { in.order, s->order };
        io_in[3] = (struct vtrim_tensor_io) { in.hidden, in.hidden ? rows->hidden + (size_t) a * n_embd : NULL };
        io_in[4] = (struct vtrim_tensor_io) { in.pos, rows->pos + a };
        io_in[5 + n_ext] = (struct vtrim_tensor_io) { in.q_rows, s->cap_rows };
        io_out[0] = (struct vtrim_tensor_io) { out.hidden, out.hidden ? h_out + (size_t) a * n_embd : NULL };
        io_out[1] = (struct vtrim_tensor_io) { out.h_in_last, out.h_in_last ? h_in_last + (size_t) a * n_embd : NULL };
        io_out[2] = (struct vtrim_tensor_io) { out.logits, c->logits };
        io_out[3] = (struct vtrim_tensor_io) {
            out.q_last, out.q_last ? q_last + (size_t) a * m->text.head_dim * m->text.n_head : NULL };
        for (int i = 0; i < n_lay; i++) {
            float * dst = n_cap > 0 ? cap_q + (size_t) i * n_cap * c->q_capture->n_embd_q : NULL;
            io_out[4 + i] = (struct vtrim_tensor_io) { n_cap > 0 ? out.q[i] : NULL, dst };
        }
        rc = vtrim_context_graph_exec(c, gf, io_in, 6 + n_ext, io_out, 4 + n_lay);
    }
    if (rc == 0 && n_cap > 0) {
        capture_store(c->q_capture, &out, il0, il1, cap_q, s->cap_slot, n_cap);
    }
    if (rc == 0) {
        c->has_logits |= out.logits != NULL;
        for (int il = il0; il < il1 && rc == 0; il++) {
            if (!m->layers[il].foreign) {   // foreign layers (cross-attention) keep no self-attention rows
                rc = vtrim_kv_append(&c->kv, il, rows->pos + a, n);
            }
        }
    }
    vtrim_llama_inputs_free(&in);
    vtrim_llama_outputs_free(&out);
    free(cap_q);
    free(io_out);
    ggml_free(gctx);
    return rc;
}

int32_t vtrim_forward(struct vtrim_context * c, const struct vtrim_rows * rows, int il0, int il1, float * h_out,
                      float * h_in_last, float * q_last, bool logits) {
    const int32_t n_batch = c->params.n_batch, n_embd = c->model->text.n_embd;
    int32_t max_cached = 0;
    for (int il = il0; il < il1; il++) {
        max_cached = c->kv.n[il] > max_cached ? c->kv.n[il] : max_cached;
    }
    const int32_t n_chunk = rows->n < n_batch ? rows->n : n_batch;
    const int32_t n_kv = vtrim_llama_n_kv_padded(max_cached + rows->n, c->kv.n_ctx);
    struct scratch s = {
        .ids = malloc(sizeof(int32_t) * (size_t) n_chunk),
        .order = malloc(sizeof(int32_t) * (size_t) n_chunk),
        .img = malloc(sizeof(float) * (size_t) n_chunk * n_embd),
        .mask = malloc(sizeof(float) * (size_t) n_kv * n_chunk),
        .cols = malloc(sizeof(int32_t) * (size_t) (max_cached + rows->n)),
        .cap_rows = malloc(sizeof(int32_t) * (size_t) n_chunk),
        .cap_slot = malloc(sizeof(int32_t) * (size_t) n_chunk),
    };
    int32_t rc = s.ids && s.order && s.img && s.mask && s.cols && s.cap_rows && s.cap_slot ? 0
                 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for a pass of %d rows", rows->n);
    for (int32_t a = 0; a < rows->n && rc == 0; a += n_batch) {
        const int32_t b = a + n_batch < rows->n ? a + n_batch : rows->n;
        rc = forward_chunk(c, rows, a, b, il0, il1, h_out, h_in_last, q_last, logits, &s);
    }
    free(s.ids);
    free(s.order);
    free(s.img);
    free(s.mask);
    free(s.cols);
    free(s.cap_rows);
    free(s.cap_slot);
    return rc;
}

int32_t vtrim_probe_attention(struct vtrim_context * c, const struct vtrim_rows * rows, const float * h_in, int il,
                              const int32_t * q_rows, int32_t n_q, float * scores) {
    const struct vtrim_model * m = c->model;
    const int32_t n_embd = m->text.n_embd, n_kv = c->kv.n[il];
    float * h = malloc(sizeof(float) * (size_t) n_q * n_embd);
    int32_t * pos = malloc(sizeof(int32_t) * (size_t) n_q);
    float * mask = malloc(sizeof(float) * (size_t) n_q * n_kv);
    int32_t rc = (h && pos && mask) ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    struct ggml_context * gctx = NULL;
    struct ggml_cgraph * gf;
    if (rc == 0) {
        for (int32_t i = 0; i < n_q; i++) {
            memcpy(h + (size_t) i * n_embd, h_in + (size_t) q_rows[i] * n_embd, sizeof(float) * (size_t) n_embd);
            pos[i] = rows->pos[q_rows[i]];
        }
        vtrim_kv_mask_fill(vtrim_kv_positions(&c->kv, il, 0), n_kv, pos, n_q, n_kv, mask);
        rc = vtrim_context_graph_new(c, &gctx, &gf);
    }
    if (rc == 0) {
        struct ggml_tensor * hin = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, n_embd, n_q);
        ggml_set_input(hin);
        struct ggml_tensor * tpos, * tmask;
        struct ggml_tensor * p = vtrim_llama_build_attn_probe(gctx, m, &c->kv, il, hin, &tpos, &tmask);
        ggml_set_output(p);
        ggml_build_forward_expand(gf, p);
        const struct vtrim_tensor_io in[] = { { hin, h }, { tpos, pos }, { tmask, mask } };
        const struct vtrim_tensor_io out[] = { { p, scores } };
        rc = vtrim_context_graph_run(c, gf, in, 3, out, 1);
        ggml_free(gctx);
    }
    free(h);
    free(pos);
    free(mask);
    return rc;
}

int32_t vtrim_probe_logits(struct vtrim_context * c, const struct vtrim_rows * rows, const float * q, int il,
                           float * attn) {
    const struct vtrim_model * m = c->model;
    const int32_t n = rows->n, k0 = c->kv.n[il] - n;
    const int64_t hd = m->text.head_dim, nh = m->text.n_head;
    // Query rows in chunks of n_batch: the [n, chunk, n_head] product is the probe's largest tensor.
    const int32_t n_batch = c->params.n_batch;
    int32_t rc = 0;
    for (int32_t a = 0; a < n && rc == 0; a += n_batch) {
        const int32_t n_q = a + n_batch < n ? n_batch : n - a;
        struct ggml_context * gctx;
        struct ggml_cgraph * gf;
        rc = vtrim_context_graph_new(c, &gctx, &gf);
        if (rc < 0) {
            break;
        }
        struct ggml_tensor * tq = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, hd, nh, n_q);
        ggml_set_input(tq);
        struct ggml_tensor * p = vtrim_llama_build_logits_probe(gctx, m, &c->kv, il, tq, k0, n);
        ggml_set_output(p);
        ggml_build_forward_expand(gf, p);
        // ggml_backend_tensor_set only reads the input
        const struct vtrim_tensor_io in[] = { { tq, (float *) (uintptr_t) (q + (size_t) a * hd * nh) } };
        const struct vtrim_tensor_io out[] = { { p, attn + (size_t) a * n } };
        rc = vtrim_context_graph_run(c, gf, in, 1, out, 1);
        ggml_free(gctx);
    }
    return rc;
}
