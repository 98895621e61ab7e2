// Model loading: GGUF files -> hyperparameters, vocabulary and weights in one backend buffer.
#include "model/model.h"

#include "arch/arch.h"
#include "api/error.h"
#include "model/gguf_open.h"
#include "model/gguf_util.h"
#include "runtime/image_cache.h"
#include "vocab/vocab.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "gguf.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define MAX_FILES VTRIM_MAX_WEIGHT_FILES

// Decode streams every weight once per token, so TLB misses cost bandwidth. llama.cpp's memory-mapped weights
// sit in the page cache, which the kernel backs with huge pages; our heap copy gets them only when asked
// (transparent_hugepage=madvise is the common default). Asked before the pages are first touched.
static void advise_huge_pages(ggml_backend_buffer_t buf) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = 2u << 20;
    const uintptr_t base = (uintptr_t) ggml_backend_buffer_get_base(buf);
    const uintptr_t begin = (base + huge - 1) & ~(huge - 1);
    const uintptr_t end = (base + ggml_backend_buffer_get_size(buf)) & ~(huge - 1);
    if (end > begin) {
        (void) madvise((void *) begin, end - begin, MADV_HUGEPAGE);   // advice only: failure changes nothing
    }
#else
    (void) buf;
#endif
}

struct weight_file {
    const char *          path;
    struct gguf_context * gguf;
    int64_t               size;
};

static int32_t open_gguf(const char * path, struct weight_file * f) {
    FILE * fp = fopen(path, "rb");
    if (!fp) {
        return vtrim_fail(VTRIM_ERR_IO, "cannot open '%s'", path);
    }
    char magic[4] = {0};
    const size_t got = fread(magic, 1, 4, fp);
    fseek(fp, 0, SEEK_END);
    f->size = (int64_t) ftell(fp);
    fclose(fp);
    if (got != 4 || memcmp(magic, "GGUF", 4) != 0) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "'%s' is not a GGUF file (bad magic)", path);
    }
    char why[256];
    f->gguf = vtrim_gguf_open(path, why, sizeof why);
    if (!f->gguf) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "'%s' is not a valid GGUF file: %s", path,
                          why[0] ? why : "truncated or corrupt header");
    }
    f->path = path;
    // Tensor data must lie inside the file: a truncated download fails here, not in the middle of a read.
    const int64_t n = gguf_get_n_tensors(f->gguf);
    const size_t base = gguf_get_data_offset(f->gguf);
    for (int64_t i = 0; i < n; i++) {
        const size_t end = base + gguf_get_tensor_offset(f->gguf, i) + gguf_get_tensor_size(f->gguf, i);
        if ((int64_t) end > f->size) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "'%s' is truncated: tensor '%s' ends at byte %zu of %lld", path,
                              gguf_get_tensor_name(f->gguf, i), end, (long long) f->size);
        }
    }
    return 0;
}

// The weights of the decoder layers that go to RPC servers, in one buffer per server device; the rest stay
// unallocated for the local buffer.
static int32_t place_rpc_layers(struct vtrim_model * m) {
    if (m->n_rpc == 0) {
        return 0;
    }
    int64_t n_all = 0;
    for (struct ggml_tensor * t = ggml_get_first_tensor(m->ctx_w); t; t = ggml_get_next_tensor(m->ctx_w, t)) {
        n_all++;
    }
    struct ggml_tensor ** list = malloc(sizeof *list * (size_t) (n_all > 0 ? n_all : 1));
    if (!list) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    int32_t rc = 0;
    for (int32_t d = 0; d < m->n_rpc && rc == 0; d++) {
        int64_t n = 0;
        for (struct ggml_tensor * t = ggml_get_first_tensor(m->ctx_w); t; t = ggml_get_next_tensor(m->ctx_w, t)) {
            const int32_t il = vtrim_tensor_layer(ggml_get_name(t));
            if (il >= 0 && vtrim_layer_device(m, il) == m->rpc_dev[d]) {
                list[n++] = t;
                m->n_bytes_rpc += (int64_t) ggml_nbytes(t);
            }
        }
        char what[96];
        snprintf(what, sizeof what, "the weights for %s", ggml_backend_dev_description(m->rpc_dev[d]));
        rc = vtrim_alloc_tensors(ggml_backend_dev_buffer_type(m->rpc_dev[d]), list, n, what, &m->rpc_buf[d]);
        if (rc == 0 && m->rpc_buf[d]) {
            ggml_backend_buffer_set_usage(m->rpc_buf[d], GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        }
    }
    free(list);
    return rc;
}

// Each file mapped, and its tensors not placed elsewhere (on RPC servers) pointed into the mapping.
static int32_t map_weights(struct vtrim_model * m, const struct weight_file * files, int n_files) {
    for (int i = 0; i < n_files; i++) {
        const struct gguf_context * g = files[i].gguf;
        int32_t rc = vtrim_map_file(files[i].path, &m->map[i]);
        if (rc < 0) {
            return rc;
        }
        const size_t base = gguf_get_data_offset(g);
        if (base >= m->map[i].size) {
            continue;   // no tensor data (a vocabulary file)
        }
        char * data = (char *) m->map[i].addr + base;
        m->map_buf[i] = ggml_backend_cpu_buffer_from_ptr(data, m->map[i].size - base);
        if (!m->map_buf[i]) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot wrap the mapping of '%s'", files[i].path);
        }
        ggml_backend_buffer_set_usage(m->map_buf[i], GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        for (int64_t t = 0; t < gguf_get_n_tensors(g); t++) {
            struct ggml_tensor * w = ggml_get_tensor(m->ctx_w, gguf_get_tensor_name(g, t));
            if (w->buffer) {
                continue;   // on an RPC server
            }
            const enum ggml_status st = ggml_backend_tensor_alloc(m->map_buf[i], w, data + gguf_get_tensor_offset(g, t));
            if (st != GGML_STATUS_SUCCESS) {
                return vtrim_fail(VTRIM_ERR_FORMAT, "tensor '%s' does not lie in '%s'", ggml_get_name(w),
                                  files[i].path);
            }
            m->n_bytes_mapped += (int64_t) ggml_nbytes(w);
        }
    }
    return 0;
}

// Creates every tensor of every file in one no_alloc context, allocates them on the device, reads the data.
static int32_t load_weights(struct vtrim_model * m, struct weight_file * files, int n_files, bool use_mmap) {
    size_t n_tensors = 0;
    for (int i = 0; i < n_files; i++) {
        n_tensors += (size_t) gguf_get_n_tensors(files[i].gguf);
    }
    struct ggml_init_params ip = { .mem_size = (n_tensors + 1) * ggml_tensor_overhead(), .mem_buffer = NULL,
                                   .no_alloc = true };
    m->ctx_w = ggml_init(ip);
    if (!m->ctx_w) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot allocate the weight context");
    }
    for (int i = 0; i < n_files; i++) {
        const struct gguf_context * g = files[i].gguf;
        for (int64_t t = 0; t < gguf_get_n_tensors(g); t++) {
            const char * name = gguf_get_tensor_name(g, t);
            if (ggml_get_tensor(m->ctx_w, name)) {
                return vtrim_fail(VTRIM_ERR_FORMAT, "tensor '%s' appears twice", name);
            }
            const int64_t * ne = gguf_get_tensor_ne(g, t);
            struct ggml_tensor * w = ggml_new_tensor(m->ctx_w, gguf_get_tensor_type(g, t), GGML_MAX_DIMS, ne);
            ggml_set_name(w, name);
            m->n_params += ggml_nelements(w);
            m->n_bytes += (int64_t) ggml_nbytes(w);
        }
    }
    if (n_tensors == 0) {
        return 0;
    }
    int32_t rc = place_rpc_layers(m);
    // the CPU computes on host memory: it can read the mapping itself; a GPU gets a copy (read from the file)
    const bool map = use_mmap && ggml_backend_dev_type(m->dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
    if (rc == 0 && map) {
        rc = map_weights(m, files, n_files);
    }
    if (rc < 0) {
        return rc;
    }
    if (!map) {
        m->buf_w = ggml_backend_alloc_ctx_tensors_from_buft(m->ctx_w, ggml_backend_dev_buffer_type(m->dev));
        if (!m->buf_w) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of weights on %s",
                              m->n_bytes / 1048576.0, ggml_backend_dev_name(m->dev));
        }
        ggml_backend_buffer_set_usage(m->buf_w, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        if (ggml_backend_buffer_is_host(m->buf_w)) {
            advise_huge_pages(m->buf_w);
        }
    }
    void * staging = NULL;
    size_t staging_size = 0;
    for (int i = 0; i < n_files && rc == 0; i++) {
        const struct gguf_context * g = files[i].gguf;
        FILE * fp = fopen(files[i].path, "rb");
        if (!fp) {
            rc = vtrim_fail(VTRIM_ERR_IO, "cannot open '%s'", files[i].path);
            break;
        }
        const size_t base = gguf_get_data_offset(g);
        for (int64_t t = 0; t < gguf_get_n_tensors(g) && rc == 0; t++) {
            struct ggml_tensor * w = ggml_get_tensor(m->ctx_w, gguf_get_tensor_name(g, t));
            const size_t nb = ggml_nbytes(w);
            if (m->map_buf[i] && w->buffer == m->map_buf[i]) {
                continue;   // its data is the mapping
            }
            if (m->map_buf[i]) {   // an RPC server's tensor: sent from the mapping, not read again
                ggml_backend_tensor_set(w, (const char *) m->map[i].addr + base + gguf_get_tensor_offset(g, t), 0, nb);
                continue;
            }
            const bool host = ggml_backend_buffer_is_host(w->buffer);
            void * dst = w->data;
            if (!host) {
                if (nb > staging_size) {
                    free(staging);
                    staging = malloc(nb);
                    staging_size = staging ? nb : 0;
                }
                dst = staging;
            }
            if (!dst) {
                rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory reading '%s'", ggml_get_name(w));
            } else if (fseek(fp, (long) (base + gguf_get_tensor_offset(g, t)), SEEK_SET) != 0 ||
                       fread(dst, 1, nb, fp) != nb) {
                rc = vtrim_fail(VTRIM_ERR_IO, "cannot read tensor '%s' from '%s'", ggml_get_name(w), files[i].path);
            } else if (!host) {
                ggml_backend_tensor_set(w, dst, 0, nb);
            }
        }
        fclose(fp);
    }
    free(staging);
    return rc;
}

void vtrim_model_params_default(struct vtrim_model_params * p) {
    if (!p) {
        return;
    }
    memset(p, 0, sizeof *p);
    p->device = VTRIM_DEVICE_AUTO;
    p->n_threads = 0;
    p->vocab_only = false;
    p->use_mmap = true;
    p->image_cache_bytes = (int64_t) 256 << 20;
    p->vision_attn = VTRIM_VISION_ATTN_AUTO;
}

static int32_t load(struct vtrim_model * m, const char * path, const char * mmproj,
                    const struct vtrim_model_params * p, struct weight_file * files, int * n_files) {
    int32_t rc = open_gguf(path, &files[(*n_files)++]);
    if (rc < 0) {
        return rc;
    }
    if (mmproj && mmproj[0]) {
        rc = open_gguf(mmproj, &files[(*n_files)++]);
        if (rc < 0) {
            return rc;
        }
    }
    // The architecture first: an unknown one is the clearer message than whatever key it lacks.
    const struct vtrim_arch * arch = &vtrim_arch_llama;
    if (!p->vocab_only && (rc = vtrim_arch_detect(files[0].gguf, *n_files > 1 ? files[1].gguf : NULL, &arch)) < 0) {
        return rc;
    }
    if ((rc = vtrim_vocab_load(files[0].gguf, &m->vocab)) < 0) {
        return rc;
    }
    m->arch = arch;
    vtrim_gguf_str(files[0].gguf, "general.name", m->name, sizeof m->name, false);
    if (p->vocab_only) {
        m->image_token_id = -1;
        m->chat = vtrim_arch_chat_template("llava-1.5");
        m->text.n_vocab = vtrim_vocab_n_tokens(m->vocab);
        return 0;
    }
    if ((rc = arch->read_hparams(m, files[0].gguf, *n_files > 1 ? files[1].gguf : NULL)) < 0) {
        return rc;
    }
    if (p->vision_attn < VTRIM_VISION_ATTN_AUTO || p->vision_attn > VTRIM_VISION_ATTN_CHUNKED) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vision_attn %d is not one of enum vtrim_vision_attn", p->vision_attn);
    }
    m->dev = vtrim_pick_device(p->device, &rc);
    m->vision_attn = (struct vtrim_attn_plan) {
        p->vision_attn, m->dev && ggml_backend_dev_type(m->dev) == GGML_BACKEND_DEVICE_TYPE_CPU };
    if (rc < 0 || (rc = vtrim_rpc_connect(m, p->rpc_servers)) < 0) {
        return rc;
    }
    if ((rc = load_weights(m, files, *n_files, p->use_mmap)) < 0) {
        return rc;
    }
    if (m->has_vision) {
        m->image_cache = vtrim_image_cache_new(p->image_cache_bytes, &rc);
        if (rc < 0) {
            return rc;
        }
    }
    return arch->bind_tensors(m);
}

int32_t vtrim_model_load(const char * path, const char * mmproj, const struct vtrim_model_params * params,
                         struct vtrim_model ** out) {
    if (!path || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_model_load: path and out are required");
    }
    *out = NULL;
    struct vtrim_model_params p;
    vtrim_model_params_default(&p);
    if (params) {
        p = *params;
    }
    struct vtrim_model * m = calloc(1, sizeof *m);
    if (!m) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    struct weight_file files[MAX_FILES] = {0};
    int n_files = 0;
    const int32_t rc = load(m, path, mmproj, &p, files, &n_files);
    for (int i = 0; i < n_files; i++) {
        if (files[i].gguf) {
            gguf_free(files[i].gguf);
        }
    }
    if (rc < 0) {
        if (mmproj && mmproj[0]) {
            vtrim_fail_prefix(rc, "loading '%s' with mmproj '%s': ", path, mmproj);
        } else {
            vtrim_fail_prefix(rc, "loading '%s': ", path);
        }
        vtrim_model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

void vtrim_model_free(struct vtrim_model * m) {
    if (!m) {
        return;
    }
    if (m->arch && m->arch->model_free) {
        m->arch->model_free(m);
    }
    if (m->buf_w) {
        ggml_backend_buffer_free(m->buf_w);
    }
    for (int32_t d = 0; d < m->n_rpc; d++) {
        if (m->rpc_buf[d]) {
            ggml_backend_buffer_free(m->rpc_buf[d]);
        }
    }
    vtrim_image_cache_free(m->image_cache);
    for (int i = 0; i < VTRIM_MAX_WEIGHT_FILES; i++) {
        if (m->map_buf[i]) {
            ggml_backend_buffer_free(m->map_buf[i]);
        }
        vtrim_unmap(&m->map[i]);
    }
    if (m->ctx_w) {
        ggml_free(m->ctx_w);
    }
    vtrim_vocab_free(m->vocab);
    free(m->layers);
    free(m);
}
