#include "forward.h"

#include "arch/llama.h"
#include "error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void fill_causal(float * mask, int32_t n_cached, int32_t n, int32_t n_kv) {
    for (int32_t r = 0; r < n; r++) {
        for (int32_t j = 0; j < n_kv; j++) {
            mask[(size_t) r * n_kv + j] = j <= n_cached + r ? 0.0f : -INFINITY;
        }
    }
}

void vtrim_fill_cross_mask(const struct vtrim_context * c, const uint32_t * sees, int32_t n, float * cross_mask,
                           float * row_mask) {
    const int32_t n_x = c->xc.n;
    for (int32_t r = 0; r < n; r++) {
        const uint32_t s = sees ? sees[r] : c->last_sees;
        float * mr = cross_mask + (size_t) r * n_x;
        if (row_mask) {
            row_mask[r] = s ? 1.0f : 0.0f;
        }
        for (int32_t j = 0; j < n_x; j++) {
            mr[j] = s ? -INFINITY : 0.0f;
        }
        for (int32_t i = 0; i < c->xc_n_images; i++) {
            if (s & (1u << i)) {
                for (int32_t j = c->xc_off[i]; j < c->xc_off[i] + c->xc_visible[i]; j++) {
                    mr[j] = 0.0f;
                }
            }
        }
    }
}

// The same rows' mask over the kept states only: the columns gathered with the trim's indices.
static void gather_kept_columns(const struct vtrim_cross_cache * xc, const float * full, int32_t n, float * kept) {
    for (int32_t r = 0; r < n; r++) {
        for (int32_t j = 0; j < xc->n_kept; j++) {
            kept[(size_t) r * xc->n_kept + j] = full[(size_t) r * xc->n + xc->kept[j]];
        }
    }
}

// One chunk: rows [a, b).
static int32_t forward_chunk(struct vtrim_context * c, const struct vtrim_rows * rows, int32_t a, int32_t b, int il0,
                             int il1, float * h_out, float * h_in_last, bool logits, void * scratch) {
    const struct vtrim_model * m = c->model;
    const int32_t n = b - a, n_embd = m->text.n_embd;
    int32_t * ids = scratch;                        // n
    int32_t * order = ids + n;                      // n
    float * img = (float *) (order + n);            // n * n_embd
    const int32_t img_cols = n_embd > 1 + c->xc.n_kept ? n_embd : 1 + c->xc.n_kept;
    float * mask = img + (size_t) n * img_cols;     // (max n_kv) * n
    int32_t n_text = 0, n_image = 0;
    if (il0 == 0) {
        for (int32_t i = a; i < b; i++) {
            if (rows->token[i] >= 0) {
                order[i - a] = n_text;
                ids[n_text++] = rows->token[i];
            } else {
                memcpy(img + (size_t) n_image * n_embd, c->img_embd + (size_t) rows->image_row[i] * n_embd,
                       sizeof(float) * (size_t) n_embd);
                order[i - a] = -1 - n_image++;
            }
        }
        for (int32_t i = 0; i < n; i++) {
            order[i] = order[i] >= 0 ? order[i] : n_text + (-1 - order[i]);
        }
    }
    struct ggml_cgraph * gf;
    struct ggml_context * gctx = vtrim_context_graph_begin(c, &gf);
    if (!gctx) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot create a graph context");
    }
    const int want = (logits && b == rows->n ? VTRIM_WANT_LOGITS : 0) | (h_out ? VTRIM_WANT_HIDDEN : 0) |
                     (h_in_last ? VTRIM_WANT_H_IN_LAST : 0);
    struct vtrim_llama_inputs in;
    struct vtrim_llama_outputs out;
    vtrim_llama_build(gctx, gf, m, &c->kv, m->arch == VTRIM_ARCH_MLLAMA ? &c->xc : NULL, il0, il1, n_text, n_image, n,
                      want, &in, &out);
    int32_t rc = vtrim_context_graph_alloc(c, gf);
    if (rc == 0) {
        if (in.text_ids) ggml_backend_tensor_set(in.text_ids, ids, 0, ggml_nbytes(in.text_ids));
        if (in.image_embd) ggml_backend_tensor_set(in.image_embd, img, 0, ggml_nbytes(in.image_embd));
        if (in.order) ggml_backend_tensor_set(in.order, order, 0, ggml_nbytes(in.order));
        if (in.hidden) {
            ggml_backend_tensor_set(in.hidden, rows->hidden + (size_t) a * n_embd, 0, ggml_nbytes(in.hidden));
        }
        if (in.pos->buffer) {   // a range of cross-attention layers only uses no positions
            ggml_backend_tensor_set(in.pos, rows->pos + a, 0, ggml_nbytes(in.pos));
        }
        for (int i = 0; i < in.n_masks; i++) {
            fill_causal(mask, in.mask_n_cached[i], n, (int32_t) in.mask[i]->ne[0]);
            ggml_backend_tensor_set(in.mask[i], mask, 0, ggml_nbytes(in.mask[i]));
        }
        if (in.row_mask) {
            float * row_mask = img;                       // free again: the image rows are uploaded
            float * kept = img + n;
            vtrim_fill_cross_mask(c, rows->sees ? rows->sees + a : NULL, n, mask, row_mask);
            if (in.cross_mask) {
                ggml_backend_tensor_set(in.cross_mask, mask, 0, ggml_nbytes(in.cross_mask));
            }
            ggml_backend_tensor_set(in.row_mask, row_mask, 0, ggml_nbytes(in.row_mask));
            if (in.cross_mask_kept) {
                gather_kept_columns(&c->xc, mask, n, kept);
                ggml_backend_tensor_set(in.cross_mask_kept, kept, 0, ggml_nbytes(in.cross_mask_kept));
            }
        }
        rc = vtrim_context_graph_compute(c, gf);
    }
    if (rc == 0) {
        if (out.hidden) ggml_backend_tensor_get(out.hidden, h_out + (size_t) a * n_embd, 0, ggml_nbytes(out.hidden));
        if (out.h_in_last) {
            ggml_backend_tensor_get(out.h_in_last, h_in_last + (size_t) a * n_embd, 0, ggml_nbytes(out.h_in_last));
        }
        if (out.logits) {
            ggml_backend_tensor_get(out.logits, c->logits, 0, ggml_nbytes(out.logits));
            c->has_logits = true;
        }
        for (int il = il0; il < il1; il++) {
            c->kv.n[il] += m->layers[il].is_cross ? 0 : n;   // cross layers keep no self-attention rows
        }
    }
    ggml_free(gctx);
    return rc;
}

int32_t vtrim_forward(struct vtrim_context * c, const struct vtrim_rows * rows, int il0, int il1, float * h_out,
                      float * h_in_last, bool logits) {
    const int32_t n_batch = c->params.n_batch, n_embd = c->model->text.n_embd;
    int32_t max_cached = 0;
    for (int il = il0; il < il1; il++) {
        max_cached = c->kv.n[il] > max_cached ? c->kv.n[il] : max_cached;
    }
    const int32_t n_chunk = rows->n < n_batch ? rows->n : n_batch;
    const int32_t n_kv = vtrim_llama_n_kv_padded(max_cached + rows->n, c->kv.n_ctx);
    const int32_t n_mask_cols = n_kv > c->xc.n ? n_kv : c->xc.n;
    // img holds n_embd floats a row, or the row mask and the kept-columns cross mask (n + n_kept a row)
    const int32_t img_cols = n_embd > 1 + c->xc.n_kept ? n_embd : 1 + c->xc.n_kept;
    const size_t scratch_size = sizeof(int32_t) * 2 * (size_t) n_chunk + sizeof(float) * (size_t) n_chunk * img_cols +
                                sizeof(float) * (size_t) n_mask_cols * n_chunk;
    void * scratch = malloc(scratch_size);
    if (!scratch) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory (%zu bytes of scratch)", scratch_size);
    }
    int32_t rc = 0;
    for (int32_t a = 0; a < rows->n && rc == 0; a += n_batch) {
        const int32_t b = a + n_batch < rows->n ? a + n_batch : rows->n;
        rc = forward_chunk(c, rows, a, b, il0, il1, h_out, h_in_last, logits, scratch);
    }
    free(scratch);
    return rc;
}

int32_t vtrim_probe_attention(struct vtrim_context * c, const struct vtrim_rows * rows, const float * h_in, int il,
                              const int32_t * q_rows, int32_t n_q, float * scores) {
    const struct vtrim_model * m = c->model;
    const int32_t n_embd = m->text.n_embd, n_kv = c->kv.n[il], n_before = n_kv - rows->n;
    float * h = malloc(sizeof(float) * (size_t) n_q * n_embd);
    int32_t * pos = malloc(sizeof(int32_t) * (size_t) n_q);
    float * mask = malloc(sizeof(float) * (size_t) n_q * n_kv);
    int32_t rc = (h && pos && mask) ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    struct ggml_context * gctx = NULL;
    if (rc == 0) {
        for (int32_t i = 0; i < n_q; i++) {
            const int32_t r = q_rows[i];
            memcpy(h + (size_t) i * n_embd, h_in + (size_t) r * n_embd, sizeof(float) * (size_t) n_embd);
            pos[i] = rows->pos[r];
            for (int32_t j = 0; j < n_kv; j++) {
                mask[(size_t) i * n_kv + j] = j <= n_before + r ? 0.0f : -INFINITY;
            }
        }
        struct ggml_cgraph * gf;
        gctx = vtrim_context_graph_begin(c, &gf);
        struct ggml_tensor * hin = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, n_embd, n_q);
        ggml_set_input(hin);
        struct ggml_tensor * tpos, * tmask;
        struct ggml_tensor * p = vtrim_llama_build_attn_probe(gctx, m, &c->kv, il, hin, &tpos, &tmask);
        ggml_set_output(p);
        ggml_build_forward_expand(gf, p);
        if ((rc = vtrim_context_graph_alloc(c, gf)) == 0) {
            ggml_backend_tensor_set(hin, h, 0, ggml_nbytes(hin));
            ggml_backend_tensor_set(tpos, pos, 0, ggml_nbytes(tpos));
            ggml_backend_tensor_set(tmask, mask, 0, ggml_nbytes(tmask));
            if ((rc = vtrim_context_graph_compute(c, gf)) == 0) {
                ggml_backend_tensor_get(p, scores, 0, ggml_nbytes(p));
            }
        }
    }
    if (gctx) {
        ggml_free(gctx);
    }
    free(h);
    free(pos);
    free(mask);
    return rc;
}
