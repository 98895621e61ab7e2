// The context: KV cache, scheduler and buffers of one sequence; prefill (images + text) and decode.
#include "context.h"

#include "arch/clip.h"
#include "arch/llama.h"
#include "error.h"
#include "vocab.h"

#include "ggml-alloc.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#define VTRIM_GRAPH_SIZE 16384

void vtrim_context_params_default(struct vtrim_context_params * p) {
    if (!p) {
        return;
    }
    memset(p, 0, sizeof *p);
    p->n_ctx = 4096;
    p->n_batch = 512;
    p->n_threads = 0;
    p->kv_type = VTRIM_KV_F16;
}

static int default_threads(void) {
#if defined(_SC_NPROCESSORS_ONLN)
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int) n : GGML_DEFAULT_N_THREADS;
#else
    return GGML_DEFAULT_N_THREADS;
#endif
}

int32_t vtrim_context_init(struct vtrim_model * model, const struct vtrim_context_params * params,
                           struct vtrim_context ** out) {
    if (!model || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_context_init: model and out are required");
    }
    *out = NULL;
    if (!model->ctx_w || !model->output) {
        return vtrim_fail(VTRIM_ERR_STATE, "the model was loaded with vocab_only: it has no weights to run");
    }
    struct vtrim_context_params p;
    vtrim_context_params_default(&p);
    if (params) {
        p = *params;
    }
    if (p.n_ctx <= 0) {
        p.n_ctx = model->text.n_ctx_train;
    }
    if (p.n_batch <= 0 || p.n_ctx > (1 << 24) || (p.kv_type != VTRIM_KV_F16 && p.kv_type != VTRIM_KV_F32)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "invalid context parameters (n_ctx %d, n_batch %d, kv_type %d)",
                          p.n_ctx, p.n_batch, p.kv_type);
    }
    if (p.n_threads <= 0) {
        p.n_threads = default_threads();
    }
    ggml_time_init();

    struct vtrim_context * c = calloc(1, sizeof *c);
    if (!c) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    c->model = model;
    c->params = p;
    int32_t rc = 0;
    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (model->dev != cpu_dev) {
        c->backends[c->n_backends++] = ggml_backend_dev_init(model->dev, NULL);
    }
    c->cpu = ggml_backend_dev_init(cpu_dev, NULL);
    c->backends[c->n_backends++] = c->cpu;
    for (int i = 0; i < c->n_backends; i++) {
        if (!c->backends[i]) {
            rc = vtrim_fail(VTRIM_ERR_BACKEND, "cannot initialise a ggml backend");
        }
    }
    if (rc == 0) {
        ggml_backend_cpu_set_n_threads(c->cpu, p.n_threads);
        c->sched = ggml_backend_sched_new(c->backends, NULL, c->n_backends, VTRIM_GRAPH_SIZE, false, true);
        if (!c->sched) {
            rc = vtrim_fail(VTRIM_ERR_BACKEND, "cannot create the ggml scheduler");
        }
    }
    if (rc == 0) {
        const struct vtrim_text_hparams * hp = &model->text;
        rc = vtrim_kv_cache_init(&c->kv, hp->n_layer, p.n_ctx, hp->head_dim * hp->n_head_kv,
                                 p.kv_type == VTRIM_KV_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16,
                                 ggml_backend_dev_buffer_type(model->dev));
    }
    if (rc == 0) {
        c->meta_size = ggml_tensor_overhead() * VTRIM_GRAPH_SIZE + ggml_graph_overhead_custom(VTRIM_GRAPH_SIZE, false);
        c->meta = malloc(c->meta_size);
        c->logits = calloc((size_t) model->text.n_vocab, sizeof(float));
        if (!c->meta || !c->logits) {
            rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        }
    }
    if (rc < 0) {
        vtrim_context_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void vtrim_context_free(struct vtrim_context * c) {
    if (!c) {
        return;
    }
    if (c->sched) {
        ggml_backend_sched_free(c->sched);
    }
    for (int i = 0; i < c->n_backends; i++) {
        if (c->backends[i]) {
            ggml_backend_free(c->backends[i]);
        }
    }
    vtrim_kv_cache_free(&c->kv);
    free(c->meta);
    free(c->logits);
    free(c->img_embd);
    free(c);
}

int32_t vtrim_context_reset(struct vtrim_context * c) {
    if (!c) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_context_reset: ctx is NULL");
    }
    vtrim_kv_cache_clear(&c->kv);
    c->n_past = 0;
    c->has_logits = false;
    memset(&c->stats, 0, sizeof c->stats);
    return 0;
}

int32_t vtrim_context_n_vocab(const struct vtrim_context * c) { return c->model->text.n_vocab; }

struct ggml_context * vtrim_context_graph_begin(struct vtrim_context * c, struct ggml_cgraph ** gf) {
    struct ggml_init_params ip = { .mem_size = c->meta_size, .mem_buffer = c->meta, .no_alloc = true };
    struct ggml_context * gctx = ggml_init(ip);
    *gf = gctx ? ggml_new_graph_custom(gctx, VTRIM_GRAPH_SIZE, false) : NULL;
    return gctx;
}

int32_t vtrim_context_graph_alloc(struct vtrim_context * c, struct ggml_cgraph * gf) {
    ggml_backend_sched_reset(c->sched);
    if (!ggml_backend_sched_alloc_graph(c->sched, gf)) {
        return vtrim_fail(VTRIM_ERR_BACKEND, "cannot allocate the compute graph");
    }
    return 0;
}

int32_t vtrim_context_graph_compute(struct vtrim_context * c, struct ggml_cgraph * gf) {
    if (ggml_backend_sched_graph_compute(c->sched, gf) != GGML_STATUS_SUCCESS) {
        return vtrim_fail(VTRIM_ERR_BACKEND, "graph computation failed");
    }
    return 0;
}

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

// One decoder pass over a chunk: positions [n_past, n_past + n), text ids for the text positions and
// image rows for the image positions (is_image[i] tells which).
static int32_t run_chunk(struct vtrim_context * c, const int32_t * text_ids, int32_t n_text,
                         const float * image_rows, int32_t n_image, const bool * is_image, int32_t n) {
    const struct vtrim_model * m = c->model;
    struct ggml_cgraph * gf;
    struct ggml_context * gctx = vtrim_context_graph_begin(c, &gf);
    if (!gctx) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot create a graph context");
    }
    struct vtrim_llama_inputs in;
    struct ggml_tensor * embd = vtrim_llama_build_inp_embd(gctx, m, &in, n_text, n_image, n);
    struct ggml_tensor * logits = vtrim_llama_build_decoder(gctx, gf, m, &c->kv, embd, &in);
    int32_t rc = vtrim_context_graph_alloc(c, gf);
    if (rc == 0) {
        const int32_t n_past = c->kv.n[0], n_kv = n_past + n;
        if (in.text_ids) {
            ggml_backend_tensor_set(in.text_ids, text_ids, 0, ggml_nbytes(in.text_ids));
        }
        if (in.image_embd) {
            ggml_backend_tensor_set(in.image_embd, image_rows, 0, ggml_nbytes(in.image_embd));
        }
        int32_t * buf = malloc(sizeof(int32_t) * (size_t) n);
        float * mask = malloc(sizeof(float) * (size_t) n_kv * (size_t) n);
        if (!buf || !mask) {
            rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        } else {
            if (in.order) {
                int32_t t = 0, im = 0;
                for (int32_t i = 0; i < n; i++) {
                    buf[i] = is_image[i] ? n_text + im++ : t++;
                }
                ggml_backend_tensor_set(in.order, buf, 0, ggml_nbytes(in.order));
            }
            for (int32_t i = 0; i < n; i++) {
                buf[i] = c->n_past + i;
                for (int32_t j = 0; j < n_kv; j++) {
                    mask[(size_t) i * n_kv + j] = j <= n_past + i ? 0.0f : -INFINITY;
                }
            }
            ggml_backend_tensor_set(in.pos, buf, 0, ggml_nbytes(in.pos));
            ggml_backend_tensor_set(in.mask, mask, 0, ggml_nbytes(in.mask));
            rc = vtrim_context_graph_compute(c, gf);
        }
        free(buf);
        free(mask);
    }
    if (rc == 0) {
        ggml_backend_tensor_get(logits, c->logits, 0, ggml_nbytes(logits));
        for (int32_t il = 0; il < c->kv.n_layer; il++) {
            c->kv.n[il] += n;
        }
        c->n_past += n;
        c->has_logits = true;
    }
    ggml_free(gctx);
    return rc;
}

// Appends the expanded sequence chunk by chunk.
static int32_t run_sequence(struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens) {
    const struct vtrim_model * m = c->model;
    const int32_t n_img_tok = m->has_vision ? m->vision.n_image_tokens : 0;
    const int32_t n_embd = m->text.n_embd;
    const int32_t n_batch = c->params.n_batch;
    int32_t * text_ids = malloc(sizeof(int32_t) * (size_t) n_batch);
    bool * is_image = malloc(sizeof(bool) * (size_t) n_batch);
    int32_t rc = (text_ids && is_image) ? 0 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");

    int32_t ti = 0, sub = 0;   // current token, and row inside the current image
    int32_t image_row = 0;     // rows of c->img_embd consumed
    while (rc == 0 && ti < n_tokens) {
        int32_t n = 0, n_text = 0, n_image = 0;
        const int32_t first_row = image_row;
        while (n < n_batch && ti < n_tokens) {
            if (tokens[ti] == m->image_token_id && n_img_tok > 0) {
                is_image[n++] = true;
                n_image++;
                image_row++;
                if (++sub == n_img_tok) {
                    sub = 0;
                    ti++;
                }
            } else {
                is_image[n++] = false;
                text_ids[n_text++] = tokens[ti++];
            }
        }
        rc = run_chunk(c, text_ids, n_text, c->img_embd + (size_t) first_row * n_embd, n_image, is_image, n);
    }
    free(text_ids);
    free(is_image);
    return rc;
}

static void rollback(struct vtrim_context * c, int32_t n_past) {
    for (int32_t il = 0; il < c->kv.n_layer; il++) {
        c->kv.n[il] = n_past;
    }
    c->n_past = n_past;
    c->has_logits = false;
}

int32_t vtrim_prefill(struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens,
                      struct vtrim_image * const * images, int32_t n_images) {
    if (!c || (!tokens && n_tokens > 0) || n_tokens <= 0 || n_images < 0 || (n_images > 0 && !images)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_prefill: need a context, at least one token, and the images");
    }
    const struct vtrim_model * m = c->model;
    int32_t n_placeholders = 0;
    for (int32_t i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->text.n_vocab) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "token %d at position %d is outside the vocabulary (%d)",
                              tokens[i], i, m->text.n_vocab);
        }
        n_placeholders += tokens[i] == m->image_token_id;
    }
    if (n_images > 0 && !m->has_vision) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model has no vision tower; it takes no images");
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
    const int64_t n_expanded = n_tokens + (int64_t) n_images * (m->has_vision ? m->vision.n_image_tokens - 1 : 0);
    if (c->n_past + n_expanded > c->params.n_ctx) {
        return vtrim_fail(VTRIM_ERR_CONTEXT_FULL, "the prompt needs %lld positions (%d images of %d tokens) but only "
                          "%d of n_ctx=%d are free", (long long) n_expanded, n_images,
                          m->has_vision ? m->vision.n_image_tokens : 0, c->params.n_ctx - c->n_past, c->params.n_ctx);
    }
    const int32_t n_past_before = c->n_past;
    const int64_t t0 = ggml_time_us();
    int32_t rc = n_images > 0 ? encode_images(c, images, n_images) : 0;
    const int64_t t1 = ggml_time_us();
    if (rc == 0) {
        rc = run_sequence(c, tokens, n_tokens);
    }
    if (rc < 0) {
        rollback(c, n_past_before);
        return rc;
    }
    const int64_t t2 = ggml_time_us();
    memset(&c->stats, 0, sizeof c->stats);
    c->stats.n_prompt_tokens = (int32_t) n_expanded;
    c->stats.n_images = n_images;
    c->stats.n_image_tokens = n_images * (m->has_vision ? m->vision.n_image_tokens : 0);
    c->stats.n_image_tokens_kept = c->stats.n_image_tokens;
    c->stats.t_encode_ms = (t1 - t0) / 1000.0;
    c->stats.t_prefill_ms = (t2 - t1) / 1000.0;
    return 0;
}

int32_t vtrim_decode(struct vtrim_context * c, int32_t token) {
    if (!c) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_decode: ctx is NULL");
    }
    if (c->n_past == 0) {
        return vtrim_fail(VTRIM_ERR_STATE, "vtrim_decode before vtrim_prefill");
    }
    if (token < 0 || token >= c->model->text.n_vocab || token == c->model->image_token_id) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "cannot decode token %d", token);
    }
    if (c->n_past + 1 > c->params.n_ctx) {
        return vtrim_fail(VTRIM_ERR_CONTEXT_FULL, "the context is full (n_ctx=%d)", c->params.n_ctx);
    }
    const int32_t n_past_before = c->n_past;
    const int64_t t0 = ggml_time_us();
    const bool is_image = false;
    const int32_t rc = run_chunk(c, &token, 1, NULL, 0, &is_image, 1);
    if (rc < 0) {
        rollback(c, n_past_before);
        return rc;
    }
    c->stats.t_decode_ms += (ggml_time_us() - t0) / 1000.0;
    c->stats.n_decoded++;
    return 0;
}

int32_t vtrim_logits(const struct vtrim_context * c, float * logits, int32_t n_vocab) {
    if (!c || !logits) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_logits: ctx and logits are required");
    }
    if (n_vocab != c->model->text.n_vocab) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_logits: n_vocab is %d, the model has %d", n_vocab,
                          c->model->text.n_vocab);
    }
    if (!c->has_logits) {
        return vtrim_fail(VTRIM_ERR_STATE, "no logits yet: call vtrim_prefill first");
    }
    memcpy(logits, c->logits, sizeof(float) * (size_t) n_vocab);
    return 0;
}

int32_t vtrim_get_stats(const struct vtrim_context * c, struct vtrim_stats * out) {
    if (!c || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_get_stats: ctx and out are required");
    }
    *out = c->stats;
    out->n_past = c->n_past;
    out->kv_cache_bytes = vtrim_kv_cache_bytes_used(&c->kv);
    return 0;
}
