// vtrim_quantize: a GGUF's weight matrices re-encoded with ggml's own quantizers (ggml_quantize_chunk), one
// tensor at a time (the input is read, never held whole), rows shared out over threads. The types of the
// text tower follow llama.cpp's llama-quant.cpp for these file types (the rules, not its code):
//   q8_0, q6_K, q4_0: every matrix of the type, but output.weight, which is Q6_K below Q8_0;
//   q5_K_M / q4_K_M: Q5_K / Q4_K, with attn_v.weight and ffn_down.weight in Q6_K for the layers llama.cpp's
//   use_more_bits picks (the first and last eighth, and every third in between), output.weight in Q6_K.
// A row length that is not a whole number of blocks falls back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1,
// Q6_K -> Q8_0, then F16). The vision tower and projector ("v.*", "mm.*") take their own type; norms, biases,
// gates and the vision tower's embeddings (patch, position, tile) are copied as they are.
#include "quant/quantize.h"

#include "api/error.h"

#include "ggml.h"
#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if !defined(_WIN32)
#include <pthread.h>
#include <unistd.h>
#endif

#define LLAMA_FTYPE_MOSTLY_Q4_0   2
#define LLAMA_FTYPE_MOSTLY_Q8_0   7
#define LLAMA_FTYPE_MOSTLY_Q4_K_M 15
#define LLAMA_FTYPE_MOSTLY_Q5_K_M 17
#define LLAMA_FTYPE_MOSTLY_Q6_K   18
#define LLAMA_FTYPE_MOSTLY_F16    1
#define LLAMA_FTYPE_MOSTLY_BF16   32

static bool more_bits(int32_t i, int32_t n) {
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

static bool ends_with(const char * s, const char * tail) {
    const size_t a = strlen(s), b = strlen(tail);
    return a >= b && strcmp(s + a - b, tail) == 0;
}

static enum ggml_type base_type(int32_t t) {
    switch (t) {
        case VTRIM_QUANT_Q8_0:   return GGML_TYPE_Q8_0;
        case VTRIM_QUANT_Q6_K:   return GGML_TYPE_Q6_K;
        case VTRIM_QUANT_Q5_K_M: return GGML_TYPE_Q5_K;
        case VTRIM_QUANT_Q4_K_M: return GGML_TYPE_Q4_K;
        case VTRIM_QUANT_Q4_0:   return GGML_TYPE_Q4_0;
        case VTRIM_QUANT_F16:    return GGML_TYPE_F16;
        case VTRIM_QUANT_BF16:   return GGML_TYPE_BF16;
        default:                 return GGML_TYPE_COUNT;
    }
}

static int32_t file_type(int32_t t) {
    switch (t) {
        case VTRIM_QUANT_Q8_0:   return LLAMA_FTYPE_MOSTLY_Q8_0;
        case VTRIM_QUANT_Q6_K:   return LLAMA_FTYPE_MOSTLY_Q6_K;
        case VTRIM_QUANT_Q5_K_M: return LLAMA_FTYPE_MOSTLY_Q5_K_M;
        case VTRIM_QUANT_Q4_K_M: return LLAMA_FTYPE_MOSTLY_Q4_K_M;
        case VTRIM_QUANT_Q4_0:   return LLAMA_FTYPE_MOSTLY_Q4_0;
        case VTRIM_QUANT_BF16:   return LLAMA_FTYPE_MOSTLY_BF16;
        default:                 return LLAMA_FTYPE_MOSTLY_F16;
    }
}

static enum ggml_type fallback(enum ggml_type t, int64_t ncols, bool * fell_back) {
    if (ncols % ggml_blck_size(t) == 0) {
        return t;
    }
    *fell_back = true;
    switch (t) {
        case GGML_TYPE_Q4_K: t = GGML_TYPE_Q5_0; break;
        case GGML_TYPE_Q5_K: t = GGML_TYPE_Q5_1; break;
        case GGML_TYPE_Q6_K: t = GGML_TYPE_Q8_0; break;
        default: break;
    }
    return ncols % ggml_blck_size(t) == 0 ? t : GGML_TYPE_F16;
}

// What a tensor becomes: its own type (copied) when it is not a weight matrix.
static enum ggml_type target_type(const struct vtrim_quantize_params * p, const char * name, const int64_t * ne,
                                  int n_dims, enum ggml_type src, int32_t i_attn_v, int32_t n_attn_v,
                                  int32_t i_ffn_down, int32_t n_ffn_down, bool * fell_back) {
    const bool matrix = n_dims == 2 && ends_with(name, ".weight") &&
                        (src == GGML_TYPE_F32 || src == GGML_TYPE_F16 || src == GGML_TYPE_BF16);
    const bool vision = strncmp(name, "v.", 2) == 0 || strncmp(name, "mm.", 3) == 0;
    if (!matrix || (vision && strstr(name, "embd"))) {
        return src;
    }
    const int32_t text = p->type;
    enum ggml_type t;
    if (vision) {
        t = base_type(p->vision_type == VTRIM_QUANT_SAME ? text : p->vision_type);
    } else if (strcmp(name, "output.weight") == 0) {
        const enum ggml_type b = base_type(text);
        t = b == GGML_TYPE_Q8_0 || b == GGML_TYPE_F16 || b == GGML_TYPE_BF16 ? b : GGML_TYPE_Q6_K;
        if (ne[0] % ggml_blck_size(t) != 0) {
            t = GGML_TYPE_Q8_0;
        }
    } else if ((text == VTRIM_QUANT_Q4_K_M || text == VTRIM_QUANT_Q5_K_M) &&
               ((ends_with(name, ".attn_v.weight") && more_bits(i_attn_v, n_attn_v)) ||
                (ends_with(name, ".ffn_down.weight") && more_bits(i_ffn_down, n_ffn_down)))) {
        t = GGML_TYPE_Q6_K;
    } else {
        t = base_type(text);
    }
    return fallback(t, ne[0], fell_back);
}

struct rows_job {
    enum ggml_type type;
    const float *  src;
    void *         dst;
    int64_t        row0, n_rows, n_per_row;
};

static void * quantize_rows(void * arg) {
    struct rows_job * j = arg;
    ggml_quantize_chunk(j->type, j->src, j->dst, j->row0 * j->n_per_row, j->n_rows, j->n_per_row, NULL);
    return NULL;
}

static void quantize_threaded(enum ggml_type type, const float * src, void * dst, int64_t n_rows, int64_t n_per_row,
                              int n_threads) {
    if (n_threads > n_rows) {
        n_threads = (int) n_rows;
    }
    struct rows_job jobs[64];
    n_threads = n_threads < 1 ? 1 : n_threads > 64 ? 64 : n_threads;
    for (int i = 0; i < n_threads; i++) {
        const int64_t a = n_rows * i / n_threads, b = n_rows * (i + 1) / n_threads;
        jobs[i] = (struct rows_job) { type, src, dst, a, b - a, n_per_row };
    }
#if !defined(_WIN32)
    pthread_t th[64];
    int started = 0;
    for (int i = 1; i < n_threads; i++) {
        if (pthread_create(&th[i], NULL, quantize_rows, &jobs[i]) != 0) {
            break;
        }
        started = i;
    }
    quantize_rows(&jobs[0]);
    for (int i = started + 1; i < n_threads; i++) {
        quantize_rows(&jobs[i]);   // a thread that could not start: its rows here
    }
    for (int i = 1; i <= started; i++) {
        pthread_join(th[i], NULL);
    }
#else
    for (int i = 0; i < n_threads; i++) {
        quantize_rows(&jobs[i]);
    }
#endif
}

static int default_threads(void) {
#if !defined(_WIN32)
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int) n : 1;
#else
    return 1;
#endif
}

void vtrim_quantize_params_default(struct vtrim_quantize_params * p) {
    if (!p) {
        return;
    }
    memset(p, 0, sizeof *p);
    p->type = VTRIM_QUANT_Q4_K_M;
    p->vision_type = VTRIM_QUANT_Q8_0;
    p->n_threads = 0;
}

struct job {
    FILE *                in, * out;
    struct gguf_context * src, * dst;
    struct ggml_context * meta;
    float *               f32;
    void *                buf;
    size_t                cap_f32, cap_buf;
};

static void job_free(struct job * j) {
    if (j->in) fclose(j->in);
    if (j->out) fclose(j->out);
    if (j->src) gguf_free(j->src);
    if (j->dst) gguf_free(j->dst);
    if (j->meta) ggml_free(j->meta);
    free(j->f32);
    free(j->buf);
}

static int32_t grow(void ** p, size_t * cap, size_t need) {
    if (need <= *cap) {
        return 0;
    }
    void * q = realloc(*p, need);
    if (!q) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "quantize: out of memory (%.1f MiB)", need / 1048576.0);
    }
    *p = q;
    *cap = need;
    return 0;
}

// Tensor t's bytes as stored, in j->buf.
static int32_t read_raw(struct job * j, int64_t t, const struct ggml_tensor * w, const char * path) {
    const size_t nb = ggml_nbytes(w);
    const int32_t rc = grow(&j->buf, &j->cap_buf, nb);
    if (rc < 0) {
        return rc;
    }
    const size_t off = gguf_get_data_offset(j->src) + gguf_get_tensor_offset(j->src, t);
    if (fseek(j->in, (long) off, SEEK_SET) != 0 || fread(j->buf, 1, nb, j->in) != nb) {
        return vtrim_fail(VTRIM_ERR_IO, "quantize: cannot read tensor '%s' from '%s'", ggml_get_name(w), path);
    }
    return 0;
}

// Tensor t of the input, as f32 rows in j->f32.
static int32_t read_f32(struct job * j, int64_t t, const struct ggml_tensor * w, const char * path) {
    const int64_t n = ggml_nelements(w);
    int32_t rc = grow((void **) &j->f32, &j->cap_f32, sizeof(float) * (size_t) n);
    if (rc == 0) {
        rc = read_raw(j, t, w, path);
    }
    if (rc < 0) {
        return rc;
    }
    if (w->type == GGML_TYPE_F16) {
        ggml_fp16_to_fp32_row(j->buf, j->f32, n);
    } else if (w->type == GGML_TYPE_BF16) {
        ggml_bf16_to_fp32_row(j->buf, j->f32, n);
    } else {
        memcpy(j->f32, j->buf, ggml_nbytes(w));
    }
    return 0;
}

static int32_t run(struct job * j, const char * in_path, const char * out_path, const struct vtrim_quantize_params * p,
                   struct vtrim_quantize_report * r) {
    struct gguf_init_params gp = { .no_alloc = true, .ctx = &j->meta };
    j->src = gguf_init_from_file(in_path, gp);
    if (!j->src) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "quantize: '%s' is not a readable GGUF file", in_path);
    }
    const int64_t n = gguf_get_n_tensors(j->src);
    int32_t n_attn_v = 0, n_ffn_down = 0;
    for (int64_t t = 0; t < n; t++) {
        const char * name = gguf_get_tensor_name(j->src, t);
        const enum ggml_type type = gguf_get_tensor_type(j->src, t);
        if (type != GGML_TYPE_F32 && type != GGML_TYPE_F16 && type != GGML_TYPE_BF16) {
            return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "quantize: '%s' is already quantized ('%s' is %s); quantize "
                              "from the f32/f16/bf16 file: quantizing twice compounds the rounding", in_path, name,
                              ggml_type_name(type));
        }
        if (strncmp(name, "blk.", 4) == 0) {
            n_attn_v += ends_with(name, ".attn_v.weight");
            n_ffn_down += ends_with(name, ".ffn_down.weight");
        }
    }
    j->in = fopen(in_path, "rb");
    j->dst = gguf_init_empty();
    if (!j->in || !j->dst) {
        return vtrim_fail(VTRIM_ERR_IO, "quantize: cannot open '%s'", in_path);
    }
    gguf_set_kv(j->dst, j->src);
    const int64_t align_key = gguf_find_key(j->dst, "general.alignment");
    if (align_key >= 0) {
        gguf_remove_key(j->dst, "general.alignment");   // the output is written with the default alignment
    }
    gguf_set_val_u32(j->dst, "general.file_type", (uint32_t) file_type(p->type));
    gguf_set_val_u32(j->dst, "general.quantization_version", GGML_QNT_VERSION);

    enum ggml_type * types = malloc(sizeof *types * (size_t) (n > 0 ? n : 1));
    if (!types) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "quantize: out of memory");
    }
    int32_t i_attn_v = 0, i_ffn_down = 0;
    for (int64_t t = 0; t < n; t++) {
        const char * name = gguf_get_tensor_name(j->src, t);
        struct ggml_tensor * w = ggml_get_tensor(j->meta, name);
        const bool is_v = strncmp(name, "blk.", 4) == 0 && ends_with(name, ".attn_v.weight");
        const bool is_down = strncmp(name, "blk.", 4) == 0 && ends_with(name, ".ffn_down.weight");
        bool fell_back = false;
        types[t] = target_type(p, name, w->ne, ggml_n_dims(w), w->type, i_attn_v, n_attn_v, i_ffn_down, n_ffn_down,
                               &fell_back);
        i_attn_v += is_v;
        i_ffn_down += is_down;
        struct ggml_tensor copy = *w;   // the output's shape and name with the new type (and strides for it)
        copy.type = types[t];
        copy.nb[0] = ggml_type_size(copy.type);
        copy.nb[1] = copy.nb[0] * (copy.ne[0] / ggml_blck_size(copy.type));
        for (int d = 2; d < GGML_MAX_DIMS; d++) {
            copy.nb[d] = copy.nb[d - 1] * copy.ne[d - 1];
        }
        copy.data = NULL;
        gguf_add_tensor(j->dst, &copy);
        r->n_tensors++;
        r->n_quantized += types[t] != w->type;
        r->n_fallback += fell_back;
    }

    j->out = fopen(out_path, "wb");
    if (!j->out) {
        free(types);
        return vtrim_fail(VTRIM_ERR_IO, "quantize: cannot create '%s'", out_path);
    }
    const size_t meta = gguf_get_meta_size(j->dst);
    int32_t rc = grow(&j->buf, &j->cap_buf, meta);
    if (rc == 0) {
        gguf_get_meta_data(j->dst, j->buf);
        rc = fwrite(j->buf, 1, meta, j->out) == meta ? 0 : vtrim_fail(VTRIM_ERR_IO, "quantize: cannot write '%s'",
                                                                      out_path);
    }
    const size_t align = gguf_get_alignment(j->dst);
    const int n_threads = p->n_threads > 0 ? p->n_threads : default_threads();
    void * qbuf = NULL;
    size_t qcap = 0;
    static const char zeros[64] = {0};
    for (int64_t t = 0; t < n && rc == 0; t++) {
        const char * name = gguf_get_tensor_name(j->src, t);
        const struct ggml_tensor * w = ggml_get_tensor(j->meta, name);
        const void * data = NULL;
        size_t size = 0;
        r->bytes_in += (int64_t) ggml_nbytes(w);
        if (types[t] == w->type) {   // copied unchanged
            size = ggml_nbytes(w);
            rc = read_raw(j, t, w, in_path);
            data = j->buf;
        } else {
            rc = read_f32(j, t, w, in_path);
            const int64_t n_per_row = w->ne[0], n_rows = ggml_nelements(w) / n_per_row;
            size = ggml_row_size(types[t], n_per_row) * (size_t) n_rows;
            if (rc == 0) {
                rc = grow(&qbuf, &qcap, size);
            }
            if (rc == 0) {
                if (types[t] == GGML_TYPE_F16) {
                    ggml_fp32_to_fp16_row(j->f32, qbuf, ggml_nelements(w));
                } else if (types[t] == GGML_TYPE_BF16) {
                    ggml_fp32_to_bf16_row(j->f32, qbuf, ggml_nelements(w));
                } else {
                    quantize_threaded(types[t], j->f32, qbuf, n_rows, n_per_row, n_threads);
                }
                data = qbuf;
            }
        }
        if (rc == 0) {
            const size_t pad = GGML_PAD(size, align) - size;
            if (fwrite(data, 1, size, j->out) != size || (pad && fwrite(zeros, 1, pad, j->out) != pad)) {
                rc = vtrim_fail(VTRIM_ERR_IO, "quantize: cannot write '%s' (disk full?)", out_path);
            }
            r->bytes_out += (int64_t) size;
        }
    }
    free(qbuf);
    free(types);
    return rc;
}

int32_t vtrim_quantize(const char * in, const char * out, const struct vtrim_quantize_params * params,
                       struct vtrim_quantize_report * report) {
    if (!in || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_quantize: in and out are required");
    }
    struct vtrim_quantize_params p;
    vtrim_quantize_params_default(&p);
    if (params) {
        p = *params;
    }
    if (base_type(p.type) == GGML_TYPE_COUNT || p.type == VTRIM_QUANT_F16 ||
        (p.vision_type != VTRIM_QUANT_SAME && base_type(p.vision_type) == GGML_TYPE_COUNT)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_quantize: unknown type %d or vision type %d", p.type,
                          p.vision_type);
    }
    if (strcmp(in, out) == 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_quantize: the output would overwrite the input '%s'", in);
    }
    struct vtrim_quantize_report r = {0};
    struct job j = {0};
    const int32_t rc = run(&j, in, out, &p, &r);
    job_free(&j);
    if (rc < 0) {
        remove(out);   // no half-written file under the output's name
        return rc;
    }
    if (report) {
        *report = r;
    }
    return 0;
}
