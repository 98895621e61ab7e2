/*
 * vtrim.h - the pyvtrim runtime: vision-language models on ggml, with visual-token reduction.
 *
 * A worked example (error checks shortened; every call returns 0 or a negative VTRIM_ERR_*,
 * and vtrim_last_error() then says why):
 *
 *     struct vtrim_model_params mp;   vtrim_model_params_default(&mp);
 *     struct vtrim_model * model;     vtrim_model_load("llava.gguf", NULL, &mp, &model);
 *
 *     struct vtrim_context_params cp; vtrim_context_params_default(&cp);
 *     struct vtrim_context * ctx;     vtrim_context_init(model, &cp, &ctx);
 *
 *     struct vtrim_image * img;       vtrim_image_from_file("cat.jpg", &img);
 *     char prompt[1024]; int32_t n;   // "USER: <image>\nWhat is this? ASSISTANT:"
 *     vtrim_chat_format(model, "What is this?", 1, prompt, sizeof prompt, &n);
 *     int32_t toks[1024];             vtrim_tokenize(model, prompt, n, true, toks, 1024, &n);
 *     vtrim_prefill(ctx, toks, n, &img, 1);          // each image token becomes the image's embeddings
 *
 *     struct vtrim_sampler_params sp; vtrim_sampler_params_default(&sp);
 *     struct vtrim_sampler * smp;     vtrim_sampler_init(&sp, &smp);
 *     for (int i = 0; i < 64; i++) {
 *         int32_t tok; vtrim_sampler_sample(smp, ctx, &tok);
 *         if (vtrim_token_is_eog(model, tok)) break;
 *         vtrim_decode(ctx, tok);                       // appends the token, computes the next logits
 *     }
 *
 * Ownership: the model owns its weights and is immutable after load; any number of contexts (one per
 * thread) may share it, and it must outlive them. Images, samplers and contexts are owned by the caller
 * and freed with their *_free function. Functions that fill caller buffers take the capacity and return
 * the needed size in *n_out; when the capacity is too small they return VTRIM_ERR_BUFFER_TOO_SMALL and
 * write nothing.
 *
 * The declarations between the "cffi" markers are read verbatim by the Python binding (cffi ABI mode):
 * keep them free of preprocessor directives and macros.
 */
#ifndef VTRIM_H
#define VTRIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(VTRIM_SHARED)
#  ifdef VTRIM_BUILD
#    define VTRIM_API __declspec(dllexport)
#  else
#    define VTRIM_API __declspec(dllimport)
#  endif
#elif defined(VTRIM_SHARED)
#  define VTRIM_API __attribute__((visibility("default")))
#else
#  define VTRIM_API
#endif

/* cffi-begin */

enum vtrim_status {
    VTRIM_OK                       =   0,
    VTRIM_ERR_INVALID_ARG          =  -1, /* a parameter is out of range or NULL                       */
    VTRIM_ERR_IO                   =  -2, /* a file is missing or cannot be read                        */
    VTRIM_ERR_FORMAT               =  -3, /* a file is not a valid GGUF, or lacks a key or tensor       */
    VTRIM_ERR_UNSUPPORTED          =  -4, /* unknown architecture, type or method for this model        */
    VTRIM_ERR_OUT_OF_MEMORY        =  -5,
    VTRIM_ERR_CONTEXT_FULL         =  -6, /* the tokens do not fit in n_ctx                             */
    VTRIM_ERR_BACKEND              =  -7, /* ggml failed to allocate or compute a graph                 */
    VTRIM_ERR_IMAGE                =  -8, /* a corrupt, empty or undecodable image                      */
    VTRIM_ERR_STATE                =  -9, /* a call in the wrong order (decode before prefill)          */
    VTRIM_ERR_BUFFER_TOO_SMALL     = -10, /* the caller's buffer is too small; *n_out says how large    */
    VTRIM_ERR_ABORTED              = -11  /* stopped by vtrim_context_abort or the abort callback       */
};

enum vtrim_device {
    VTRIM_DEVICE_AUTO = 0,  /* the first GPU backend compiled in, else the CPU */
    VTRIM_DEVICE_CPU  = 1,
    VTRIM_DEVICE_GPU  = 2   /* fails with VTRIM_ERR_UNSUPPORTED when no GPU backend is present */
};

enum vtrim_kv_type {
    VTRIM_KV_F16 = 0,       /* half the memory; logits within ~1e-3 relative of f32 */
    VTRIM_KV_F32 = 1        /* bit-for-bit the f32 math of the reference            */
};

struct vtrim_model;
struct vtrim_context;
struct vtrim_image;
struct vtrim_sampler;

/* How the vision towers compute attention (vtrim_model_params.vision_attn). */
enum vtrim_vision_attn {
    VTRIM_VISION_ATTN_AUTO    = 0,  /* chunked on the CPU for long sequences (>= 1024 positions), else flash */
    VTRIM_VISION_ATTN_FLASH   = 1,  /* ggml_flash_attn_ext                                               */
    VTRIM_VISION_ATTN_CHUNKED = 2,  /* explicit scores by chunks of query rows, on the matrix kernels      */
};

struct vtrim_model_params {
    int32_t device;         /* enum vtrim_device                                   */
    int32_t n_threads;      /* reserved for parallel loading; <= 0: all cores                */
    bool    vocab_only;     /* load the tokenizer only (a vocabulary GGUF needs no tensors)  */
    /* ggml rpc-server endpoints, "host:port,host:port" (NULL or "": none). The decoder layers are split in
       equal shares over every server device and the local device, which keeps the last share, the
       embeddings, the output layer and the vision tower; each layer's KV cache lives with its weights.
       VTRIM_ERR_IO when a server cannot be reached; VTRIM_ERR_UNSUPPORTED in a build without VTRIM_RPC. */
    const char * rpc_servers;
    /* map the weight files (default true): on the CPU the weights are then the file's pages, shared with
       every process that maps it, read as they are touched; false: read into the heap (huge pages). A GPU
       always gets a copy. */
    bool    use_mmap;
    /* bytes of the image-embedding cache that the model's contexts share (default 256 MiB; 0: none): an
       image seen before, by any context, is not encoded again (LLaVA without a vision-tower reduction) */
    int64_t image_cache_bytes;
    int32_t vision_attn;    /* one of enum vtrim_vision_attn, default AUTO                              */
};

struct vtrim_context_params {
    int32_t n_ctx;          /* tokens in the KV cache (image tokens count); <= 0: the model's trained context */
    int32_t n_batch;        /* tokens per prefill graph; prefill runs in chunks of this size */
    int32_t n_threads;      /* CPU threads; <= 0: all cores                         */
    int32_t kv_type;        /* enum vtrim_kv_type                                    */
};

/* What the model is, read from the GGUF. Strings point into the model and live as long as it does. */
struct vtrim_model_info {
    const char * arch;           /* "llava", "mllama", or "llama" (text only)     */
    const char * name;           /* general.name, or ""                          */
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;             /* decoder layers                               */
    int32_t n_head;
    int32_t n_head_kv;
    int32_t n_vision_layer;      /* vision tower layers that run                 */
    int32_t image_size;          /* input side of the vision tower, in pixels    */
    int32_t n_image_tokens;      /* embeddings one image (one tile) expands to    */
    int32_t image_token_id;      /* the placeholder; put it once per image         */
    int32_t bos_token_id;
    int32_t eos_token_id;
    int64_t n_params;            /* weights, all towers                            */
    int64_t n_bytes;             /* bytes of weights                               */
    int32_t n_rpc_devices;       /* devices on RPC servers (vtrim_model_params.rpc_servers) */
    int64_t n_bytes_rpc;         /* of n_bytes, what those devices hold            */
    int64_t n_bytes_mapped;      /* of n_bytes, what is the weight files' mapped pages (use_mmap) */
};

/* Sampling: temperature 0 is greedy (argmax, ties to the lower id). Otherwise top_k (0: off),
 * then top_p (>= 1: off), then a draw at the temperature from a generator seeded with `seed`. */
struct vtrim_sampler_params {
    float    temperature;
    int32_t  top_k;
    float    top_p;
    uint64_t seed;
};

struct vtrim_memory {
    int64_t weights_text;        /* decoder: embeddings, layers, output                       */
    int64_t weights_vision;      /* vision tower                                              */
    int64_t weights_projector;   /* projector                                                 */
    int64_t weights_rpc;         /* of the weights, on RPC servers                            */
    int64_t weights_mapped;      /* of the weights, the file's mapped pages (shared, evictable) */
    int64_t kv_cache;            /* self-attention K and V buffers, all devices               */
    int64_t cross_cache;         /* cross-attention states in use (Llama-3.2-Vision)          */
    int64_t compute;             /* the scheduler's compute buffers                           */
    int64_t image_embeddings;    /* host buffer of the prompt's image embeddings              */
    int64_t host_logits;         /* host copy of the last logits                              */
    int64_t image_cache;         /* the model's image-embedding cache, shared by its contexts */
};

/* ---- visual-token reduction: policies applied at hooks of the forward pass ---- */

enum vtrim_reduce_method {
    VTRIM_REDUCE_FASTV = 1,     /* FastV: drop image tokens after decoder layer K by layer K-1's attention */
    VTRIM_REDUCE_TRIM  = 2,     /* Trimmed Llama: trim the cross-attended image states at the first cross layer */
    /* FiCoCo-V: merge patches inside LLaVA's vision tower (filter, correlate, compress) */
    VTRIM_REDUCE_FICOCO_V = 3,
    VTRIM_REDUCE_FICOCO_L = 4,  /* FiCoCo-L: merge image rows into their kin between decoder layers */
    VTRIM_REDUCE_VLCACHE = 5    /* VL-Cache: per-layer budgets, per-KV-head rows of the KV cache after the prefill */
};

enum vtrim_hook {
    VTRIM_HOOK_VISION_ENCODER = 0,  /* inside the vision tower                 */
    VTRIM_HOOK_DECODER_LAYER  = 1,  /* after decoder layer K-1, before layer K  */
    VTRIM_HOOK_CROSS_ATTN     = 2,  /* at the first cross-attention layer       */
    VTRIM_HOOK_AFTER_PREFILL  = 3   /* on the KV cache after the prefill        */
};

enum vtrim_fastv_score {
    VTRIM_FASTV_SCORE_LAST = 0,     /* the last prompt token's attention (the official code) */
    VTRIM_FASTV_SCORE_MEAN = 1      /* mean over the text tokens after the last image (the paper) */
};

enum vtrim_trim_mode {
    VTRIM_TRIM_UNION  = 0,      /* each head keeps its top k_ratio; the union is kept (adapts to the input) */
    VTRIM_TRIM_BUDGET = 1       /* exactly `keep` of the states by the head-mean score */
};

/* Each method has its own params struct, its *_default and its vtrim_reduce_add_<method>: a new method is an
 * addition to this header, never a change to an existing struct. */

struct vtrim_fastv_params {
    int32_t k;                  /* layers 0..K-1 see every token; 1 <= K < n_layer (default 2) */
    float   ratio;              /* fraction of the image tokens dropped, in [0, 1] (default 0.5) */
    int32_t score;              /* enum vtrim_fastv_score; default: last */
};

struct vtrim_trim_params {
    float   k_ratio;            /* union mode: fraction each head keeps, in (0, 1] (default 0.25) */
    int32_t mode;               /* enum vtrim_trim_mode; default: union */
    float   keep;               /* budget mode: fraction kept, in (0, 1] (default 0.5) */
    bool    first_layer;        /* the first cross layer attends to the kept states too (default: all) */
};

/* FiCoCo-V (arXiv 2411.17686): in vision layers start_layer .. f (f: the last layer that runs), after each
 * layer's attention, drop the most redundant patches and merge each into the kept patches it resembles, until
 * `tokens` patches per image remain. LLaVA only. */
struct vtrim_ficoco_v_params {
    int32_t tokens;             /* patches kept per image, in [1, N] (default 64); N: unreduced */
    int32_t start_layer;        /* first vision layer (0-based) that merges, in [0, f] (default 12) */
    float   lam;                /* weight of the patch-patch redundancy against CLS attention, [0, 1] (0.35) */
    float   eps;                /* each dropped patch merges into max(1, ceil((1 - eps) * kept)) targets, [0, 1] (0.998) */
};

/* FiCoCo-L (arXiv 2411.17686) on LLaVA: a filter-correlate-compress step at each hook between decoder
 * layers l-1 and l, l = start_layer .. n_layer-1, until `tokens` rows of each image are left. */
struct vtrim_ficoco_l_params {
    int32_t tokens;             /* image rows kept per image, in [1, N] (default 64) */
    int32_t start_layer;        /* the first layer on reduced rows, in [1, n_layer - 1] (default 4) */
    float   beta;               /* weight of the image-image term of the redundancy, in [0, 1] (default 0.6) */
    float   eps;                /* correlate: each dropped row merges into its top ceil((1 - eps) kept) (0.998) */
};

/* VL-Cache (arXiv 2410.23317): after a prefill with images, per-layer KV budgets from the attention density of
 * the text after the last image, and per KV head the recent window plus the best-scoring positions kept. */
struct vtrim_vlcache_params {
    float   budget;             /* mean fraction of the cache kept per layer, in (0, n_layer] (default 0.1) */
    float   threshold;          /* sparsity: a probability below threshold * its row's max, in [0, 1) (default 0.01) */
    float   recent;             /* share of each layer's budget given to the most recent positions, in [0, 1]
                                   (default 0.1) */
};

/* What one policy did in the last prefill. VL-Cache (hook after_prefill): n_in = the positions its cache held,
 * n_kept = the rows each KV head keeps, mean over layers (rounded), the bytes of every layer's K and V. */
struct vtrim_reduce_stage {
    int32_t method;
    int32_t hook;               /* enum vtrim_hook */
    int32_t layer;              /* FastV: the first layer on the reduced set; Trim: the cross layer that ranks;
                                 * FiCoCo-V: its first vision layer */
    int32_t n_in;               /* image tokens before the stage */
    int32_t n_kept;             /* image tokens after it */
    int64_t kv_bytes_full;      /* KV bytes of the layers it shrinks, had nothing been dropped */
    int64_t kv_bytes_kept;      /* the same layers' KV bytes as held */
    double  flops_saved;        /* prefill FLOPs it saved (estimate: matmuls + attention): the decoder's, and for
                                 * a vision-encoder stage the tower's and projector's too */
    double  t_ms;               /* after-prefill stages: wall time of the stage (scoring, choice, compaction);
                                   0 for stages inside a pass */
};

/* What the last prefill and the decodes since did. Times in milliseconds. */
struct vtrim_stats {
    int32_t n_past;              /* tokens in the sequence (positions used)        */
    int32_t n_prompt_tokens;     /* tokens of the last prefill, images expanded     */
    int32_t n_images;
    int32_t n_image_tokens;      /* image embeddings of the last prefill            */
    int32_t n_image_tokens_kept; /* of those, what the decoder layers after all reductions hold */
    int64_t kv_cache_bytes;      /* bytes of K and V held by the cache now          */
    double  t_encode_ms;         /* vision tower + projector                        */
    double  t_prefill_ms;        /* decoder over the prompt                         */
    double  t_decode_ms;         /* all vtrim_decode calls since the prefill        */
    int32_t n_decoded;
    int32_t n_stages;            /* reduction stages that ran; see vtrim_get_reduce_stage */
    double  prefill_flops;       /* decoder FLOPs of the last prefill (estimate) */
    double  prefill_flops_full;  /* the same without any reduction */
    int64_t host_bytes_in;       /* bytes the host gave the backends in the last prefill (ids, embeddings,
                                    masks, the indices a reduction chose)                             */
    int64_t host_bytes_out;      /* bytes it read back (logits, hidden states and scores for reductions) */
    int32_t n_images_cached;     /* of n_images, taken from the model's image cache (not encoded)       */
};

/* ---- errors ---------------------------------------------------------------------------------- */

/* The message of the last failed call on this thread ("" if none). Valid until the next call. */
VTRIM_API const char * vtrim_last_error(void);
VTRIM_API const char * vtrim_version(void);
/* The ggml backend names compiled in, comma separated (e.g. "CPU" or "CUDA,CPU"). */
VTRIM_API const char * vtrim_backends(void);

/* ---- model ----------------------------------------------------------------------------------- */

VTRIM_API void    vtrim_model_params_default(struct vtrim_model_params * p);
/* Loads a GGUF: one file with text and vision towers, or a text file plus llama.cpp's mmproj file. */
VTRIM_API int32_t vtrim_model_load(const char * path, const char * mmproj, const struct vtrim_model_params * p,
                                   struct vtrim_model ** out);
VTRIM_API void    vtrim_model_free(struct vtrim_model * model);
VTRIM_API int32_t vtrim_model_get_info(const struct vtrim_model * model, struct vtrim_model_info * out);

/* ---- text ------------------------------------------------------------------------------------ */

/* Special tokens written in the text (e.g. "<image>", "</s>") become their ids. add_special adds BOS. */
VTRIM_API int32_t vtrim_tokenize(const struct vtrim_model * model, const char * text, int32_t text_len,
                                 bool add_special, int32_t * tokens, int32_t n_max, int32_t * n_out);
/* UTF-8 bytes of the tokens, without BOS/EOS and with SentencePiece's leading space removed when
 * remove_leading_space is set (the first piece of a reply). Not NUL-terminated. */
VTRIM_API int32_t vtrim_detokenize(const struct vtrim_model * model, const int32_t * tokens, int32_t n_tokens,
                                   bool remove_leading_space, char * text, int32_t n_max, int32_t * n_out);
VTRIM_API bool    vtrim_token_is_eog(const struct vtrim_model * model, int32_t token);
/* One user turn in the model's conversation format, with one image placeholder per image before the
 * question, and the assistant's prefix. Continue a conversation by appending the next turn's text. */
VTRIM_API int32_t vtrim_chat_format(const struct vtrim_model * model, const char * question, int32_t n_images,
                                    char * text, int32_t n_max, int32_t * n_out);

/* ---- images ---------------------------------------------------------------------------------- */

/* JPEG, PNG, BMP, GIF (first frame), TGA, PNM; converted to 8-bit RGB. */
VTRIM_API int32_t vtrim_image_from_file(const char * path, struct vtrim_image ** out);
VTRIM_API int32_t vtrim_image_from_memory(const uint8_t * data, size_t size, struct vtrim_image ** out);
/* Copies h rows of w RGB pixels (3 bytes each, no padding). */
VTRIM_API int32_t vtrim_image_from_pixels(const uint8_t * rgb, int32_t width, int32_t height,
                                          struct vtrim_image ** out);
VTRIM_API void    vtrim_image_free(struct vtrim_image * image);
VTRIM_API int32_t vtrim_image_size(const struct vtrim_image * image, int32_t * width, int32_t * height);
/* The pixel values the vision tower sees, as the model's image processor makes them:
 * float32, [n_tiles][3][image_size][image_size]. n_max and *n_out count floats. */
VTRIM_API int32_t vtrim_image_preprocess(const struct vtrim_model * model, const struct vtrim_image * image,
                                         float * pixels, int64_t n_max, int64_t * n_out);

/* Tiles the image becomes (Llama-3.2-Vision: the canvas chosen among the supported aspect ratios, and its
 * 1-based aspect ratio id; other models: 1 tile, id 0). vtrim_image_preprocess pads to the model's maximum. */
VTRIM_API int32_t vtrim_image_tiles(const struct vtrim_model * model, const struct vtrim_image * image,
                                    int32_t * n_tiles, int32_t * aspect_ratio_id);

/* ---- context: KV cache and compute buffers; one per thread ----------------------------------- */

VTRIM_API void    vtrim_context_params_default(struct vtrim_context_params * p);
VTRIM_API int32_t vtrim_context_init(struct vtrim_model * model, const struct vtrim_context_params * p,
                                     struct vtrim_context ** out);
VTRIM_API void    vtrim_context_free(struct vtrim_context * ctx);
/* Forgets the sequence (empties the KV cache); keeps buffers and reduction policies. */
VTRIM_API int32_t vtrim_context_reset(struct vtrim_context * ctx);

/* Keeps the first n_keep positions of the sequence and forgets the rest (prefix reuse: a conversation that
 * starts with what the context holds goes on from there; the next call must be a vtrim_prefill, which gives
 * the logits). The reduction policies' choices in the kept part stay as they were made. Llama-3.2-Vision keeps
 * its images in the cross-attention cache: there a truncation may drop only positions after the last image
 * token (the kept rows then see what they saw); one that drops an image token fails with
 * VTRIM_ERR_UNSUPPORTED, changing nothing. VTRIM_ERR_INVALID_ARG when n_keep is not in [0, n_past]. */
VTRIM_API int32_t vtrim_context_truncate(struct vtrim_context * ctx, int32_t n_keep);

/* Cancellation. Checked before and during every graph compute (by the CPU backend between nodes, as in
 * llama.cpp; on a GPU between graphs): once vtrim_context_abort(ctx, true) was called, or the callback
 * returns true, the running vtrim_prefill/vtrim_decode fails with VTRIM_ERR_ABORTED and leaves the sequence
 * as it was before that call. The flag stays set (every later call fails) until vtrim_context_abort(ctx,
 * false). vtrim_context_abort may be called from any thread; the callback runs on a compute thread. */
typedef bool (*vtrim_abort_callback)(void * data);
VTRIM_API void    vtrim_context_set_abort_callback(struct vtrim_context * ctx, vtrim_abort_callback callback,
                                                   void * data);
VTRIM_API void    vtrim_context_abort(struct vtrim_context * ctx, bool abort);

/* Appends tokens to the sequence and computes the logits of the last one. Each image_token_id in
 * tokens is replaced by the embeddings of the next image, in order; the counts must match.
 * On error the sequence is left as it was before the call. */
VTRIM_API int32_t vtrim_prefill(struct vtrim_context * ctx, const int32_t * tokens, int32_t n_tokens,
                                struct vtrim_image * const * images, int32_t n_images);
/* Appends one token and computes its logits. */
VTRIM_API int32_t vtrim_decode(struct vtrim_context * ctx, int32_t token);
/* The logits of the last token (n_vocab floats). */
VTRIM_API int32_t vtrim_logits(const struct vtrim_context * ctx, float * logits, int32_t n_vocab);
VTRIM_API int32_t vtrim_get_stats(const struct vtrim_context * ctx, struct vtrim_stats * out);
/* What the context and its model hold, in bytes. Weights by tower (all devices), the KV cache as allocated
 * (n_ctx rows of every layer), the compute buffers as sized by the largest graphs run so far (run the longest
 * prompt with an image once to see the peak), the image embeddings' host buffer. */
VTRIM_API int32_t vtrim_get_memory(const struct vtrim_context * ctx, struct vtrim_memory * out);

/* What this machine's CPU backend sustains, for benchmarks to say how far from the limit a figure is: ggml's
 * matrix product of two n x n matrices (weights f32, f16 or bf16; activations f32), in FLOP/s (2 per
 * multiply-add), and a 256 MiB copy in bytes read + written per second; each the fastest of 3 runs.
 * n_threads <= 0: all cores. With n_threads == 1 the time is the calling thread's CPU time (ggml then
 * computes on it): steady on a machine shared with other work, and the right denominator for a one-thread
 * benchmark that also counts CPU time; otherwise the wall clock. Takes a few seconds at n = 2048. */
struct vtrim_machine_rates {
    double f32_flops;
    double f16_flops;
    double bf16_flops;
    double copy_bytes_per_s;
};
VTRIM_API int32_t vtrim_measure_machine(int32_t n_threads, int32_t n, struct vtrim_machine_rates * out);
/* The ggml ops of every graph the context has run, as ggml's enum names ("GGML_OP_MUL_MAT",
 * "GGML_UNARY_OP_SILU", ...), sorted, comma separated, NUL-terminated: what a backend must support to run
 * this model and these reductions. *n_out: the length without the NUL; VTRIM_ERR_BUFFER_TOO_SMALL when
 * n_max < *n_out + 1. */
VTRIM_API int32_t vtrim_graph_ops(const struct vtrim_context * ctx, char * text, int32_t n_max, int32_t * n_out);

/* ---- reduction policies: applied, in order, to every later prefill that holds images ---------- */

VTRIM_API void    vtrim_fastv_default(struct vtrim_fastv_params * p);
VTRIM_API void    vtrim_trim_default(struct vtrim_trim_params * p);
VTRIM_API void    vtrim_ficoco_v_default(struct vtrim_ficoco_v_params * p);
VTRIM_API void    vtrim_ficoco_l_default(struct vtrim_ficoco_l_params * p);
VTRIM_API void    vtrim_vlcache_default(struct vtrim_vlcache_params * p);
/* Check the policy against the model (VTRIM_ERR_INVALID_ARG with the reason: a parameter out of range, or
 * a method that does not apply to this architecture) and append it; on error nothing changes. */
VTRIM_API int32_t vtrim_reduce_add_fastv(struct vtrim_context * ctx, const struct vtrim_fastv_params * p);
VTRIM_API int32_t vtrim_reduce_add_trim(struct vtrim_context * ctx, const struct vtrim_trim_params * p);
VTRIM_API int32_t vtrim_reduce_add_ficoco_v(struct vtrim_context * ctx, const struct vtrim_ficoco_v_params * p);
VTRIM_API int32_t vtrim_reduce_add_ficoco_l(struct vtrim_context * ctx, const struct vtrim_ficoco_l_params * p);
/* VL-Cache runs after the prefill of a prompt with images (a text-only prompt: a stage that keeps everything);
 * at most one per context; LLaVA-style models only (image rows in the decoder's self-attention). */
VTRIM_API int32_t vtrim_reduce_add_vlcache(struct vtrim_context * ctx, const struct vtrim_vlcache_params * p);
VTRIM_API int32_t vtrim_reduce_clear(struct vtrim_context * ctx);
VTRIM_API int32_t vtrim_get_reduce_stage(const struct vtrim_context * ctx, int32_t i, struct vtrim_reduce_stage * out);
/* The image rows the decoder's last layers hold after the last prefill, as indices into that prefill's
 * expanded prompt (each image placeholder counted as its n_image_tokens rows), ascending. */
VTRIM_API int32_t vtrim_get_kept_image_rows(const struct vtrim_context * ctx, int32_t * rows, int32_t n_max,
                                            int32_t * n_out);
/* The positions of the rows decoder layer `layer` holds for KV head `head`, ascending (after VL-Cache each
 * head keeps its own; a cross-attention layer holds none). *n_out: their count; VTRIM_ERR_BUFFER_TOO_SMALL
 * when n_max < *n_out. */
VTRIM_API int32_t vtrim_get_kv_positions(const struct vtrim_context * ctx, int32_t layer, int32_t head, int32_t * pos,
                                         int32_t n_max, int32_t * n_out);

/* ---- sampling -------------------------------------------------------------------------------- */

VTRIM_API void    vtrim_sampler_params_default(struct vtrim_sampler_params * p);
/* Fails with VTRIM_ERR_INVALID_ARG for a negative or non-finite temperature, a negative top_k, or top_p
 * outside (0, 1]. */
VTRIM_API int32_t vtrim_sampler_init(const struct vtrim_sampler_params * p, struct vtrim_sampler ** out);
VTRIM_API void    vtrim_sampler_free(struct vtrim_sampler * s);
VTRIM_API int32_t vtrim_sampler_sample(struct vtrim_sampler * s, const struct vtrim_context * ctx, int32_t * token);

/* ---- quantization ---------------------------------------------------------------------------- */

/* vtrim_quantize's types, llama.cpp's names: the text tower's matrices follow llama.cpp's per-tensor rules
 * for that file type (the _M types keep attn_v and ffn_down of some layers, and output, in Q6_K). */
enum vtrim_quant_type {
    VTRIM_QUANT_SAME   = -1,  /* vision_type only: the text tower's base type */
    VTRIM_QUANT_Q8_0   = 0,
    VTRIM_QUANT_Q6_K   = 1,
    VTRIM_QUANT_Q5_K_M = 2,
    VTRIM_QUANT_Q4_K_M = 3,
    VTRIM_QUANT_Q4_0   = 4,
    VTRIM_QUANT_F16    = 5,   /* vision_type only */
    VTRIM_QUANT_BF16   = 6,   /* every matrix bf16 (from f32/bf16 checkpoints: no rounding to f16's range) */
};

struct vtrim_quantize_params {
    int32_t type;          /* enum vtrim_quant_type for the text tower (default Q4_K_M)              */
    int32_t vision_type;   /* the vision tower and projector: Q8_0 (default), F16, SAME, or a type    */
    int32_t n_threads;     /* <= 0: all cores                                                         */
};

struct vtrim_quantize_report {
    int32_t n_tensors;     /* tensors written                                                         */
    int32_t n_quantized;   /* of those, re-encoded (the rest copied: norms, biases, embeddings)       */
    int32_t n_fallback;    /* matrices whose rows do not divide the type's block: a smaller block type */
    int64_t bytes_in, bytes_out;
};

VTRIM_API void    vtrim_quantize_params_default(struct vtrim_quantize_params * p);
/* Writes `out`: `in` (a GGUF of f32/f16/bf16 weights, a single-file model, a text file or an mmproj) with
 * its weight matrices quantized and every metadata key copied (general.file_type set). A file that holds
 * quantized tensors is refused (VTRIM_ERR_UNSUPPORTED): quantize from the f16/f32 file. On failure no
 * `out` file is left. report may be NULL. */
VTRIM_API int32_t vtrim_quantize(const char * in, const char * out, const struct vtrim_quantize_params * p,
                                 struct vtrim_quantize_report * report);

/* cffi-end */

#ifdef __cplusplus
}
#endif

#endif /* VTRIM_H */
