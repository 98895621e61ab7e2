// mllama's part of a context: the cross-attention cache and its images, which prompt rows see which image,
// the cross-attention layers' inputs in the decoder graph, and the cross-attention hook (Trimmed Llama).
#include "arch/mllama/mllama.h"

#include "api/error.h"
#include "arch/llama/llama.h"
#include "reduce/reduce.h"
#include "runtime/context.h"
#include "runtime/forward.h"
#include "runtime/image_cache.h"
#include "runtime/stages.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct vtrim_mllama_ctx {
    struct vtrim_context *   c;
    struct vtrim_cross_cache xc;
    int32_t                  n_images;
    int32_t *                off;        // first row of each image in xc
    int32_t *                visible;    // rows of each image's real tiles (the padded tiles follow, masked)
    uint32_t                 last_sees;  // images the sequence's last row sees (decoding continues it)
    int32_t                  image_end;  // one past the sequence position of the last image token (0: none)
    int32_t                  image_end_pending;   // the same for the prefill in progress
    bool                     encoded;    // images came with the prefill in progress
    // the inputs of the decoder graph being built (vtrim_decoder_ext)
    struct vtrim_decoder_ext ext;
    struct ggml_tensor *     cross_mask, * cross_mask_kept, * row_mask;
    float *                  buf;        // host copies of those masks
    size_t                   buf_cap;
};

static struct vtrim_mllama_ctx * state(const struct vtrim_context * c) { return c->arch_state; }

static void ext_begin(void * user, struct ggml_context * ctx, int il0, int il1, int32_t n);
static struct ggml_tensor * ext_build_layer(void * user, struct ggml_context * ctx, int il, struct ggml_tensor * cur);
static int32_t ext_set_inputs(void * user, const struct vtrim_rows * rows, int32_t a, int32_t n,
                              struct vtrim_tensor_io * io, int * n_io);

int32_t vtrim_mllama_context_init(struct vtrim_context * c) {
    struct vtrim_mllama_ctx * s = calloc(1, sizeof *s);
    const int32_t max_images = vtrim_mllama_of(c->model)->hp.max_images;
    if (s) {
        s->off = calloc((size_t) max_images, sizeof *s->off);
        s->visible = calloc((size_t) max_images, sizeof *s->visible);
    }
    c->arch_state = s;
    if (!s || !s->off || !s->visible) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    s->c = c;
    s->ext = (struct vtrim_decoder_ext) { s, ext_begin, ext_build_layer, ext_set_inputs };
    return 0;
}

void vtrim_mllama_context_free(struct vtrim_context * c) {
    struct vtrim_mllama_ctx * s = state(c);
    vtrim_cross_cache_free(&s->xc);
    free(s->off);
    free(s->visible);
    free(s->buf);
    free(s);
    c->arch_state = NULL;
}

void vtrim_mllama_context_reset(struct vtrim_context * c) {
    struct vtrim_mllama_ctx * s = state(c);
    s->xc.n = 0;
    s->n_images = 0;
    s->last_sees = 0;
    s->image_end = 0;
}

// Rows after the last image token all see the same images, so dropping only such rows leaves the cross cache
// and what the next row sees as they are (exact prefix reuse); dropping an image's token is refused.
int32_t vtrim_mllama_truncate(struct vtrim_context * c, int32_t n_keep) {
    const struct vtrim_mllama_ctx * s = state(c);
    if (n_keep < s->image_end) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "truncating to %d positions would drop the image token at position "
                          "%d: Llama-3.2-Vision's images live in the cross-attention cache (reset instead)", n_keep,
                          s->image_end - 1);
    }
    return 0;
}

int64_t vtrim_mllama_cache_bytes(const struct vtrim_context * c) { return vtrim_cross_cache_bytes_used(&state(c)->xc); }

int32_t vtrim_mllama_prefill_check(const struct vtrim_context * c, int32_t n_images) {
    const int32_t max_images = vtrim_mllama_of(c->model)->hp.max_images;
    if (n_images > max_images) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "%d images in one prompt: Llama-3.2-Vision takes at most %d",
                          n_images, max_images);
    }
    if (n_images > 0 && state(c)->n_images > 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "this conversation already has its images: Llama-3.2-Vision takes "
                          "images in one turn (reset the context for new ones)");
    }
    return 0;
}

// The image cache's key: the preprocessed tiles and their layout (the aspect ratio id; the pixels of padded
// tiles are zeros either way).
static uint64_t image_key(const float * pixels, int64_t n_pix, int32_t ar_id, int32_t n_tiles) {
    const uint64_t h = vtrim_image_cache_key(pixels, n_pix);
    return h ^ (((uint64_t) (uint32_t) ar_id << 32 | (uint32_t) n_tiles) * 0x9E3779B97F4A7C15ull);
}

// Each image through the vision tower, its states' K/V written into the cross-attention cache. With a trim to
// come, only the first cross layer's K/V are computed and the states are kept for the hook. The tower's output
// (the projected states) goes into the model's image cache; an image found there skips the tower, and only
// its K/V are computed again (a matrix product per cross layer).
int32_t vtrim_mllama_encode(struct vtrim_context * c, struct vtrim_image * const * images, int32_t n_images) {
    const struct vtrim_model * m = c->model;
    const struct vtrim_mllama * v = vtrim_mllama_of(m);
    const struct vtrim_mllama_hparams * hp = &v->hp;
    struct vtrim_mllama_ctx * s = state(c);
    struct vtrim_cross_cache * xc = &s->xc;
    const bool trim_pending = vtrim_policy_list_has_hook(&c->policies, VTRIM_HOOK_CROSS_ATTN);
    const int32_t per_image = hp->max_tiles * hp->n_pos;
    const int32_t L = hp->max_tiles * (hp->n_pos + hp->n_pad);
    const int64_t n_embd = m->text.n_embd;
    const bool cacheable = m->image_cache != NULL;
    int32_t rc = 0;
    s->encoded = true;
    if (xc->n_rows < n_images * per_image || (trim_pending && !xc->states)) {
        vtrim_cross_cache_free(xc);
        rc = vtrim_cross_cache_init(xc, hp->n_cross, n_images * per_image, m->text.head_dim * m->text.n_head_kv,
                                    c->kv.type, ggml_backend_dev_buffer_type(m->dev), trim_pending ? m->text.n_embd : 0);
        if (rc < 0) {
            return rc;
        }
    }
    xc->n_kept = 0;
    memset(xc->trimmed, 0, sizeof(bool) * (size_t) xc->n_layer);
    const int64_t n_pix = (int64_t) hp->max_tiles * 3 * hp->tile_size * hp->tile_size;
    float * pixels = malloc(sizeof(float) * (size_t) n_pix);
    ggml_fp16_t * mask = malloc(sizeof(ggml_fp16_t) * (size_t) L * L);
    float * states_host = cacheable ? malloc(sizeof(float) * (size_t) (n_embd * per_image)) : NULL;
    int32_t * src = cacheable ? calloc((size_t) per_image, sizeof(int32_t)) : NULL;   // the cache's row origins
    if (!pixels || !mask || (cacheable && (!states_host || !src))) {
        rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the image");
    }
    for (int32_t i = 0; i < n_images && rc == 0; i++) {
        int32_t n_tiles = 0, ar_id = 0, n_rows = 0;
        if ((rc = vtrim_mllama_preprocess(images[i], &v->pp, pixels, &n_tiles, &ar_id, NULL, NULL)) < 0) {
            vtrim_fail_prefix(rc, "image %d: ", i);
            break;
        }
        const uint64_t key = cacheable ? image_key(pixels, n_pix, ar_id, n_tiles) : 0;
        const bool hit = cacheable && vtrim_image_cache_get(m->image_cache, key, (int32_t) n_embd, per_image,
                                                            states_host, src, &n_rows) && n_rows == per_image;
        if (!hit) {
            vtrim_mllama_vision_mask(v, n_tiles, mask);
        }
        struct ggml_context * gctx;
        struct ggml_cgraph * gf;
        if ((rc = vtrim_context_graph_new(c, &gctx, &gf)) < 0) {
            break;
        }
        struct vtrim_mllama_vision_inputs in;
        struct ggml_tensor * states;
        if (hit) {
            states = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, n_embd, per_image);
            ggml_set_input(states);
        } else {
            states = vtrim_mllama_build_vision(gctx, gf, v, &m->vision_attn, n_tiles, &in);
            if (cacheable) {
                ggml_set_output(states);
            }
        }
        vtrim_mllama_build_cross_kv(gctx, gf, m, xc, states, i * per_image, 0, trim_pending ? 1 : hp->n_cross);
        if (trim_pending) {
            const size_t row = ggml_row_size(GGML_TYPE_F32, m->text.n_embd);
            ggml_build_forward_expand(gf, ggml_cpy(gctx, states, ggml_view_2d(gctx, xc->states, m->text.n_embd,
                                                                               per_image, row, row * i * per_image)));
        }
        if (hit) {
            const struct vtrim_tensor_io io[] = { { states, states_host } };
            rc = vtrim_context_graph_run(c, gf, io, 1, NULL, 0);
            c->img.n_cached += rc == 0;
        } else {
            const struct vtrim_tensor_io io[] = { { in.pixels, pixels }, { in.ar_id, &ar_id }, { in.mask, mask } };
            const struct vtrim_tensor_io out[] = { { states, states_host } };
            rc = vtrim_context_graph_run(c, gf, io, 3, out, cacheable ? 1 : 0);
            if (rc == 0 && cacheable) {
                vtrim_image_cache_put(m->image_cache, key, (int32_t) n_embd, per_image, states_host, src);
            }
        }
        ggml_free(gctx);
        s->off[i] = i * per_image;
        s->visible[i] = n_tiles * hp->n_pos;
    }
    free(pixels);
    free(mask);
    free(states_host);
    free(src);
    if (rc == 0) {
        xc->n = n_images * per_image;
        s->n_images = n_images;
    }
    return rc;
}

// HF's get_cross_attention_token_mask: image k from its token to the next image's token (the last to the end),
// consecutive images together.
int32_t vtrim_mllama_cross_visibility(int32_t image_token_id, const int32_t * tokens, int32_t n, uint32_t * sees) {
    int32_t n_img = 0;
    for (int32_t i = 0; i < n; i++) {
        n_img += tokens[i] == image_token_id;
    }
    if (n_img > 32) {   // a row's images are bits of a uint32_t; HF's checkpoints take 1 image
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "%d images in one prompt (at most 32)", n_img);
    }
    int32_t loc[32], end[32], k = 0;
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] == image_token_id) {
            loc[k++] = i;
        }
    }
    for (k = 0; k < n_img; k++) {
        end[k] = k + 1 < n_img ? loc[k + 1] : INT32_MAX;
    }
    for (k = n_img - 2; k >= 0; k--) {
        if (loc[k] == end[k] - 1) {
            end[k] = end[k + 1];
        }
    }
    for (int32_t r = 0; r < n; r++) {
        sees[r] = 0;
        for (k = 0; k < n_img; k++) {
            if (loc[k] <= r && r < end[k]) {
                sees[r] |= 1u << k;
            }
        }
    }
    return 0;
}

int32_t vtrim_mllama_prepare_rows(struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens,
                                  struct vtrim_rows * rows) {
    if (!state(c)->encoded) {
        return 0;   // no new images: every row sees what the sequence's last row saw
    }
    uint32_t * sees = malloc(sizeof(uint32_t) * (size_t) n_tokens);
    if (!sees) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    rows->arch_rows = sees;
    for (int32_t i = n_tokens - 1; i >= 0; i--) {
        if (tokens[i] == c->model->image_token_id) {
            state(c)->image_end_pending = c->n_past + i + 1;
            break;
        }
    }
    return vtrim_mllama_cross_visibility(c->model->image_token_id, tokens, n_tokens, sees);
}

static uint32_t sees_of(const struct vtrim_mllama_ctx * s, const struct vtrim_rows * rows, int32_t r) {
    return rows->arch_rows ? ((const uint32_t *) rows->arch_rows)[r] : s->last_sees;
}

void vtrim_mllama_prefill_end(struct vtrim_context * c, const struct vtrim_rows * rows, bool ok) {
    struct vtrim_mllama_ctx * s = state(c);
    if (ok) {
        s->last_sees = sees_of(s, rows, rows->n - 1);
        if (s->encoded) {
            s->image_end = s->image_end_pending;
        }
    } else if (s->encoded) {   // the images of a failed prefill are forgotten with it
        s->xc.n = 0;
        s->n_images = 0;
    }
    s->encoded = false;
}

int32_t vtrim_mllama_image_result(struct vtrim_context * c, int32_t n_images, int32_t * n_image_tokens,
                                  int32_t * n_kept) {
    const struct vtrim_mllama_ctx * s = state(c);
    const struct vtrim_cross_cache * xc = &s->xc;
    int32_t n_visible = 0;
    for (int32_t i = 0; n_images > 0 && i < s->n_images; i++) {
        n_visible += s->visible[i];
    }
    *n_image_tokens = n_visible;
    *n_kept = xc->n_kept > 0 ? xc->n_kept : n_visible;
    if (n_images == 0) {
        return 0;
    }
    // The image states the trimmed layers hold (all real-tile states when nothing was trimmed), as rows of
    // the prefill's image-major states.
    if (xc->n_kept > 0) {
        return vtrim_context_set_kept(c, xc->kept, xc->n_kept);
    }
    int32_t * rows = malloc(sizeof(int32_t) * (size_t) (xc->n > 0 ? xc->n : 1));
    if (!rows) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    int32_t n = 0;
    for (int32_t i = 0; i < s->n_images; i++) {
        for (int32_t j = s->off[i]; j < s->off[i] + s->visible[i]; j++) {
            rows[n++] = j;
        }
    }
    const int32_t rc = vtrim_context_set_kept(c, rows, n);
    free(rows);
    return rc;
}

// The cross-attention mask ([n][xc.n]) of rows [a, a + n) and their row mask (0 for rows that see no image;
// may be NULL). A row that sees no image attends uniformly to every state, as HF does.
static void fill_cross_mask(const struct vtrim_mllama_ctx * s, const struct vtrim_rows * rows, int32_t a, int32_t n,
                            float * cross_mask, float * row_mask) {
    const int32_t n_x = s->xc.n;
    for (int32_t r = 0; r < n; r++) {
        const uint32_t seen = sees_of(s, rows, a + r);
        float * mr = cross_mask + (size_t) r * n_x;
        if (row_mask) {
            row_mask[r] = seen ? 1.0f : 0.0f;
        }
        for (int32_t j = 0; j < n_x; j++) {
            mr[j] = seen ? -INFINITY : 0.0f;
        }
        for (int32_t i = 0; i < s->n_images; i++) {
            if (seen & (1u << i)) {
                for (int32_t j = s->off[i]; j < s->off[i] + s->visible[i]; j++) {
                    mr[j] = 0.0f;
                }
            }
        }
    }
}

const struct vtrim_decoder_ext * vtrim_mllama_decoder_ext(struct vtrim_context * c) { return &state(c)->ext; }

// Cross-attention layers are skipped until an image is cached (HF). Inputs only for the layers in range:
// a tensor no node uses gets no buffer.
static void ext_begin(void * user, struct ggml_context * ctx, int il0, int il1, int32_t n) {
    struct vtrim_mllama_ctx * s = user;
    const struct vtrim_mllama * v = vtrim_mllama_of(s->c->model);
    const struct vtrim_cross_cache * xc = &s->xc;
    s->cross_mask = s->cross_mask_kept = s->row_mask = NULL;
    bool any_full = false, any_kept = false;
    for (int il = il0; xc->n > 0 && il < il1; il++) {
        const int32_t ix = v->cross_index[il];
        if (ix >= 0) {
            any_kept |= xc->trimmed[ix];
            any_full |= !xc->trimmed[ix];
        }
    }
    if (any_full) {
        s->cross_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, xc->n, n);
        ggml_set_input(s->cross_mask);
    }
    if (any_kept) {
        s->cross_mask_kept = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, xc->n_kept, n);
        ggml_set_input(s->cross_mask_kept);
    }
    if (any_full || any_kept) {
        s->row_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n);
        ggml_set_input(s->row_mask);
    }
}

static struct ggml_tensor * ext_build_layer(void * user, struct ggml_context * ctx, int il, struct ggml_tensor * cur) {
    struct vtrim_mllama_ctx * s = user;
    const struct vtrim_model * m = s->c->model;
    if (s->xc.n == 0) {
        return cur;
    }
    const bool trimmed = s->xc.trimmed[vtrim_mllama_of(m)->cross_index[il]];
    cur = vtrim_mllama_build_cross_layer(ctx, m, il, &s->xc, cur, trimmed ? s->cross_mask_kept : s->cross_mask,
                                         s->row_mask);
    vtrim_cb(cur, "l_out", il);
    return cur;
}

static int32_t ext_set_inputs(void * user, const struct vtrim_rows * rows, int32_t a, int32_t n,
                              struct vtrim_tensor_io * io, int * n_io) {
    struct vtrim_mllama_ctx * s = user;
    const struct vtrim_cross_cache * xc = &s->xc;
    *n_io = 0;
    if (!s->row_mask) {
        return 0;
    }
    const size_t need = (size_t) n * (xc->n + xc->n_kept + 1);
    if (need > s->buf_cap) {
        float * p = realloc(s->buf, sizeof(float) * need);
        if (!p) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the cross-attention masks");
        }
        s->buf = p;
        s->buf_cap = need;
    }
    float * full = s->buf, * kept = full + (size_t) n * xc->n, * row_mask = kept + (size_t) n * xc->n_kept;
    fill_cross_mask(s, rows, a, n, full, row_mask);
    // The mask of the trimmed layers: the columns gathered with the trim's indices.
    for (int32_t r = 0; r < n; r++) {
        for (int32_t j = 0; j < xc->n_kept; j++) {
            kept[(size_t) r * xc->n_kept + j] = full[(size_t) r * xc->n + xc->kept[j]];
        }
    }
    io[0] = (struct vtrim_tensor_io) { s->cross_mask, full };
    io[1] = (struct vtrim_tensor_io) { s->cross_mask_kept, kept };
    io[2] = (struct vtrim_tensor_io) { s->row_mask, row_mask };
    *n_io = 3;
    return 0;
}

// The cross-attention hook at the first cross layer: rank the image states by the probabilities of the rows
// that see an image (per head), let the method choose, and compute the later layers' K/V from the kept states.
int32_t vtrim_mllama_cross_attn_stage(struct vtrim_context * c, const struct vtrim_policy * p,
                                      const struct vtrim_rows * rows, const float * h_in) {
    const struct vtrim_model * m = c->model;
    const struct vtrim_text_hparams * hp = &m->text;
    const int32_t n_cross = vtrim_mllama_of(m)->hp.n_cross;
    struct vtrim_mllama_ctx * s = state(c);
    struct vtrim_cross_cache * xc = &s->xc;
    const int32_t n_x = xc->n, n_embd = hp->n_embd;
    if (n_x == 0) {
        return 0;   // no image cached: nothing to trim
    }
    int32_t n_cand = 0;
    for (int32_t i = 0; i < s->n_images; i++) {
        n_cand += s->visible[i];
    }
    int32_t * q_rows = malloc(sizeof(int32_t) * (size_t) rows->n);
    int32_t n_q = 0;
    for (int32_t r = 0; q_rows && r < rows->n; r++) {
        if (sees_of(s, rows, r)) {
            q_rows[n_q++] = r;
        }
    }
    float * h = malloc(sizeof(float) * (size_t) (n_q > 0 ? n_q : 1) * n_embd);
    float * mask = malloc(sizeof(float) * (size_t) (n_q > 0 ? n_q : 1) * n_x);
    float * scores = malloc(sizeof(float) * (size_t) n_x * hp->n_head);
    struct vtrim_rows q = { .n = n_q, .arch_rows = malloc(sizeof(uint32_t) * (size_t) (n_q > 0 ? n_q : 1)) };
    int32_t rc = (q_rows && h && mask && scores && q.arch_rows) ? 0
                 : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    struct vtrim_reduce_output o = { .kept = xc->kept };
    struct ggml_context * gctx;
    struct ggml_cgraph * gf;
    if (rc == 0 && n_q == 0) {
        xc->n_kept = 0;   // no text sees an image: nothing ranks the states; they stay untrimmed
    } else if (rc == 0 && (rc = vtrim_context_graph_new(c, &gctx, &gf)) == 0) {
        for (int32_t i = 0; i < n_q; i++) {
            memcpy(h + (size_t) i * n_embd, h_in + (size_t) q_rows[i] * n_embd, sizeof(float) * (size_t) n_embd);
            ((uint32_t *) q.arch_rows)[i] = sees_of(s, rows, q_rows[i]);
        }
        fill_cross_mask(s, &q, 0, n_q, mask, NULL);
        struct ggml_tensor * th = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, n_embd, n_q);
        struct ggml_tensor * tm = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, n_x, n_q);
        ggml_set_input(th);
        ggml_set_input(tm);
        struct ggml_tensor * probs = vtrim_mllama_build_cross_probe(gctx, m, xc, p->layer, th, tm);
        ggml_set_output(probs);
        ggml_build_forward_expand(gf, probs);
        const struct vtrim_tensor_io in[] = { { th, h }, { tm, mask } };
        const struct vtrim_tensor_io out[] = { { probs, scores } };
        rc = vtrim_context_graph_run(c, gf, in, 2, out, 1);
        ggml_free(gctx);
        if (rc == 0) {
            const struct vtrim_reduce_input ri = { .n = n_x, .scores = scores, .n_head = hp->n_head,
                                                   .n_groups = s->n_images, .group_off = s->off,
                                                   .group_len = s->visible };
            rc = p->r->apply(p->params, &ri, &o);
        }
        if (rc == 0 && o.n_merge > 0) {
            rc = vtrim_fail(VTRIM_ERR_UNSUPPORTED, "%s: the cross-attention hook does not merge", p->r->name);
        }
        xc->n_kept = rc == 0 ? o.n_kept : 0;
    }
    // K/V of the trimmed layers from the kept states only.
    const int32_t i0 = o.include_hook_layer ? 0 : 1;
    if (rc == 0 && xc->n_kept > 0 && i0 < n_cross && (rc = vtrim_context_graph_new(c, &gctx, &gf)) == 0) {
        struct ggml_tensor * idx = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, xc->n_kept);
        ggml_set_input(idx);
        vtrim_mllama_build_cross_kv(gctx, gf, m, xc, ggml_get_rows(gctx, xc->states, idx), 0, i0, n_cross);
        const struct vtrim_tensor_io in[] = { { idx, xc->kept } };
        rc = vtrim_context_graph_run(c, gf, in, 1, NULL, 0);
        ggml_free(gctx);
        for (int32_t i = i0; rc == 0 && i < n_cross; i++) {
            xc->trimmed[i] = true;
        }
    }
    if (rc == 0) {
        const int64_t row_bytes = 2 * (int64_t) ggml_row_size(xc->type, xc->n_embd_kv);
        struct vtrim_reduce_stage * st = vtrim_stage_new(c, p);
        st->n_in = n_cand;
        st->n_kept = xc->n_kept > 0 ? xc->n_kept : n_cand;
        st->kv_bytes_full = (int64_t) n_cross * n_x * row_bytes;
        st->kv_bytes_kept = vtrim_cross_cache_bytes_used(xc);
        // The K/V projections of the trimmed layers that were not computed.
        st->flops_saved = xc->n_kept > 0 ? 4.0 * (n_cross - i0) * (double) (n_x - xc->n_kept) * n_embd *
                                           xc->n_embd_kv : 0.0;
    }
    free(q_rows);
    free(h);
    free(mask);
    free(q.arch_rows);
    free(scores);
    return rc;
}
