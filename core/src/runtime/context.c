// The context: KV cache, scheduler and buffers of one sequence; prefill (images + text) and decode.
#include "runtime/context.h"

#include "api/error.h"
#include "arch/arch.h"
#include "runtime/sampling.h"

#include "ggml-alloc.h"
#include "ggml-cpu.h"

#include <stdio.h>
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

static bool context_should_abort(void * data) {
    struct vtrim_context * c = data;
    return atomic_load(&c->abort_flag) || (c->abort_callback && c->abort_callback(c->abort_data));
}

void vtrim_context_set_abort_callback(struct vtrim_context * c, vtrim_abort_callback callback, void * data) {
    if (c) {
        c->abort_callback = callback;
        c->abort_data = data;
    }
}

void vtrim_context_abort(struct vtrim_context * c, bool abort) {
    if (c) {
        atomic_store(&c->abort_flag, abort);
    }
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
    atomic_init(&c->abort_flag, false);
    int32_t rc = 0;
    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (model->dev != cpu_dev) {
        c->backends[c->n_backends++] = ggml_backend_dev_init(model->dev, NULL);
    }
    for (int32_t d = 0; d < model->n_rpc; d++) {
        c->backends[c->n_backends++] = ggml_backend_dev_init(model->rpc_dev[d], NULL);
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
        ggml_backend_cpu_set_abort_callback(c->cpu, context_should_abort, c);
        c->sched = ggml_backend_sched_new(c->backends, NULL, c->n_backends, VTRIM_GRAPH_SIZE, false, true);
        if (!c->sched) {
            rc = vtrim_fail(VTRIM_ERR_BACKEND, "cannot create the ggml scheduler");
        }
    }
    if (rc == 0) {
        const struct vtrim_text_hparams * hp = &model->text;
        bool * skip = calloc((size_t) hp->n_layer, sizeof(bool));
        ggml_backend_buffer_type_t * layer_buft = calloc((size_t) hp->n_layer, sizeof *layer_buft);
        for (int il = 0; skip && layer_buft && il < hp->n_layer; il++) {
            skip[il] = model->layers[il].foreign;
            layer_buft[il] = ggml_backend_dev_buffer_type(vtrim_layer_device(model, il));
        }
        rc = skip && layer_buft ? vtrim_kv_cache_init(&c->kv, hp->n_layer, p.n_ctx, hp->head_dim, hp->n_head_kv,
                                                      p.kv_type == VTRIM_KV_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16,
                                                      ggml_backend_dev_buffer_type(model->dev),
                                                      model->n_rpc ? layer_buft : NULL, skip)
                                : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        free(skip);
        free(layer_buft);
    }
    if (rc == 0 && model->arch->context_init) {
        rc = model->arch->context_init(c);
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
    if (c->arch_state && c->model->arch->context_free) {
        c->model->arch->context_free(c);
    }
    vtrim_kv_cache_free(&c->kv);
    vtrim_policy_list_free(&c->policies);
    free(c->meta);
    free(c->logits);
    free(c->img.embd);
    free(c->img.n_rows);
    free(c->img.src);
    free(c->stages);
    free(c->kept_image_rows);
    free(c);
}

int32_t vtrim_context_reset(struct vtrim_context * c) {
    if (!c) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_context_reset: ctx is NULL");
    }
    vtrim_kv_cache_clear(&c->kv);
    if (c->model->arch->context_reset) {
        c->model->arch->context_reset(c);
    }
    c->n_past = 0;
    c->has_logits = false;
    c->n_stages = 0;
    c->n_kept_image_rows = 0;
    memset(&c->stats, 0, sizeof c->stats);
    return 0;
}

int32_t vtrim_context_truncate(struct vtrim_context * c, int32_t n_keep) {
    if (!c || n_keep < 0 || n_keep > c->n_past) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_context_truncate: n_keep %d is not in [0, n_past=%d]", n_keep,
                          c ? c->n_past : 0);
    }
    if (n_keep == 0) {
        return vtrim_context_reset(c);
    }
    const struct vtrim_arch * a = c->model->arch;
    if (c->model->has_vision && !a->image_rows_in_decoder) {
        const int32_t rc = a->truncate ? a->truncate(c, n_keep)
                         : vtrim_fail(VTRIM_ERR_UNSUPPORTED, "a %s context cannot be truncated: its images live "
                                      "outside the KV cache", a->name);
        if (rc < 0) {
            return rc;
        }
    }
    const int32_t rc = vtrim_kv_truncate(&c->kv, n_keep - 1);
    if (rc < 0) {
        return rc;
    }
    c->n_past = n_keep;
    c->has_logits = false;
    return 0;
}

int32_t vtrim_context_graph_new(struct vtrim_context * c, struct ggml_context ** gctx, struct ggml_cgraph ** gf) {
    struct ggml_init_params ip = { .mem_size = c->meta_size, .mem_buffer = c->meta, .no_alloc = true };
    *gctx = ggml_init(ip);
    *gf = *gctx ? ggml_new_graph_custom(*gctx, VTRIM_GRAPH_SIZE, false) : NULL;
    if (!*gf) {
        if (*gctx) {
            ggml_free(*gctx);
            *gctx = NULL;
        }
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot create a graph context");
    }
    return 0;
}

static void note_ops(struct vtrim_context * c, struct ggml_cgraph * gf) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
        const struct ggml_tensor * t = ggml_graph_node(gf, i);
        size_t slot = (size_t) t->op;
        if (t->op == GGML_OP_UNARY) {
            slot = GGML_OP_COUNT + (size_t) ggml_get_unary_op(t);
        } else if (t->op == GGML_OP_GLU) {
            slot = GGML_OP_COUNT + GGML_UNARY_OP_COUNT + (size_t) ggml_get_glu_op(t);
        }
        c->ops_seen[slot] = true;
    }
}

int32_t vtrim_context_graph_alloc(struct vtrim_context * c, struct ggml_cgraph * gf) {
    ggml_backend_sched_reset(c->sched);
    if (!ggml_backend_sched_alloc_graph(c->sched, gf)) {
        return vtrim_fail(VTRIM_ERR_BACKEND, "cannot allocate the compute graph");
    }
    return 0;
}

int32_t vtrim_context_graph_run(struct vtrim_context * c, struct ggml_cgraph * gf, const struct vtrim_tensor_io * in,
                                int n_in, const struct vtrim_tensor_io * out, int n_out) {
    const int32_t rc = vtrim_context_graph_alloc(c, gf);
    return rc < 0 ? rc : vtrim_context_graph_exec(c, gf, in, n_in, out, n_out);
}

int32_t vtrim_context_graph_exec(struct vtrim_context * c, struct ggml_cgraph * gf, const struct vtrim_tensor_io * in,
                                 int n_in, const struct vtrim_tensor_io * out, int n_out) {
    for (int i = 0; i < n_in; i++) {
        if (in[i].t && in[i].t->buffer) {   // an input no node reads gets no buffer
            ggml_backend_tensor_set(in[i].t, in[i].data, 0, ggml_nbytes(in[i].t));
            c->host_bytes_in += (int64_t) ggml_nbytes(in[i].t);
        }
    }
    note_ops(c, gf);
    if (context_should_abort(c)) {
        return vtrim_fail(VTRIM_ERR_ABORTED, "aborted");
    }
    const enum ggml_status st = ggml_backend_sched_graph_compute(c->sched, gf);
    if (st == GGML_STATUS_ABORTED || (st != GGML_STATUS_SUCCESS && context_should_abort(c))) {
        return vtrim_fail(VTRIM_ERR_ABORTED, "aborted");
    }
    if (st != GGML_STATUS_SUCCESS) {
        return vtrim_fail(VTRIM_ERR_BACKEND, "graph computation failed");
    }
    for (int i = 0; i < n_out; i++) {
        if (out[i].t) {
            ggml_backend_tensor_get(out[i].t, out[i].data, 0, ggml_nbytes(out[i].t));
            c->host_bytes_out += (int64_t) ggml_nbytes(out[i].t);
        }
    }
    return 0;
}

int32_t vtrim_context_reserve_images(struct vtrim_context * c, int32_t n_images, int32_t n_rows_max) {
    const size_t need = (size_t) n_images * (size_t) n_rows_max * (size_t) c->model->text.n_embd;
    if (need > c->img.cap) {
        float * p = realloc(c->img.embd, need * sizeof(float));
        if (!p) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for image embeddings");
        }
        c->img.embd = p;
        c->img.cap = need;
    }
    const size_t need_src = (size_t) n_images * (size_t) n_rows_max;
    if (need_src > c->img.src_cap) {
        int32_t * p = realloc(c->img.src, need_src * sizeof(int32_t));
        if (!p) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        }
        c->img.src = p;
        c->img.src_cap = need_src;
    }
    if (n_images > c->img.cap_images) {
        int32_t * p = realloc(c->img.n_rows, sizeof(int32_t) * (size_t) n_images);
        if (!p) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        }
        c->img.n_rows = p;
        c->img.cap_images = n_images;
    }
    c->img.n_images = 0;
    return 0;
}

int32_t vtrim_context_set_kept(struct vtrim_context * c, const int32_t * rows, int32_t n) {
    int32_t * p = realloc(c->kept_image_rows, sizeof(int32_t) * (size_t) (n > 0 ? n : 1));
    if (!p) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    c->kept_image_rows = p;
    if (n > 0) {
        memcpy(p, rows, sizeof(int32_t) * (size_t) n);
    }
    c->n_kept_image_rows = n;
    return 0;
}

static int compare_names(const void * a, const void * b) {
    return strcmp(*(const char * const *) a, *(const char * const *) b);
}

int32_t vtrim_graph_ops(const struct vtrim_context * c, char * text, int32_t n_max, int32_t * n_out) {
    if (!c || !n_out || (n_max > 0 && !text) || n_max < 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_graph_ops: ctx, n_out and a text buffer are required");
    }
    enum { N = GGML_OP_COUNT + GGML_UNARY_OP_COUNT + GGML_GLU_OP_COUNT };
    char names[N][64];
    const char * sorted[N];
    int n = 0;
    for (int slot = 0; slot < N; slot++) {
        if (!c->ops_seen[slot]) {
            continue;
        }
        if (slot < GGML_OP_COUNT) {
            snprintf(names[n], sizeof names[n], "GGML_OP_%s", ggml_op_name((enum ggml_op) slot));
        } else if (slot < GGML_OP_COUNT + GGML_UNARY_OP_COUNT) {
            snprintf(names[n], sizeof names[n], "GGML_UNARY_OP_%s",
                     ggml_unary_op_name((enum ggml_unary_op) (slot - GGML_OP_COUNT)));
        } else {
            snprintf(names[n], sizeof names[n], "GGML_GLU_OP_%s",
                     ggml_glu_op_name((enum ggml_glu_op) (slot - GGML_OP_COUNT - GGML_UNARY_OP_COUNT)));
        }
        sorted[n] = names[n];
        n++;
    }
    qsort(sorted, (size_t) n, sizeof sorted[0], compare_names);
    int32_t len = 0;
    for (int i = 0; i < n; i++) {
        const int32_t l = (int32_t) strlen(sorted[i]) + (i > 0);
        if (text && len + l < n_max) {
            snprintf(text + len, (size_t) (n_max - len), "%s%s", i > 0 ? "," : "", sorted[i]);
        }
        len += l;
    }
    *n_out = len;
    if (len >= n_max) {
        if (n_max > 0) {
            text[0] = '\0';
        }
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_graph_ops: %d bytes needed, %d given", len + 1, n_max);
    }
    text[len] = '\0';
    return 0;
}

int32_t vtrim_context_vocab_size(const struct vtrim_context * c) { return c->model->text.n_vocab; }

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
    out->n_stages = c->n_stages;
    out->kv_cache_bytes = vtrim_kv_cache_bytes_used(&c->kv) + (c->model->arch->cache_bytes ? c->model->arch->cache_bytes(c) : 0);
    return 0;
}
