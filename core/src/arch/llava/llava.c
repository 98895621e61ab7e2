// LLaVA-1.5's entry of the architecture table: the Llama decoder with the CLIP tower's image embeddings as
// decoder rows; the image token, the chat template, the image processor and the encode loop.
#include "arch/arch.h"

#include "api/error.h"
#include "attn_probe.h"
#include "arch/llama/llama.h"
#include "arch/llava/clip.h"
#include "image/image.h"
#include "model/gguf_util.h"
#include "runtime/context.h"
#include "runtime/image_cache.h"
#include "runtime/stages.h"
#include "vocab/vocab.h"

#include "gguf.h"

#include <stdlib.h>
#include <string.h>

static const char k_image_text[] = "<image>";   // LLaVA's image placeholder

struct llava_state {
    struct vtrim_clip     clip;
    struct vtrim_image_pp pp;
};

static const struct llava_state * state(const struct vtrim_model * m) { return m->arch_state; }

// The image processor of the checkpoint, from vtrim.image.* (our layout) or clip.* (llama.cpp's layout).
static int32_t read_image_pp(struct vtrim_image_pp * pp, int32_t size, const struct gguf_context * g) {
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
    if ((rc = vtrim_arch_read_image_common(g, "clip.vision", pp->mean, pp->std, &pp->resample, &rescale,
                                           &pp->do_normalize)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_pad", &pp->do_pad, false)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_resize", &pp->do_resize, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.shortest_edge", &pp->shortest_edge, false)) < 0 ||
        (rc = vtrim_gguf_bool(g, "vtrim.image.do_center_crop", &pp->do_center_crop, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.crop_height", &pp->crop_h, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, "vtrim.image.crop_width", &pp->crop_w, false)) < 0) {
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

static int32_t llava_read_hparams(struct vtrim_model * m, const struct gguf_context * text,
                                  const struct gguf_context * mmproj) {
    int32_t rc;
    if ((rc = vtrim_llama_read_hparams(m, text, "llama")) < 0) {
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
        vis = text;   // vtrim_arch_detect chose LLaVA: the file says it has the vision tower
    }
    m->image_token_id = -1;
    if ((rc = vtrim_arch_read_chat_template(m, text, "llava-1.5")) < 0) {
        return rc;
    }
    struct llava_state * s = calloc(1, sizeof *s);
    if (!s) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    m->arch_state = s;
    m->has_vision = true;
    if ((rc = vtrim_clip_read_hparams(&s->clip, vis, legacy)) < 0 ||
        (rc = read_image_pp(&s->pp, s->clip.hp.image_size, vis)) < 0) {
        return rc;
    }
    m->vision.image_size = s->clip.hp.image_size;
    m->vision.n_layer_run = s->clip.hp.n_layer_run;
    m->vision.n_image_tokens = s->clip.hp.n_image_tokens;
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

static const char * llava_image_placeholder(const struct vtrim_model * m) {
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

static int32_t llava_tokenize(const struct vtrim_model * m, const char * text, int32_t text_len, bool add_special,
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

static int32_t llava_bind_tensors(struct vtrim_model * m) {
    int32_t rc = vtrim_llama_bind_tensors(m, NULL);
    return rc < 0 ? rc : vtrim_clip_bind_tensors(&((struct llava_state *) m->arch_state)->clip, m);
}

static void llava_model_free(struct vtrim_model * m) {
    struct llava_state * s = m->arch_state;
    if (s) {
        vtrim_clip_free(&s->clip);
        free(s);
        m->arch_state = NULL;
    }
}

static int32_t llava_image_preprocess(const struct vtrim_model * m, const struct vtrim_image * image, float * pixels,
                                      int64_t n_max, int64_t * n_out) {
    const struct llava_state * s = state(m);
    const int32_t size = s->clip.hp.image_size;
    int32_t w = 0, h = 0;
    int32_t rc = vtrim_image_pp_output_size(image, &s->pp, &w, &h);
    if (rc < 0) {
        return rc;
    }
    if (w != size || h != size) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "the image processor makes %dx%d pixels; the vision tower takes %dx%d",
                          w, h, size, size);
    }
    const int64_t n = 3 * (int64_t) w * h;
    *n_out = n;
    if (n > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_image_preprocess: needs %lld floats", (long long) n);
    }
    return vtrim_image_preprocess_clip(image, &s->pp, pixels);
}

static int32_t llava_image_tiles(const struct vtrim_model * m, const struct vtrim_image * image, int32_t * n_tiles,
                                 int32_t * aspect_ratio_id) {
    *n_tiles = 1;
    *aspect_ratio_id = 0;
    return 0;
}

// The tower's FLOPs from inside layer il (after its attention half) to the end, on n rows.
static double rest_flops(const struct vtrim_clip * v, int il, double n) {
    double f = vtrim_clip_mlp_flops(v, n) + vtrim_clip_head_flops(v, n);
    for (int l = il + 1; l < v->hp.n_layer_run; l++) {
        f += vtrim_clip_attn_flops(v, n) + vtrim_clip_mlp_flops(v, n);
    }
    return f;
}

// One image through the tower, split where encoder policies act (VTRIM_HOOK_VISION_ENCODER): inside each of
// their step layers, after the attention half. Each part is a graph ending with a step layer's attention
// half (and, when the policy asks for it, that layer's head-mean logit matrix); between parts the policy
// keeps and merges rows on the host; the next part starts with that layer's MLP half. out receives
// [*n_rows][n_embd_text].
static int32_t encode_one(struct vtrim_context * c, const struct vtrim_clip * v, const float * pixels, float * out,
                          int32_t * n_rows, int32_t * src) {
    const int32_t d = v->hp.n_embd, n_run = v->hp.n_layer_run, n0 = v->hp.n_patches + 1;
    int32_t n_points = 0;
    for (int32_t i = 0; i < c->policies.n; i++) {
        n_points += c->policies.items[i].r->hook == VTRIM_HOOK_VISION_ENCODER ? c->policies.items[i].n_steps : 0;
    }
    int32_t * pol = malloc(sizeof(int32_t) * (size_t) (2 * n_points + 1));
    int32_t * orig = malloc(sizeof(int32_t) * (size_t) n0);
    float * h = NULL, * attn = NULL;
    if (!pol || !orig) {
        free(pol);
        free(orig);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    int32_t * step = pol + n_points;
    // Policies of one hook come in layer order and do not interleave (vtrim_policy_list_add).
    for (int32_t i = 0, k = 0; i < c->policies.n; i++) {
        for (int32_t s = 0; c->policies.items[i].r->hook == VTRIM_HOOK_VISION_ENCODER &&
                            s < c->policies.items[i].n_steps; s++, k++) {
            pol[k] = i;
            step[k] = s;
        }
    }
    for (int32_t i = 0; i < n0; i++) {
        orig[i] = i;
    }
    int32_t rc = 0, n = n0, il = 0, mlp_layer = -1;
    for (int32_t part = 0; part <= n_points && rc == 0; part++) {
        const bool last = part == n_points;
        const struct vtrim_policy * p = last ? NULL : &c->policies.items[pol[part]];
        const int il1 = last ? n_run : p->step_layers[step[part]];
        struct ggml_context * gctx;
        struct ggml_cgraph * gf;
        if ((rc = vtrim_context_graph_new(c, &gctx, &gf)) < 0) {
            break;
        }
        struct ggml_tensor * inp, * cur, * logits = NULL;
        if (part == 0) {
            cur = vtrim_clip_build_embed(gctx, v, &inp);
        } else {
            inp = cur = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, d, n);
            ggml_set_input(inp);
            cur = vtrim_clip_build_mlp(gctx, v, cur, mlp_layer);
        }
        cur = vtrim_clip_build_layers(gctx, v, cur, il, il1);
        if (last) {
            cur = vtrim_clip_build_head(gctx, v, cur, true);
        } else {
            struct ggml_tensor * q, * k;
            cur = vtrim_clip_build_attn(gctx, v, cur, il1, &q, &k);
            if (p->r->scores.matrix) {
                logits = vtrim_attn_logits_head_mean(gctx, q, k, vtrim_clip_attn_scale(v));
                ggml_set_output(logits);
                ggml_build_forward_expand(gf, logits);
            }
        }
        ggml_set_output(cur);
        ggml_build_forward_expand(gf, cur);
        float * dst = last ? out : (h = realloc(h, sizeof(float) * (size_t) n * d));
        if (logits) {
            attn = realloc(attn, sizeof(float) * (size_t) n * n);
        }
        if (!dst || (logits && !attn)) {
            rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the vision states");
        } else {
            const struct vtrim_tensor_io in_io = { inp, part == 0 ? (void *) pixels : h };
            const struct vtrim_tensor_io out_io[] = { { cur, dst }, { logits, attn } };
            rc = vtrim_context_graph_run(c, gf, &in_io, 1, out_io, logits ? 2 : 1);
        }
        ggml_free(gctx);
        if (rc == 0 && last) {
            *n_rows = (int32_t) cur->ne[1];
            for (int32_t r = 0; r < *n_rows; r++) {   // the head dropped the CLS row unless it keeps it
                src[r] = v->hp.keep_cls ? orig[r] : orig[r + 1] - 1;
            }
        } else if (rc == 0) {
            const struct vtrim_vision_step vs = { .step = step[part], .attn = logits ? attn : NULL, .orig = orig,
                                                  .grid = v->hp.image_size / v->hp.patch_size };
            struct vtrim_reduce_stage * st = NULL;
            int32_t n_kept = n;
            rc = vtrim_stage_vision(c, p, &vs, h, n, d, &n_kept, &st);
            if (rc == 0) {
                st->flops_saved += rest_flops(v, il1, n) - rest_flops(v, il1, n_kept);
                n = n_kept;
            }
            mlp_layer = il1;
            il = il1 + 1;
        }
    }
    free(h);
    free(attn);
    free(pol);
    free(orig);
    return rc;
}

static int32_t llava_encode(struct vtrim_context * c, struct vtrim_image * const * images, int32_t n_images) {
    const struct vtrim_model * m = c->model;
    const struct vtrim_clip * v = &state(m)->clip;
    const int64_t n_embd = m->text.n_embd;
    int32_t rc = vtrim_context_reserve_images(c, n_images, v->hp.n_image_tokens);
    const int64_t n_pix = 3 * (int64_t) v->hp.image_size * v->hp.image_size;
    float * pixels = rc == 0 ? malloc((size_t) n_pix * sizeof(float)) : NULL;
    if (rc == 0 && !pixels) {
        rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for pixels");
    }
    // an encoder reduction makes the rows depend on its parameters too: no cache then
    bool cacheable = m->image_cache != NULL;
    for (int32_t i = 0; i < c->policies.n; i++) {
        cacheable &= c->policies.items[i].r->hook != VTRIM_HOOK_VISION_ENCODER;
    }
    size_t off = 0;
    for (int32_t i = 0; i < n_images && rc == 0; i++) {
        int64_t n_out = 0;
        if ((rc = llava_image_preprocess(m, images[i], pixels, n_pix, &n_out)) < 0) {
            vtrim_fail_prefix(rc, "image %d: ", i);
            break;
        }
        float * embd = c->img.embd + off * n_embd;
        const uint64_t key = cacheable ? vtrim_image_cache_key(pixels, n_pix) : 0;
        if (cacheable && vtrim_image_cache_get(m->image_cache, key, (int32_t) n_embd, v->hp.n_image_tokens, embd,
                                               c->img.src + off, &c->img.n_rows[i])) {
            c->img.n_cached++;
        } else {
            rc = encode_one(c, v, pixels, embd, &c->img.n_rows[i], c->img.src + off);
            if (rc == 0 && cacheable) {
                vtrim_image_cache_put(m->image_cache, key, (int32_t) n_embd, c->img.n_rows[i], embd, c->img.src + off);
            }
        }
        off += (size_t) c->img.n_rows[i];
    }
    c->img.n_images = rc == 0 ? n_images : 0;
    free(pixels);
    return rc;
}

static void llava_reduce_caps(const struct vtrim_model * m, struct vtrim_reduce_caps * caps) {
    caps->image_rows_in_decoder = true;
    caps->n_vision_layer = m->vision.n_layer_run;
    caps->vision_grid = state(m)->clip.hp.image_size / state(m)->clip.hp.patch_size;
}

// llava-hf's chat template: "USER: <image>\n{question} ASSISTANT:"
static const struct vtrim_chat_template k_templates[] = {
    { "llava-1.5", "USER: ", "\n", " ASSISTANT:" },
    { NULL, NULL, NULL, NULL },
};

const struct vtrim_arch vtrim_arch_llava = {
    .name = "llava",
    .image_rows_in_decoder = true,
    .chat_templates = k_templates,
    .read_hparams = llava_read_hparams,
    .bind_tensors = llava_bind_tensors,
    .model_free = llava_model_free,
    .tokenize = llava_tokenize,
    .image_placeholder = llava_image_placeholder,
    .image_preprocess = llava_image_preprocess,
    .image_tiles = llava_image_tiles,
    .encode = llava_encode,
    .reduce_caps = llava_reduce_caps,
};
