// Entry points of vtrim.h that are thin: version, model info, text, chat format, preprocessing; each checks
// its arguments and hands over to the vocabulary or the model's architecture entry.
#include "api/error.h"
#include "arch/arch.h"
#include "image/image.h"
#include "model/model.h"
#include "vocab/vocab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char * vtrim_version(void) { return VTRIM_VERSION; }

int32_t vtrim_model_get_info(const struct vtrim_model * m, struct vtrim_model_info * out) {
    if (!m || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_model_get_info: model and out are required");
    }
    memset(out, 0, sizeof *out);
    out->arch = m->arch->name;
    out->name = m->name;
    out->n_vocab = m->text.n_vocab;
    out->n_ctx_train = m->text.n_ctx_train;
    out->n_embd = m->text.n_embd;
    out->n_layer = m->text.n_layer;
    out->n_head = m->text.n_head;
    out->n_head_kv = m->text.n_head_kv;
    out->n_vision_layer = m->has_vision ? m->vision.n_layer_run : 0;
    out->image_size = m->has_vision ? m->vision.image_size : 0;
    out->n_image_tokens = m->has_vision ? m->vision.n_image_tokens : 0;
    out->image_token_id = m->image_token_id;
    out->bos_token_id = vtrim_vocab_bos(m->vocab);
    out->eos_token_id = vtrim_vocab_eos(m->vocab);
    out->n_params = m->n_params;
    out->n_bytes = m->n_bytes;
    out->n_rpc_devices = m->n_rpc;
    out->n_bytes_rpc = m->n_bytes_rpc;
    out->n_bytes_mapped = m->n_bytes_mapped;
    return 0;
}

int32_t vtrim_tokenize(const struct vtrim_model * m, const char * text, int32_t text_len, bool add_special,
                       int32_t * tokens, int32_t n_max, int32_t * n_out) {
    if (!m || (!text && text_len > 0) || text_len < 0 || n_max < 0 || (!tokens && n_max > 0) || !n_out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_tokenize: invalid arguments");
    }
    text = text ? text : "";
    if (m->arch->tokenize) {
        return m->arch->tokenize(m, text, text_len, add_special, tokens, n_max, n_out);
    }
    return vtrim_vocab_tokenize(m->vocab, text, text_len, add_special, tokens, n_max, n_out);
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

int32_t vtrim_chat_format(const struct vtrim_model * m, const char * question, int32_t n_images, char * text,
                          int32_t n_max, int32_t * n_out) {
    if (!m || !question || n_images < 0 || n_max < 0 || (!text && n_max > 0) || !n_out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_chat_format: invalid arguments");
    }
    if (n_images > 0 && m->image_token_id < 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model takes no images");
    }
    // The placeholder's own text (detokenizing would drop it: it is a control token).
    const char * image = n_images == 0 ? "" : m->arch->image_placeholder ? m->arch->image_placeholder(m) : NULL;
    if (!image) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model takes no images");
    }
    return vtrim_chat_template_format(m->chat, image, n_images, question, text, n_max, n_out);
}

int32_t vtrim_image_preprocess(const struct vtrim_model * m, const struct vtrim_image * image, float * pixels,
                               int64_t n_max, int64_t * n_out) {
    if (!m || !image || !n_out || n_max < 0 || (!pixels && n_max > 0)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_image_preprocess: invalid arguments");
    }
    if (!m->has_vision || !m->arch->image_preprocess) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model has no vision tower");
    }
    return m->arch->image_preprocess(m, image, pixels, n_max, n_out);
}

int32_t vtrim_image_tiles(const struct vtrim_model * m, const struct vtrim_image * image, int32_t * n_tiles,
                          int32_t * aspect_ratio_id) {
    if (!m || !image || !n_tiles || !aspect_ratio_id) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_image_tiles: invalid arguments");
    }
    if (!m->has_vision || !m->arch->image_tiles) {
        *n_tiles = 0;
        *aspect_ratio_id = 0;
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this model has no vision tower");
    }
    return m->arch->image_tiles(m, image, n_tiles, aspect_ratio_id);
}
