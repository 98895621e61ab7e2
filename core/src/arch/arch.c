// Which entry of the architecture table a GGUF needs, and the chat templates the entries bring.
#include "arch/arch.h"

#include "api/error.h"
#include "model/gguf_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct vtrim_arch * const k_arches[] = { &vtrim_arch_llava, &vtrim_arch_mllama, &vtrim_arch_llama };

int32_t vtrim_arch_detect(const struct gguf_context * text, const struct gguf_context * mmproj,
                          const struct vtrim_arch ** out) {
    char arch[64] = "";
    int32_t rc;
    if ((rc = vtrim_gguf_str(text, "general.architecture", arch, sizeof arch, false)) < 0) {
        return rc;
    }
    if (strcmp(arch, "mllama") == 0) {
        if (mmproj) {
            return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "mllama files hold their vision tower: no mmproj file");
        }
        *out = &vtrim_arch_mllama;
        return 0;
    }
    if (strcmp(arch, "llama") != 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "unknown architecture '%s' (supported: 'llama' with a CLIP vision "
                          "tower = LLaVA-1.5, 'mllama' = Llama-3.2-Vision)", arch);
    }
    bool has_vision = false;
    if ((rc = vtrim_gguf_bool(text, "clip.has_vision_encoder", &has_vision, false)) < 0) {
        return rc;
    }
    if (mmproj && has_vision) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "the model file already holds its vision tower and projector; "
                          "an mmproj file goes only with a text-only GGUF (llama.cpp's two-file layout): "
                          "load the model without the mmproj");
    }
    has_vision = has_vision || mmproj != NULL;
    *out = has_vision ? &vtrim_arch_llava : &vtrim_arch_llama;
    return 0;
}

const struct vtrim_chat_template * vtrim_arch_chat_template(const char * name) {
    for (size_t i = 0; i < sizeof k_arches / sizeof k_arches[0]; i++) {
        for (const struct vtrim_chat_template * t = k_arches[i]->chat_templates; t && t->name; t++) {
            if (strcmp(t->name, name) == 0) {
                return t;
            }
        }
    }
    return NULL;
}

int32_t vtrim_arch_read_chat_template(struct vtrim_model * m, const struct gguf_context * g, const char * fallback) {
    char name[32] = "";
    const int32_t rc = vtrim_gguf_str(g, "vtrim.chat_format", name, sizeof name, false);
    if (rc < 0) {
        return rc;
    }
    m->chat = vtrim_arch_chat_template(name);
    if (!m->chat) {
        m->chat = vtrim_arch_chat_template(fallback);
    }
    return 0;
}

int32_t vtrim_arch_read_image_common(const struct gguf_context * g, const char * prefix, float mean[3], float std[3],
                                     int32_t * resample, float * rescale, bool * do_normalize) {
    char mean_key[64], std_key[64];
    snprintf(mean_key, sizeof mean_key, "%s.image_mean", prefix);
    snprintf(std_key, sizeof std_key, "%s.image_std", prefix);
    int32_t rc;
    if ((rc = vtrim_gguf_f32_array(g, mean_key, mean, 3, false)) < 0 ||
        (rc = vtrim_gguf_f32_array(g, std_key, std, 3, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.resample", resample, false)) < 0 ||
        (rc = vtrim_gguf_f32(g, "vtrim.image.rescale_factor", rescale, false)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_normalize", do_normalize, false)) < 0) {
        return rc;
    }
    return 0;
}

static char * append(char * p, const char * s) {
    const size_t n = strlen(s);
    memcpy(p, s, n);
    return p + n;
}

int32_t vtrim_chat_template_format(const struct vtrim_chat_template * t, const char * image, int32_t n_images,
                                   const char * question, char * text, int32_t n_max, int32_t * n_out) {
    // Sized before anything is allocated: a probe (n_max = 0) or an impossible n_images costs no memory.
    const size_t per_image = strlen(image) + strlen(t->image_sep);
    const size_t fixed = strlen(t->prefix) + strlen(question) + strlen(t->suffix);
    if (fixed > INT32_MAX || (per_image > 0 && (size_t) n_images > (INT32_MAX - fixed) / per_image)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_chat_format: the prompt would exceed 2^31 - 1 bytes");
    }
    const size_t len = fixed + (size_t) n_images * per_image;
    *n_out = (int32_t) len;
    if ((int32_t) len > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_chat_format: needs %zu bytes", len);
    }
    // The caller's buffer need not hold the NUL, so the pieces are copied rather than printed.
    char * p = append(text, t->prefix);
    for (int32_t i = 0; i < n_images; i++) {
        p = append(append(p, image), t->image_sep);
    }
    append(append(p, question), t->suffix);
    return 0;
}
