// The architecture table: everything that differs between LLaVA-1.5, Llama-3.2-Vision and a text-only Llama
// sits behind one entry of function pointers, with its state in model->arch_state and ctx->arch_state.
// Nothing outside arch/ asks which architecture a model is; it asks the entry (or a property of it).
#pragma once

#include "model/model.h"

#include <stdbool.h>
#include <stdint.h>

struct gguf_context;
struct vtrim_context;
struct vtrim_image;
struct vtrim_rows;
struct vtrim_decoder_ext;
struct vtrim_policy;
struct vtrim_reduce_caps;

// A one-turn chat template: prefix, each image's placeholder followed by image_sep, the question, suffix.
struct vtrim_chat_template {
    const char * name;       // vtrim.chat_format
    const char * prefix;
    const char * image_sep;
    const char * suffix;
};

struct vtrim_arch {
    const char * name;                  // vtrim_model_info.arch
    // Image placeholders become decoder rows (LLaVA: the image's embeddings) rather than staying a token
    // that cross-attends (mllama).
    bool image_rows_in_decoder;
    const struct vtrim_chat_template * chat_templates;   // NULL-terminated by name; the first is the default

    // ---- model (load) ----
    // text: the main GGUF; mmproj: llama.cpp's separate vision file, or NULL. Sets the model's text and vision
    // summary, image token, chat template; allocates arch_state.
    int32_t (*read_hparams)(struct vtrim_model * m, const struct gguf_context * text,
                            const struct gguf_context * mmproj);
    int32_t (*bind_tensors)(struct vtrim_model * m);
    void    (*model_free)(struct vtrim_model * m);   // arch_state and what it holds

    // ---- text ----
    // NULL: the vocabulary's tokenizer.
    int32_t (*tokenize)(const struct vtrim_model * m, const char * text, int32_t text_len, bool add_special,
                        int32_t * tokens, int32_t n_max, int32_t * n_out);
    // The image placeholder's text (e.g. "<image>"), or NULL for a model that takes no images.
    const char * (*image_placeholder)(const struct vtrim_model * m);

    // ---- images (NULL: the model takes none) ----
    int32_t (*image_preprocess)(const struct vtrim_model * m, const struct vtrim_image * image, float * pixels,
                                int64_t n_max, int64_t * n_out);
    int32_t (*image_tiles)(const struct vtrim_model * m, const struct vtrim_image * image, int32_t * n_tiles,
                           int32_t * aspect_ratio_id);

    // ---- context (each may be NULL) ----
    int32_t (*context_init)(struct vtrim_context * c);
    void    (*context_free)(struct vtrim_context * c);
    void    (*context_reset)(struct vtrim_context * c);
    int64_t (*cache_bytes)(const struct vtrim_context * c);   // caches of its own (mllama's cross cache)
    // For images outside the KV cache: whether this architecture's state allows keeping only the first n_keep
    // positions (vtrim_context_truncate; prefix reuse). Fails, changing nothing, when it does not. NULL: never.
    int32_t (*truncate)(struct vtrim_context * c, int32_t n_keep);

    // ---- prefill ----
    // Refuses images this architecture cannot take now (too many, a second turn with images).
    int32_t (*prefill_check)(const struct vtrim_context * c, int32_t n_images);
    // The images through the vision tower: into c->img (decoder rows) or the architecture's own state.
    int32_t (*encode)(struct vtrim_context * c, struct vtrim_image * const * images, int32_t n_images);
    // Per-row data of the expanded prompt that only this architecture reads (mllama: which images each row
    // sees). tokens are the prompt's, one row each (image_rows_in_decoder is false).
    int32_t (*prepare_rows)(struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens,
                            struct vtrim_rows * rows);
    // After the prompt ran: commit (ok) or forget (a failed prefill) what prepare_rows and encode kept.
    void    (*prefill_end)(struct vtrim_context * c, const struct vtrim_rows * rows, bool ok);
    // Image states the last prefill's text can attend to and how many survived the reductions; fills the
    // kept rows (vtrim_get_kept_image_rows). Only for architectures whose image rows are not decoder rows.
    int32_t (*image_result)(struct vtrim_context * c, int32_t n_images, int32_t * n_image_tokens, int32_t * n_kept);

    // ---- decoder ----
    // Layers the Llama decoder does not build itself, for this context; NULL: none.
    const struct vtrim_decoder_ext * (*decoder_ext)(struct vtrim_context * c);

    // ---- reductions ----
    void    (*reduce_caps)(const struct vtrim_model * m, struct vtrim_reduce_caps * caps);
    // Runs a VTRIM_HOOK_CROSS_ATTN policy on the prompt rows (h_in: their states entering the layer).
    int32_t (*cross_attn_stage)(struct vtrim_context * c, const struct vtrim_policy * p,
                                const struct vtrim_rows * rows, const float * h_in);
};

extern const struct vtrim_arch vtrim_arch_llama;    // arch/llama/llama.c: text only
extern const struct vtrim_arch vtrim_arch_llava;    // arch/llava/llava.c
extern const struct vtrim_arch vtrim_arch_mllama;   // arch/mllama/mllama.c

// The entry for a GGUF (general.architecture, and for "llama" whether a vision tower comes with it);
// VTRIM_ERR_UNSUPPORTED naming the supported ones otherwise.
int32_t vtrim_arch_detect(const struct gguf_context * text, const struct gguf_context * mmproj,
                          const struct vtrim_arch ** out);
// A chat template by name, among every architecture's; NULL when none has it.
const struct vtrim_chat_template * vtrim_arch_chat_template(const char * name);
// Reads vtrim.chat_format into m->chat; a missing or unknown name takes the template named `fallback`.
int32_t vtrim_arch_read_chat_template(struct vtrim_model * m, const struct gguf_context * g, const char * fallback);
// The image-processor keys every architecture's GGUF may set: <prefix>.image_mean/std and vtrim.image.resample,
// rescale_factor, do_normalize. Each keeps its value when the key is absent.
int32_t vtrim_arch_read_image_common(const struct gguf_context * g, const char * prefix, float mean[3], float std[3],
                                     int32_t * resample, float * rescale, bool * do_normalize);
// Formats one user turn with the template into the caller's buffer (vtrim_chat_format's contract).
int32_t vtrim_chat_template_format(const struct vtrim_chat_template * t, const char * image, int32_t n_images,
                                   const char * question, char * text, int32_t n_max, int32_t * n_out);
