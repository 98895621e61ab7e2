// Prefill and decode: images through the vision tower, the expanded prompt through the decoder in layer
// ranges split at the reduction hooks, and the stats of what each stage did.
#include "arch/clip.h"
#include "prefill_mllama.h"
#include "context.h"
#include "error.h"
#include "forward.h"
#include "reduce/reduce.h"

#include <stdlib.h>
#include <string.h>

// Vision tower + projector for each image, into c->img_embd ([n_images][n_image_tokens][n_embd]).
static int32_t encode_images(struct vtrim_context * c, struct vtrim_image * const * images, int32_t n_images) {
    const struct vtrim_model * m = c->model;
    const int64_t n_img_tok = m->vision.n_image_tokens, n_embd = m->text.n_embd;
    const size_t need = (size_t) (n_images * n_img_tok * n_embd);
    if (need > c->img_embd_cap) {
        float * p = realloc(c->img_embd, need * sizeof(float));
        if (!p) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for image embeddings");
        }
        c->img_embd = p;
        c->img_embd_cap = need;
    }
    const int64_t n_pix = 3 * (int64_t) m->vision.image_size * m->vision.image_size;
    float * pixels = malloc((size_t) n_pix * sizeof(float));
    if (!pixels) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for pixels");
    }
    int32_t rc = 0;
    for (int32_t i = 0; i < n_images && rc == 0; i++) {
        int64_t n_out = 0;
        if ((rc = vtrim_image_preprocess(m, images[i], pixels, n_pix, &n_out)) < 0) {
            vtrim_fail_prefix(rc, "image %d: ", i);
            break;
        }
        struct ggml_cgraph * gf;
        struct ggml_context * gctx = vtrim_context_graph_begin(c, &gf);
        if (!gctx) {
            rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot create a graph context");
            break;
        }
        struct ggml_tensor * inp;
        struct ggml_tensor * embd = vtrim_clip_build(gctx, gf, m, &inp);
        if ((rc = vtrim_context_graph_alloc(c, gf)) == 0) {
            ggml_backend_tensor_set(inp, pixels, 0, ggml_nbytes(inp));
            if ((rc = vtrim_context_graph_compute(c, gf)) == 0) {
                ggml_backend_tensor_get(embd, c->img_embd + i * n_img_tok * n_embd, 0, ggml_nbytes(embd));
            }
        }
        ggml_free(gctx);
    }
    free(pixels);
    return rc;
}

// The rows of one pass and which of them are image rows.
struct row_set {
    struct vtrim_rows r;
    bool *            is_image;
};

static void row_set_free(struct row_set * s) {
    free(s->r.sees);
    free(s->r.pos);
    free(s->r.token);
    free(s->r.image_row);
    free(s->r.hidden);
    free(s->is_image);
    memset(s, 0, sizeof *s);
}

// The prompt with each image placeholder expanded into its embedding rows, at positions n_past + i.
static int32_t expand_prompt(const struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens, int32_t n,
                             struct row_set * s) {
    const struct vtrim_model * m = c->model;
    s->r.n = n;
    s->r.pos = malloc(sizeof(int32_t) * (size_t) n);
    s->r.token = malloc(sizeof(int32_t) * (size_t) n);
    s->r.image_row = malloc(sizeof(int32_t) * (size_t) n);
    s->is_image = malloc(sizeof(bool) * (size_t) n);
    if (!s->r.pos || !s->r.token || !s->r.image_row || !s->is_image) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    int32_t row = 0, image_row = 0;
    for (int32_t t = 0; t < n_tokens; t++) {
        // LLaVA's placeholder becomes the image's rows; mllama's stays a token (images are cross-attended).
        const bool image = m->arch == VTRIM_ARCH_LLAVA && tokens[t] == m->image_token_id;
        const int32_t count = image ? m->vision.n_image_tokens : 1;
        for (int32_t j = 0; j < count; j++, row++) {
            s->r.pos[row] = c->n_past + row;
            s->r.token[row] = image ? -1 : tokens[t];
            s->r.image_row[row] = image ? image_row++ : -1;
            s->is_image[row] = image;
        }
    }
    return 0;
}

// The kept rows of `from`, with their hidden states taken from h ([from.n][n_embd]).
static int32_t keep_rows(const struct row_set * from, const bool * keep, const float * h, int32_t n_embd,
                         struct row_set * to) {
    int32_t n = 0;
    for (int32_t i = 0; i < from->r.n; i++) {
        n += keep[i];
    }
    to->r.n = n;
    to->r.pos = malloc(sizeof(int32_t) * (size_t) n);
    to->r.hidden = malloc(sizeof(float) * (size_t) n * n_embd);
    to->is_image = malloc(sizeof(bool) * (size_t) n);
    if (!to->r.pos || !to->r.hidden || !to->is_image) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t i = 0, j = 0; i < from->r.n; i++) {
        if (keep[i]) {
            to->r.pos[j] = from->r.pos[i];
            to->is_image[j] = from->is_image[i];
            memcpy(to->r.hidden + (size_t) j * n_embd, h + (size_t) i * n_embd, sizeof(float) * (size_t) n_embd);
            j++;
        }
    }
    return 0;
}

// Decoder FLOPs of n new rows after n_cached cached ones, one layer: the matmuls and QK^T, AV.
static double layer_flops(const struct vtrim_text_hparams * hp, double n, double n_cached) {
    const double d = hp->n_embd, d_kv = (double) hp->head_dim * hp->n_head_kv;
    const double matmuls = 2.0 * n * (2.0 * d * d + 2.0 * d * d_kv + 3.0 * d * hp->n_ff);
    const double attn = 4.0 * d * (n * n_cached + n * (n + 1.0) / 2.0);
    return matmuls + attn;
}

static int32_t count_image(const struct row_set * s) {
    int32_t k = 0;
    for (int32_t i = 0; i < s->r.n; i++) {
        k += s->is_image[i];
    }
    return k;
}

// One FastV stage on the rows that just ran layers [.., K): probe layer K-1, choose, keep.
static int32_t fastv_stage(struct vtrim_context * c, const struct vtrim_reduce_params * p, struct row_set * rows,
                           const float * h_out, const float * h_in) {
    const int il = p->fastv_k - 1, n = rows->r.n;
    const int32_t n_before = c->kv.n[il] - n;
    int32_t * q_rows = malloc(sizeof(int32_t) * (size_t) n);
    float * scores = malloc(sizeof(float) * (size_t) c->kv.n[il]);
    bool * keep = malloc(sizeof(bool) * (size_t) n);
    struct row_set kept = {0};
    int32_t rc = (q_rows && scores && keep) ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    if (rc == 0) {
        const int32_t n_q = vtrim_fastv_query_rows(p, rows->is_image, n, q_rows);
        rc = vtrim_probe_attention(c, &rows->r, h_in, il, q_rows, n_q, scores);
    }
    if (rc == 0) {
        rc = vtrim_fastv_select(p, rows->is_image, scores + n_before, n, keep);
    }
    if (rc >= 0) {
        rc = keep_rows(rows, keep, h_out, c->model->text.n_embd, &kept);
    }
    if (rc == 0) {
        row_set_free(rows);
        *rows = kept;
    } else {
        row_set_free(&kept);
    }
    free(q_rows);
    free(scores);
    free(keep);
    return rc;
}

static const struct vtrim_reduce_params * trim_policy(const struct vtrim_context * c) {
    for (int i = 0; i < c->n_policies; i++) {
        if (vtrim_reduce_hook(&c->policies[i]) == VTRIM_HOOK_CROSS_ATTN) {
            return &c->policies[i];
        }
    }
    return NULL;
}

// The expanded prompt through all layers, split at the decoder-layer policies and at the cross-attention trim.
static int32_t run_prompt(struct vtrim_context * c, struct row_set * rows, bool reduce, double * flops) {
    const struct vtrim_model * m = c->model;
    const struct vtrim_text_hparams * hp = &m->text;
    const int32_t n_embd = hp->n_embd, n_layer = hp->n_layer;
    int il = 0;
    int32_t rc = 0;
    c->n_stages = 0;
    const struct vtrim_reduce_params * trim = reduce ? trim_policy(c) : NULL;
    if (trim && c->xc.n > 0) {
        const int c0 = m->mllama.cross_layers[0];
        float * h = malloc(sizeof(float) * (size_t) rows->r.n * n_embd);
        rc = h ? vtrim_forward(c, &rows->r, 0, c0, h, NULL, false) : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        if (rc == 0) {
            rc = vtrim_mllama_trim(c, trim, &rows->r, h, &c->stages[c->n_stages]);
        }
        free(rows->r.hidden);
        rows->r.hidden = h;
        if (rc < 0) {
            return rc;
        }
        c->n_stages++;
        il = c0;
    }
    for (int i = 0; reduce && i < c->n_policies && rc == 0; i++) {
        const struct vtrim_reduce_params * p = &c->policies[i];
        if (vtrim_reduce_hook(p) != VTRIM_HOOK_DECODER_LAYER) {
            continue;
        }
        const int k = vtrim_reduce_layer(p);
        float * h_out = malloc(sizeof(float) * (size_t) rows->r.n * n_embd);
        float * h_in = malloc(sizeof(float) * (size_t) rows->r.n * n_embd);
        rc = (h_out && h_in) ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for hidden states");
        for (int l = il; l < k && rc == 0; l++) {
            *flops += layer_flops(hp, rows->r.n, c->kv.n[l]);
        }
        if (rc == 0) {
            rc = vtrim_forward(c, &rows->r, il, k, h_out, h_in, false);
        }
        const int32_t n_rows = rows->r.n, n_img = count_image(rows);
        if (rc == 0) {
            rc = fastv_stage(c, p, rows, h_out, h_in);
        }
        free(h_out);
        free(h_in);
        if (rc < 0) {
            break;
        }
        struct vtrim_reduce_stage * st = &c->stages[c->n_stages++];
        const int32_t dropped = n_rows - rows->r.n;
        const int64_t row_bytes = 2 * (int64_t) ggml_row_size(c->kv.type, (int64_t) hp->head_dim * hp->n_head_kv);
        st->method = p->method;
        st->hook = VTRIM_HOOK_DECODER_LAYER;
        st->layer = k;
        st->n_in = n_img;
        st->n_kept = count_image(rows);
        st->kv_bytes_kept = 0;
        st->flops_saved = 0.0;
        for (int l = k; l < n_layer; l++) {
            st->kv_bytes_kept += (int64_t) (c->kv.n[l] + rows->r.n) * row_bytes;
            st->flops_saved += layer_flops(hp, n_rows, c->kv.n[l]) - layer_flops(hp, rows->r.n, c->kv.n[l]);
        }
        st->kv_bytes_full = st->kv_bytes_kept + (int64_t) dropped * (n_layer - k) * row_bytes;
        il = k;
    }
    for (int l = il; l < n_layer && rc == 0; l++) {
        *flops += layer_flops(hp, rows->r.n, c->kv.n[l]);
    }
    if (rc == 0) {
        rc = vtrim_forward(c, &rows->r, il, n_layer, NULL, NULL, true);
    }
    return rc;
}

// Which image rows survived, as indices into the expanded prompt (positions are original).
static int32_t record_kept_rows(struct vtrim_context * c, const struct row_set * rows, int32_t n_kept, int32_t n_past) {
    int32_t * p = realloc(c->kept_image_rows, sizeof(int32_t) * (size_t) (n_kept > 0 ? n_kept : 1));
    if (!p) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    c->kept_image_rows = p;
    c->n_kept_image_rows = 0;
    for (int32_t i = 0; i < rows->r.n; i++) {
        if (rows->is_image[i]) {
            p[c->n_kept_image_rows++] = rows->r.pos[i] - n_past;
        }
    }
    return 0;
}

static void rollback(struct vtrim_context * c, const int32_t * kv_n, int32_t n_past) {
    memcpy(c->kv.n, kv_n, sizeof(int32_t) * (size_t) c->kv.n_layer);
    c->n_past = n_past;
    c->has_logits = false;
}

int32_t vtrim_prefill(struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens,
                      struct vtrim_image * const * images, int32_t n_images) {
    if (!c || !tokens || n_tokens <= 0 || n_images < 0 || (n_images > 0 && !images)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_prefill: need a context, at least one token, and the images");
    }
    const struct vtrim_model * m = c->model;
    int32_t n_placeholders = 0;
    for (int32_t i = 0; i < n_tokens; i++) {
        // LLaVA's placeholder never reaches the embedding: it may be a virtual id past the vocabulary
        // (llama.cpp's LLaVA-1.5 text files have no "<image>" token).
        const bool placeholder = m->arch == VTRIM_ARCH_LLAVA && tokens[i] == m->image_token_id;
        if (!placeholder && (tokens[i] < 0 || tokens[i] >= m->tok_embd->ne[1])) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "token %d at position %d is outside the vocabulary (%lld)",
                              tokens[i], i, (long long) m->tok_embd->ne[1]);
        }
        n_placeholders += m->has_vision && tokens[i] == m->image_token_id;
    }
    if (n_images > 0 && !m->has_vision) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "this model has no vision tower; it takes no images");
    }
    if (n_placeholders != n_images) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "the prompt has %d image placeholder(s) (token %d) but %d image(s) "
                          "were given", n_placeholders, m->image_token_id, n_images);
    }
    for (int32_t i = 0; i < n_images; i++) {
        if (!images[i]) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image %d is NULL", i);
        }
    }
    const bool mllama = m->arch == VTRIM_ARCH_MLLAMA;
    if (mllama && n_images > m->mllama.max_images) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "%d images in one prompt: Llama-3.2-Vision takes at most %d",
                          n_images, m->mllama.max_images);
    }
    if (mllama && n_images > 0 && c->xc_n_images > 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "this conversation already has its images: Llama-3.2-Vision takes "
                          "images in one turn (reset the context for new ones)");
    }
    const int32_t n_img_tok = m->has_vision ? m->vision.n_image_tokens : 0;
    const int64_t n_expanded = mllama ? n_tokens : n_tokens + (int64_t) n_images * (n_img_tok - 1);
    if (c->n_past + n_expanded > c->params.n_ctx) {
        return vtrim_fail(VTRIM_ERR_CONTEXT_FULL, "the prompt needs %lld positions (%d images of %d tokens) but only "
                          "%d of n_ctx=%d are free", (long long) n_expanded, n_images, n_img_tok,
                          c->params.n_ctx - c->n_past, c->params.n_ctx);
    }
    int32_t * kv_n = malloc(sizeof(int32_t) * (size_t) c->kv.n_layer);
    if (!kv_n) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    memcpy(kv_n, c->kv.n, sizeof(int32_t) * (size_t) c->kv.n_layer);
    const int32_t n_past = c->n_past;
    double flops_full = 0.0, flops = 0.0;
    for (int l = 0; l < m->text.n_layer; l++) {
        flops_full += layer_flops(&m->text, (double) n_expanded, c->kv.n[l]);
    }

    const int64_t t0 = ggml_time_us();
    int32_t rc = n_images == 0 ? 0 : mllama ? vtrim_mllama_encode(c, images, n_images, trim_policy(c) != NULL) : encode_images(c, images, n_images);
    const int64_t t1 = ggml_time_us();
    struct row_set rows = {0};
    if (rc == 0) {
        rc = expand_prompt(c, tokens, n_tokens, (int32_t) n_expanded, &rows);
    }
    if (rc == 0 && mllama && n_images > 0) {
        rows.r.sees = malloc(sizeof(uint32_t) * (size_t) n_expanded);
        rc = rows.r.sees ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        if (rc == 0) {
            vtrim_mllama_cross_visibility(m, tokens, n_tokens, rows.r.sees);
        }
    }
    const uint32_t last_sees = rows.r.sees ? rows.r.sees[n_expanded - 1] : c->last_sees;
    if (rc == 0) {
        rc = run_prompt(c, &rows, n_images > 0, &flops);
    }
    const int32_t n_kept = count_image(&rows);
    if (rc == 0 && !mllama) {
        rc = record_kept_rows(c, &rows, n_kept, n_past);
    } else if (rc == 0 && n_images > 0) {
        rc = vtrim_mllama_record_kept(c);
    }
    row_set_free(&rows);
    if (rc < 0) {
        rollback(c, kv_n, n_past);
        c->n_stages = 0;
        if (mllama && n_images > 0) {   // the images of a failed prefill are forgotten with it
            c->xc.n = 0;
            c->xc_n_images = 0;
        }
        free(kv_n);
        return rc;
    }
    free(kv_n);
    c->last_sees = last_sees;
    c->n_past += (int32_t) n_expanded;
    const int64_t t2 = ggml_time_us();
    memset(&c->stats, 0, sizeof c->stats);
    c->stats.n_prompt_tokens = (int32_t) n_expanded;
    c->stats.n_images = n_images;
    if (mllama) {   // the image states the text can attend to: the real tiles of each image
        int32_t n_visible = 0;
        for (int32_t i = 0; n_images > 0 && i < c->xc_n_images; i++) {
            n_visible += c->xc_visible[i];
        }
        c->stats.n_image_tokens = n_visible;
        c->stats.n_image_tokens_kept = c->xc.n_kept > 0 ? c->xc.n_kept : n_visible;
    } else {
        c->stats.n_image_tokens = n_images * n_img_tok;
        c->stats.n_image_tokens_kept = n_kept;
    }
    c->stats.t_encode_ms = n_images > 0 ? (t1 - t0) / 1000.0 : 0.0;   // no image: no encode, not the bookkeeping's microsecond
    c->stats.t_prefill_ms = (t2 - t1) / 1000.0;
    c->stats.prefill_flops = flops;
    c->stats.prefill_flops_full = flops_full;
    return 0;
}

int32_t vtrim_decode(struct vtrim_context * c, int32_t token) {
    if (!c) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_decode: ctx is NULL");
    }
    if (c->n_past == 0) {
        return vtrim_fail(VTRIM_ERR_STATE, "vtrim_decode before vtrim_prefill");
    }
    const struct vtrim_model * m = c->model;
    if (token < 0 || token >= m->tok_embd->ne[1] || (m->has_vision && token == m->image_token_id)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "cannot decode token %d", token);
    }
    if (c->n_past + 1 > c->params.n_ctx) {
        return vtrim_fail(VTRIM_ERR_CONTEXT_FULL, "the context is full (n_ctx=%d)", c->params.n_ctx);
    }
    int32_t pos = c->n_past;
    struct vtrim_rows rows = { .n = 1, .pos = &pos, .token = &token };
    const int64_t t0 = ggml_time_us();
    const int32_t rc = vtrim_forward(c, &rows, 0, m->text.n_layer, NULL, NULL, true);
    if (rc < 0) {   // one chunk: the cache was not advanced
        c->has_logits = false;
        return rc;
    }
    c->n_past++;
    c->stats.t_decode_ms += (ggml_time_us() - t0) / 1000.0;
    c->stats.n_decoded++;
    return 0;
}
