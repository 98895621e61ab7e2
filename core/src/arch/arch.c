// Which architecture a GGUF holds, and the LLaVA glue: image token, chat format, image preprocessing.
#include "arch/arch.h"

#include "error.h"
#include "gguf_util.h"
#include "vocab.h"

#include "gguf.h"

#include <string.h>

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
    if (strcmp(arch, "llama") != 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "unknown architecture '%s' (supported: llama with a CLIP vision "
                          "tower = LLaVA-1.5)", arch);
    }
    if ((rc = vtrim_llama_read_hparams(m, text)) < 0) {
        return rc;
    }
    const struct gguf_context * vis = NULL;
    bool legacy = false;
    if (mmproj) {
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
    if ((rc = vtrim_gguf_i32(text, "vtrim.image_token_id", &m->image_token_id, false)) < 0) {
        return rc;
    }
    if (m->image_token_id < 0) {
        m->image_token_id = vtrim_vocab_find(m->vocab, "<image>");
    }
    if (m->image_token_id < 0 || m->image_token_id >= m->text.n_vocab) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "no image token: vtrim.image_token_id is missing and the vocabulary "
                          "has no '<image>'");
    }
    return 0;
}

int32_t vtrim_arch_bind_tensors(struct vtrim_model * m) {
    int32_t rc = vtrim_llama_bind_tensors(m);
    if (rc == 0 && m->has_vision) {
        rc = vtrim_clip_bind_tensors(m);
    }
    return rc;
}
