// Entry points of vtrim.h that are thin: versions, backends, text, chat format, preprocessing.
#include "arch/arch.h"
#include "error.h"
#include "image.h"
#include "model.h"
#include "vocab.h"

#include "ggml-backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char * vtrim_version(void) { return VTRIM_VERSION; }

const char * vtrim_backends(void) {
    static char names[256];
    if (!names[0]) {
        size_t used = 0;
        for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
            const char * name = ggml_backend_reg_name(ggml_backend_reg_get(i));
            const int n = snprintf(names + used, sizeof names - used, "%s%s", used ? "," : "", name);
            if (n < 0 || (size_t) n >= sizeof names - used) {
                break;
            }
            used += (size_t) n;
        }
    }
    return names;
}

int32_t vtrim_tokenize(const struct vtrim_model * m, const char * text, int32_t text_len, bool add_special,
                       int32_t * tokens, int32_t n_max, int32_t * n_out) {
    if (!m || (!text && text_len > 0) || text_len < 0 || n_max < 0 || (!tokens && n_max > 0) || !n_out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_tokenize: invalid arguments");
    }
    return vtrim_arch_tokenize(m, text ? text : "", text_len, add_special, tokens, n_max, n_out);
}

int32_t vtrim_detokenize(const struct vtrim_model * m, const int32_t * tokens, int32_t n_tokens,
                         bool remove_leading_space, char * text, int32_t n_max, int32_t * n_out) {
    if (!m || (!tokens && n_tokens > 0) || n_tokens < 0 || n_max < 0 || (!text && n_max > 0) || !n_out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_detokenize: invalid arguments");
    }
    return vtrim_vocab_detokenize(m->vocab, tokens, n_tokens, remove_leading_space, text, n_max, n_out);
}

bool vtrim_token_is_eog(const struct vtrim_model * m, int32_t token) {
    return m && vtrim_vocab_is_eog(m->vocab, token);
}

// Copies a formatted string into the caller's buffer, which need not hold the NUL.
static int32_t emit(const char * s, size_t len, char * text, int32_t n_max, int32_t * n_out) {
    if (len > INT32_MAX) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "prompt too long");
    }
    *n_out = (int32_t) len;
    if ((int32_t) len > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_chat_format: needs %zu bytes", len);
    }
    memcpy(text, s, len);
    return 0;
}

// One user turn: prefix, each image's placeholder followed by image_sep, the question, suffix.
static int32_t format_turn(const char * prefix, const char * image, const char * image_sep, int32_t n_images,
                           const char * question, const char * suffix, char * text, int32_t n_max, int32_t * n_out) {
    const size_t need = strlen(prefix) + (size_t) n_images * (strlen(image) + strlen(image_sep)) + strlen(question) +
                        strlen(suffix) + 1;
    char * buf = malloc(need);
    if (!buf) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    size_t len = (size_t) snprintf(buf, need, "%s", prefix);
    for (int32_t i = 0; i < n_images; i++) {
        len += (size_t) snprintf(buf + len, need - len, "%s%s", image, image_sep);
    }
    len += (size_t) snprintf(buf + len, need - len, "%s%s", question, suffix);
    const int32_t rc = emit(buf, len, text, n_max, n_out);
    free(buf);
    return rc;
}

int32_t vtrim_chat_format(const struct vtrim_model * m, const char * question, int32_t n_images, char * text,
                          int32_t n_max, int32_t * n_out) {
    if (!m || !question || n_images < 0 || n_max < 0 || (!text && n_max > 0) || !n_out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_chat_format: invalid arguments");
    }
    if (n_images > 0 && m->image_token_id < 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model takes no images");
    }
    // The placeholder's own text (detokenizing would drop it: it is a control token).
    const char * image = n_images > 0 ? vtrim_arch_image_placeholder(m) : "";
    if (!image) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model takes no images");
    }
    if (strcmp(m->chat_format, "llama-3.2-vision") == 0) {
        // BOS (<|begin_of_text|>) comes from vtrim_tokenize's add_special.
        return format_turn("<|start_header_id|>user<|end_header_id|>\n\n", image, "", n_images, question,
                           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", text, n_max, n_out);
    }
    // LLaVA-1.5 (llava-hf's chat template): "USER: <image>\n{question} ASSISTANT:"
    return format_turn("USER: ", image, "\n", n_images, question, " ASSISTANT:", text, n_max, n_out);
}

int32_t vtrim_image_preprocess(const struct vtrim_model * m, const struct vtrim_image * image, float * pixels,
                               int64_t n_max, int64_t * n_out) {
    if (!m || !image || !n_out || n_max < 0 || (!pixels && n_max > 0)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_image_preprocess: invalid arguments");
    }
    if (!m->has_vision) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model has no vision tower");
    }
    if (m->arch == VTRIM_ARCH_MLLAMA) {
        const struct vtrim_mllama_pp * pp = &m->mllama_pp;
        const int64_t n = (int64_t) pp->max_image_tiles * 3 * pp->tile_size * pp->tile_size;
        *n_out = n;
        if (n > n_max) {
            return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_image_preprocess: needs %lld floats", (long long) n);
        }
        return vtrim_mllama_preprocess(image, pp, pixels, NULL, NULL, NULL, NULL);
    }
    int32_t w = 0, h = 0;
    int32_t rc = vtrim_image_pp_output_size(image, &m->image_pp, &w, &h);
    if (rc < 0) {
        return rc;
    }
    if (w != m->vision.image_size || h != m->vision.image_size) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "the image processor makes %dx%d pixels; the vision tower takes %dx%d",
                          w, h, m->vision.image_size, m->vision.image_size);
    }
    const int64_t n = 3 * (int64_t) w * h;
    *n_out = n;
    if (n > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_image_preprocess: needs %lld floats", (long long) n);
    }
    return vtrim_image_preprocess_clip(image, &m->image_pp, pixels);
}

int32_t vtrim_image_tiles(const struct vtrim_model * m, const struct vtrim_image * image, int32_t * n_tiles,
                          int32_t * aspect_ratio_id) {
    if (!m || !image || !n_tiles || !aspect_ratio_id) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_image_tiles: invalid arguments");
    }
    if (m->arch != VTRIM_ARCH_MLLAMA) {
        *n_tiles = m->has_vision ? 1 : 0;
        *aspect_ratio_id = 0;
        return m->has_vision ? 0 : vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model has no vision tower");
    }
    struct vtrim_mllama_plan plan;
    const int32_t rc = vtrim_mllama_plan_image(image->width, image->height, &m->mllama_pp, &plan);
    if (rc == 0) {
        *n_tiles = plan.n_tiles;
        *aspect_ratio_id = plan.aspect_ratio_id;
    }
    return rc;
}
