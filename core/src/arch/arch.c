// Which architecture a GGUF holds, and the LLaVA glue: image token, chat format, image preprocessing.
#include "arch/arch.h"

#include "error.h"
#include "gguf_util.h"
#include "vocab.h"

#include "gguf.h"

#include <string.h>

static const char k_image_text[] = "<image>";   // LLaVA's image placeholder

// The image processor of the checkpoint, from vtrim.image.* (our layout) or clip.* (llama.cpp's layout).
static int32_t read_image_pp(struct vtrim_model * m, const struct gguf_context * g) {
    struct vtrim_image_pp * pp = &m->image_pp;
    const int32_t size = m->vision.image_size;
    const float clip_mean[3] = { 0.48145466f, 0.4578275f, 0.40821073f };
    const float clip_std[3] = { 0.26862954f, 0.26130258f, 0.27577711f };
    memcpy(pp->mean, clip_mean, sizeof clip_mean);
    memcpy(pp->std, clip_std, sizeof clip_std);
    pp->do_pad = false;
    pp->do_resize = true;
    pp->shortest_edge = size;
    pp->resample = VTRIM_RESAMPLE_BICUBIC;
    pp->do_center_crop = true;
    pp->crop_h = pp->crop_w = size;
    float rescale = 1.0f / 255.0f;
    pp->do_normalize = true;
    int32_t rc;
    if ((rc = vtrim_gguf_f32_array(g, "clip.vision.image_mean", pp->mean, 3, false)) < 0 ||
        (rc = vtrim_gguf_f32_array(g, "clip.vision.image_std", pp->std, 3, false)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_pad", &pp->do_pad, false)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_resize", &pp->do_resize, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.shortest_edge", &pp->shortest_edge, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.resample", &pp->resample, false)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_center_crop", &pp->do_center_crop, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.crop_height", &pp->crop_h, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.crop_width", &pp->crop_w, false)) < 0 ||
        (rc = vtrim_gguf_f32(g, "vtrim.image.rescale_factor", &rescale, false)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_normalize", &pp->do_normalize, false)) < 0) {
        return rc;
    }
    pp->rescale_factor = rescale;
    // The tower takes exactly image_size x image_size: what the processor outputs must be that.
    const bool fits = pp->do_center_crop ? (pp->crop_h == size && pp->crop_w == size)
                                         : (pp->do_resize && pp->shortest_edge == size && pp->do_pad);
    if (!fits || pp->shortest_edge <= 0 || pp->shortest_edge > 8192) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "image processor output does not match the %dx%d vision input",
                          size, size);
    }
    if (pp->resample != VTRIM_RESAMPLE_BICUBIC && pp->resample != VTRIM_RESAMPLE_BILINEAR &&
        pp->resample != VTRIM_RESAMPLE_NEAREST) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "image resample mode %d", pp->resample);
    }
    for (int c = 0; c < 3; c++) {
        if (!(pp->std[c] > 0.0f)) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "image_std must be positive");
        }
    }
    return 0;
}

int32_t vtrim_arch_read_hparams(struct vtrim_model * m, const struct gguf_context * text,
                                const struct gguf_context * mmproj) {
    char arch[64] = "";
    int32_t rc;
    if ((rc = vtrim_gguf_str(text, "general.architecture", arch, sizeof arch, true)) < 0) {
        return rc;
    }
    vtrim_gguf_str(text, "general.name", m->name, sizeof m->name, false);
    if (strcmp(arch, "mllama") == 0) {
        if (mmproj) {
            return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "mllama files hold their vision tower: no mmproj file");
        }
        return vtrim_mllama_read_hparams(m, text);
    }
    if (strcmp(arch, "llama") != 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "unknown architecture '%s' (supported: 'llama' with a CLIP vision "
                          "tower = LLaVA-1.5, 'mllama' = Llama-3.2-Vision)", arch);
    }
    if ((rc = vtrim_llama_read_hparams(m, text, "llama")) < 0) {
        return rc;
    }
    const struct gguf_context * vis = NULL;
    bool legacy = false;
    if (mmproj) {
        bool text_has_vision = false;
        if ((rc = vtrim_gguf_bool(text, "clip.has_vision_encoder", &text_has_vision, false)) < 0) {
            return rc;
        }
        if (text_has_vision) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "the model file already holds its vision tower and projector; "
                              "an mmproj file goes only with a text-only GGUF (llama.cpp's two-file layout): "
                              "load the model without the mmproj");
        }
        char varch[64] = "";
        if ((rc = vtrim_gguf_str(mmproj, "general.architecture", varch, sizeof varch, true)) < 0) {
            return rc;
        }
        if (strcmp(varch, "clip") != 0) {
            return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "mmproj architecture '%s' (expected 'clip')", varch);
        }
        vis = mmproj;
        legacy = true;
    } else {
        bool has_vision = false;
        if ((rc = vtrim_gguf_bool(text, "clip.has_vision_encoder", &has_vision, false)) < 0) {
            return rc;
        }
        vis = has_vision ? text : NULL;
    }
    m->arch = VTRIM_ARCH_LLAMA;
    m->image_token_id = -1;
    strcpy(m->chat_format, "llava-1.5");
    if ((rc = vtrim_gguf_str(text, "vtrim.chat_format", m->chat_format, sizeof m->chat_format, false)) < 0) {
        return rc;
    }
    if (!vis) {
        return 0;
    }
    m->arch = VTRIM_ARCH_LLAVA;
    m->has_vision = true;
    if ((rc = vtrim_clip_read_hparams(m, vis, legacy)) < 0 || (rc = read_image_pp(m, vis)) < 0) {
        return rc;
    }
    const bool explicit_id = vtrim_gguf_has(text, "vtrim.image_token_id");
    if ((rc = vtrim_gguf_i32(text, "vtrim.image_token_id", &m->image_token_id, false)) < 0) {
        return rc;
    }
    if (!explicit_id) {
        m->image_token_id = vtrim_vocab_find(m->vocab, k_image_text);
    }
    if (!explicit_id && m->image_token_id < 0) {
        // llama.cpp's LLaVA-1.5 text file, converted from the original checkpoint, has no "<image>" token
        // (LLaVA's own code splits the prompt at that text). The placeholder then gets a virtual id one past
        // the vocabulary: vtrim_arch_tokenize emits it for the text "<image>" and the prefill expands it.
        m->image_token_id = m->text.n_vocab;
    }
    if (m->image_token_id < 0 || (explicit_id && m->image_token_id >= m->text.n_vocab)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "vtrim.image_token_id %d is outside the vocabulary of %d tokens",
                          m->image_token_id, m->text.n_vocab);
    }
    return 0;
}

static bool image_token_is_virtual(const struct vtrim_model * m) {
    return m->has_vision && m->image_token_id >= vtrim_vocab_n_tokens(m->vocab);
}

const char * vtrim_arch_image_placeholder(const struct vtrim_model * m) {
    if (!m->has_vision || m->image_token_id < 0) {
        return NULL;
    }
    return image_token_is_virtual(m) ? k_image_text : vtrim_vocab_token_text(m->vocab, m->image_token_id);
}

static const char * find_text(const char * s, const char * end, const char * what, size_t n) {
    for (; (size_t) (end - s) >= n; s++) {
        if (memcmp(s, what, n) == 0) {
            return s;
        }
    }
    return NULL;
}

int32_t vtrim_arch_tokenize(const struct vtrim_model * m, const char * text, int32_t text_len, bool add_special,
                            int32_t * tokens, int32_t n_max, int32_t * n_out) {
    if (!image_token_is_virtual(m)) {
        return vtrim_vocab_tokenize(m->vocab, text, text_len, add_special, tokens, n_max, n_out);
    }
    // Each piece between placeholders is tokenized as a text of its own (BOS only before the first), as LLaVA's
    // tokenizer_image_token and llama.cpp's mtmd do: the piece after a placeholder gets SentencePiece's
    // leading space. (LLaVA's Llama vocabularies add no EOS, which would otherwise end the first piece.)
    const size_t tag = strlen(k_image_text);
    const char * p = text, * end = text + text_len;
    int64_t n = 0;
    for (bool first = true;; first = false) {
        const char * hit = find_text(p, end, k_image_text, tag);
        const char * stop = hit ? hit : end;
        const int32_t room = n < n_max ? n_max - (int32_t) n : 0;
        int32_t k = 0;
        const int32_t rc = vtrim_vocab_tokenize(m->vocab, p, (int32_t) (stop - p), add_special && first,
                                                room > 0 ? tokens + n : NULL, room, &k);
        if (rc < 0 && rc != VTRIM_ERR_BUFFER_TOO_SMALL) {
            return rc;
        }
        n += k;
        if (!hit) {
            break;
        }
        if (n < n_max) {
            tokens[n] = m->image_token_id;
        }
        n++;
        p = hit + tag;
    }
    if (n > INT32_MAX) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "tokenize: the text has more than 2^31 tokens");
    }
    *n_out = (int32_t) n;
    if (n > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "the text has %d tokens, the buffer holds %d", *n_out, n_max);
    }
    return 0;
}

int32_t vtrim_arch_bind_tensors(struct vtrim_model * m) {
    if (m->arch == VTRIM_ARCH_MLLAMA) {
        return vtrim_mllama_bind_tensors(m);
    }
    int32_t rc = vtrim_llama_bind_tensors(m);
    if (rc == 0 && m->has_vision) {
        rc = vtrim_clip_bind_tensors(m);
    }
    return rc;
}
