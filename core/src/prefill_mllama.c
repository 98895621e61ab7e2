#include "prefill_mllama.h"

#include "arch/mllama.h"
#include "error.h"
#include "reduce/reduce.h"

#include <stdlib.h>
#include <string.h>

// mllama: each image through the vision tower, its states' K/V written into the cross-attention cache.
int32_t vtrim_mllama_encode(struct vtrim_context * c, struct vtrim_image * const * images, int32_t n_images,
                            bool trim_pending) {
    const struct vtrim_model * m = c->model;
    const struct vtrim_mllama_hparams * hp = &m->mllama;
    const int32_t per_image = hp->max_tiles * hp->n_pos;
    const int32_t L = hp->max_tiles * (hp->n_pos + hp->n_pad);
    int32_t rc = 0;
    if (c->xc.n_rows < n_images * per_image || (trim_pending && !c->xc.states)) {
        vtrim_cross_cache_free(&c->xc);
        rc = vtrim_cross_cache_init(&c->xc, hp->n_cross, n_images * per_image, m->text.head_dim * m->text.n_head_kv,
                                    c->kv.type, ggml_backend_dev_buffer_type(m->dev),
                                    trim_pending ? m->text.n_embd : 0);
        if (rc < 0) {
            return rc;
        }
    }
    c->xc.n_kept = 0;
    memset(c->xc.trimmed, 0, sizeof c->xc.trimmed);
    const size_t n_pix = (size_t) hp->max_tiles * 3 * hp->tile_size * hp->tile_size;
    float * pixels = malloc(sizeof(float) * n_pix);
    ggml_fp16_t * mask = malloc(sizeof(ggml_fp16_t) * (size_t) L * L);
    if (!pixels || !mask) {
        rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the image");
    }
    for (int32_t i = 0; i < n_images && rc == 0; i++) {
        int32_t n_tiles = 0, ar_id = 0;
        if ((rc = vtrim_mllama_preprocess(images[i], &m->mllama_pp, pixels, &n_tiles, &ar_id, NULL, NULL)) < 0) {
            vtrim_fail_prefix(rc, "image %d: ", i);
            break;
        }
        vtrim_mllama_vision_mask(m, n_tiles, mask);
        struct ggml_cgraph * gf;
        struct ggml_context * gctx = vtrim_context_graph_begin(c, &gf);
        if (!gctx) {
            rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot create a graph context");
            break;
        }
        struct vtrim_mllama_vision_inputs in;
        struct ggml_tensor * states = vtrim_mllama_build_vision(gctx, gf, m, &in);
        vtrim_mllama_build_cross_kv(gctx, gf, m, &c->xc, states, i * per_image, 0, trim_pending ? 1 : hp->n_cross);
        if (trim_pending) {
            const size_t row = ggml_row_size(GGML_TYPE_F32, m->text.n_embd);
            ggml_build_forward_expand(gf, ggml_cpy(gctx, states, ggml_view_2d(gctx, c->xc.states, m->text.n_embd,
                                                                               per_image, row, row * i * per_image)));
        }
        if ((rc = vtrim_context_graph_alloc(c, gf)) == 0) {
            ggml_backend_tensor_set(in.pixels, pixels, 0, ggml_nbytes(in.pixels));
            ggml_backend_tensor_set(in.ar_id, &ar_id, 0, sizeof ar_id);
            ggml_backend_tensor_set(in.mask, mask, 0, ggml_nbytes(in.mask));
            rc = vtrim_context_graph_compute(c, gf);
        }
        ggml_free(gctx);
        c->xc_off[i] = i * per_image;
        c->xc_visible[i] = n_tiles * hp->n_pos;
    }
    free(pixels);
    free(mask);
    if (rc == 0) {
        c->xc.n = n_images * per_image;
        c->xc_n_images = n_images;
    }
    return rc;
}

// mllama: the images each prompt row cross-attends to, as HF's get_cross_attention_token_mask decides:
// image k from its token to the next image's token (the last to the end), consecutive images together.
void vtrim_mllama_cross_visibility(const struct vtrim_model * m, const int32_t * tokens, int32_t n, uint32_t * sees) {
    int32_t loc[32], n_img = 0;
    for (int32_t i = 0; i < n && n_img < 32; i++) {
        if (tokens[i] == m->image_token_id) {
            loc[n_img++] = i;
        }
    }
    int32_t end[32];
    for (int32_t k = 0; k < n_img; k++) {
        end[k] = k + 1 < n_img ? loc[k + 1] : INT32_MAX;
    }
    for (int32_t k = n_img - 2; k >= 0; k--) {
        if (loc[k] == end[k] - 1) {
            end[k] = end[k + 1];
        }
    }
    for (int32_t r = 0; r < n; r++) {
        sees[r] = 0;
        for (int32_t k = 0; k < n_img; k++) {
            if (loc[k] <= r && r < end[k]) {
                sees[r] |= 1u << k;
            }
        }
    }
}


int32_t vtrim_mllama_trim(struct vtrim_context * c, const struct vtrim_reduce_params * p,
                          const struct vtrim_rows * rows, const float * h_in, struct vtrim_reduce_stage * stage) {
    const struct vtrim_model * m = c->model;
    const struct vtrim_text_hparams * hp = &m->text;
    struct vtrim_cross_cache * xc = &c->xc;
    const int c0 = m->mllama.cross_layers[0];
    const int32_t n_x = xc->n, n_embd = hp->n_embd;
    int32_t n_cand = 0;
    for (int32_t i = 0; i < c->xc_n_images; i++) {
        n_cand += c->xc_visible[i];
    }
    // The query rows: the prompt rows that see an image.
    int32_t * q_rows = malloc(sizeof(int32_t) * (size_t) rows->n);
    int32_t n_q = 0;
    for (int32_t r = 0; q_rows && r < rows->n; r++) {
        if (rows->sees ? rows->sees[r] : c->last_sees) {
            q_rows[n_q++] = r;
        }
    }
    float * h = malloc(sizeof(float) * (size_t) (n_q > 0 ? n_q : 1) * n_embd);
    float * mask = malloc(sizeof(float) * (size_t) (n_q > 0 ? n_q : 1) * n_x);
    uint32_t * sees = malloc(sizeof(uint32_t) * (size_t) (n_q > 0 ? n_q : 1));
    float * scores = malloc(sizeof(float) * (size_t) n_x * hp->n_head);
    int32_t rc = (q_rows && h && mask && sees && scores) ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    struct ggml_context * gctx = NULL;
    if (rc == 0 && n_q == 0) {
        xc->n_kept = 0;   // no text sees an image: nothing ranks the states; they stay untrimmed
    } else if (rc == 0) {
        for (int32_t i = 0; i < n_q; i++) {
            memcpy(h + (size_t) i * n_embd, h_in + (size_t) q_rows[i] * n_embd, sizeof(float) * (size_t) n_embd);
            sees[i] = rows->sees ? rows->sees[q_rows[i]] : c->last_sees;
        }
        vtrim_fill_cross_mask(c, sees, n_q, mask, NULL);
        struct ggml_cgraph * gf;
        gctx = vtrim_context_graph_begin(c, &gf);
        struct ggml_tensor * th = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, n_embd, n_q);
        struct ggml_tensor * tm = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, n_x, n_q);
        ggml_set_input(th);
        ggml_set_input(tm);
        struct ggml_tensor * probs = vtrim_mllama_build_cross_probe(gctx, m, xc, c0, th, tm);
        ggml_set_output(probs);
        ggml_build_forward_expand(gf, probs);
        if ((rc = vtrim_context_graph_alloc(c, gf)) == 0) {
            ggml_backend_tensor_set(th, h, 0, ggml_nbytes(th));
            ggml_backend_tensor_set(tm, mask, 0, ggml_nbytes(tm));
            if ((rc = vtrim_context_graph_compute(c, gf)) == 0) {
                ggml_backend_tensor_get(probs, scores, 0, ggml_nbytes(probs));
            }
        }
        ggml_free(gctx);
        gctx = NULL;
        if (rc == 0) {
            rc = vtrim_trim_select(p, scores, hp->n_head, n_x, c->xc_off, c->xc_visible, c->xc_n_images, xc->kept,
                                   &xc->n_kept);
        }
    }
    // K/V of the trimmed layers from the kept states only.
    const int32_t i0 = p->trim_first_layer ? 0 : 1;
    if (rc == 0 && xc->n_kept > 0 && i0 < m->mllama.n_cross) {
        struct ggml_cgraph * gf;
        gctx = vtrim_context_graph_begin(c, &gf);
        struct ggml_tensor * idx = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, xc->n_kept);
        ggml_set_input(idx);
        vtrim_mllama_build_cross_kv(gctx, gf, m, xc, ggml_get_rows(gctx, xc->states, idx), 0, i0, m->mllama.n_cross);
        if ((rc = vtrim_context_graph_alloc(c, gf)) == 0) {
            ggml_backend_tensor_set(idx, xc->kept, 0, ggml_nbytes(idx));
            rc = vtrim_context_graph_compute(c, gf);
        }
        ggml_free(gctx);
        for (int32_t i = i0; rc == 0 && i < m->mllama.n_cross; i++) {
            xc->trimmed[i] = true;
        }
    }
    if (rc == 0) {
        const int64_t row_bytes = 2 * (int64_t) ggml_row_size(xc->type, xc->n_embd_kv);
        memset(stage, 0, sizeof *stage);
        stage->method = VTRIM_REDUCE_TRIM;
        stage->hook = VTRIM_HOOK_CROSS_ATTN;
        stage->layer = c0;
        stage->n_in = n_cand;
        stage->n_kept = xc->n_kept > 0 ? xc->n_kept : n_cand;
        stage->kv_bytes_full = (int64_t) m->mllama.n_cross * n_x * row_bytes;
        stage->kv_bytes_kept = vtrim_cross_cache_bytes_used(xc);
        // The K/V projections of the trimmed layers that were not computed.
        stage->flops_saved = xc->n_kept > 0 ? 4.0 * (m->mllama.n_cross - i0) * (double) (n_x - xc->n_kept) * n_embd *
                                              xc->n_embd_kv : 0.0;
    }
    free(q_rows);
    free(h);
    free(mask);
    free(sees);
    free(scores);
    return rc;
}

int32_t vtrim_mllama_record_kept(struct vtrim_context * c) {
    const struct vtrim_cross_cache * xc = &c->xc;
    int32_t * p = realloc(c->kept_image_rows, sizeof(int32_t) * (size_t) (xc->n > 0 ? xc->n : 1));
    if (!p) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    c->kept_image_rows = p;
    c->n_kept_image_rows = 0;
    if (xc->n_kept > 0) {
        memcpy(p, xc->kept, sizeof(int32_t) * (size_t) xc->n_kept);
        c->n_kept_image_rows = xc->n_kept;
        return 0;
    }
    for (int32_t i = 0; i < c->xc_n_images; i++) {
        for (int32_t j = c->xc_off[i]; j < c->xc_off[i] + c->xc_visible[i]; j++) {
            p[c->n_kept_image_rows++] = j;
        }
    }
    return 0;
}
