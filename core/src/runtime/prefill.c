// Prefill and decode: images through the architecture's encoder, the expanded prompt through the decoder in
// layer ranges split where the policies' hooks fire (in the order the prompt meets them), and the stats.
#include "api/error.h"
#include "arch/arch.h"
#include "reduce/reduce.h"
#include "runtime/after_prefill.h"
#include "runtime/context.h"
#include "runtime/forward.h"
#include "runtime/stages.h"

#include <stdlib.h>
#include <string.h>

// The prompt with each image placeholder expanded into its image's rows (when the architecture puts image
// rows in the decoder), at positions n_past + i.
static int32_t expand_prompt(const struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens, int32_t n,
                             struct vtrim_rows * r) {
    const struct vtrim_model * m = c->model;
    const bool rows_in_decoder = m->arch->image_rows_in_decoder;
    r->n = n;
    r->pos = malloc(sizeof(int32_t) * (size_t) n);
    r->token = malloc(sizeof(int32_t) * (size_t) n);
    r->image_row = malloc(sizeof(int32_t) * (size_t) n);
    r->is_image = malloc(sizeof(bool) * (size_t) n);
    if (!r->pos || !r->token || !r->image_row || !r->is_image) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    int32_t row = 0, image_row = 0, image = 0;
    for (int32_t t = 0; t < n_tokens; t++) {
        const bool is_image = rows_in_decoder && tokens[t] == m->image_token_id;
        const int32_t count = is_image ? c->img.n_rows[image++] : 1;
        for (int32_t j = 0; j < count; j++, row++) {
            r->pos[row] = c->n_past + row;
            r->token[row] = is_image ? -1 : tokens[t];
            r->image_row[row] = is_image ? image_row++ : -1;
            r->is_image[row] = is_image;
        }
    }
    return 0;
}

// The expanded prompt through all layers, stopping wherever a policy's hook fires.
static int32_t run_prompt(struct vtrim_context * c, struct vtrim_rows * rows, bool reduce, double * flops) {
    const struct vtrim_model * m = c->model;
    const struct vtrim_text_hparams * hp = &m->text;
    const int32_t n_embd = hp->n_embd, n_layer = hp->n_layer;
    int32_t * order = malloc(sizeof(int32_t) * (size_t) (c->policies.n + 1));
    if (!order) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    const int32_t n_order = vtrim_policy_list_order(&c->policies, VTRIM_HOOK_VISION_ENCODER, order);
    int il = 0;
    int32_t rc = 0;
    // An after-prefill policy (at most one captures: its method is one per context) scores with the Q of its
    // query rows in every layer, captured while the prompt runs.
    for (int32_t i = 0; reduce && i < n_order && rc == 0 && !c->q_capture; i++) {
        const struct vtrim_policy * p = &c->policies.items[order[i]];
        if (p->r->hook == VTRIM_HOOK_AFTER_PREFILL) {
            rc = vtrim_capture_begin(c, p, rows);
        }
    }
    // A decoder-hook policy fires at each of its step layers (its steps are consecutive in the prompt's
    // order: policies of one hook do not interleave); a cross-attention one at its layer.
    for (int32_t i = 0, step = 0; reduce && i < n_order && rc == 0; ) {
        const struct vtrim_policy * p = &c->policies.items[order[i]];
        const int32_t hook = p->r->hook;
        if (hook == VTRIM_HOOK_AFTER_PREFILL) {
            i++;
            continue;   // once every layer ran
        }
        const bool decoder = hook == VTRIM_HOOK_DECODER_LAYER, matrix = decoder && p->r->scores.matrix;
        const int k = p->step_layers[step];
        if (hook == VTRIM_HOOK_CROSS_ATTN && !m->arch->cross_attn_stage) {
            rc = vtrim_fail(VTRIM_ERR_UNSUPPORTED, "%s: no executor for its hook on this model", p->r->name);
            break;
        }
        // A probe of layer k-1 needs its input states (probabilities of a few query rows, recomputed) or its
        // queries (the logit matrix among all rows: capturing them costs a copy, recomputing a projection).
        float * h_out = malloc(sizeof(float) * (size_t) rows->n * n_embd);
        float * h_in = decoder && !matrix ? malloc(sizeof(float) * (size_t) rows->n * n_embd) : NULL;
        float * q = matrix ? malloc(sizeof(float) * (size_t) rows->n * hp->head_dim * hp->n_head) : NULL;
        rc = (h_out && (h_in || q || !decoder)) ? 0
             : vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for hidden states");
        for (int l = il; l < k && rc == 0; l++) {
            *flops += vtrim_layer_flops(hp, rows->n, c->kv.n[l]);
        }
        if (rc == 0) {
            rc = vtrim_forward(c, rows, il, k, h_out, h_in, q, false);
        }
        if (rc == 0 && decoder) {
            rc = vtrim_stage_decoder(c, p, step, rows, h_out, h_in, q);
            free(h_out);
        } else if (rc == 0) {
            // the rows go on from the states the hook saw
            free(rows->hidden);
            rows->hidden = h_out;
            rc = m->arch->cross_attn_stage(c, p, rows, h_out);
        } else {
            free(h_out);
        }
        free(h_in);
        free(q);
        il = k;
        if (++step >= (decoder ? p->n_steps : 1)) {
            step = 0;
            i++;
        }
    }
    for (int l = il; l < n_layer && rc == 0; l++) {
        *flops += vtrim_layer_flops(hp, rows->n, c->kv.n[l]);
    }
    if (rc == 0) {
        rc = vtrim_forward(c, rows, il, n_layer, NULL, NULL, NULL, true);
    }
    for (int32_t i = 0; i < n_order && rc == 0; i++) {
        const struct vtrim_policy * p = &c->policies.items[order[i]];
        if (p->r->hook == VTRIM_HOOK_AFTER_PREFILL && reduce) {
            rc = vtrim_stage_after_prefill(c, p);
        } else if (p->r->hook == VTRIM_HOOK_AFTER_PREFILL) {
            vtrim_stage_after_prefill_none(c, p);   // a prompt without images: nothing to do, and the stage says so
        }
    }
    vtrim_capture_end(c);
    free(order);
    return rc;
}

// Which image rows survived, as indices into the expanded prompt with every image at its n_image_tokens rows:
// positions are original, and an encoder reduction's rows map back through c->img.src.
static int32_t record_kept_rows(struct vtrim_context * c, const struct vtrim_rows * rows, int32_t n_past,
                                const int32_t * tokens, int32_t n_tokens, int32_t n_expanded) {
    const struct vtrim_model * m = c->model;
    int32_t * kept = malloc(sizeof(int32_t) * (size_t) (rows->n > 0 ? rows->n : 1));
    int32_t * full = malloc(sizeof(int32_t) * (size_t) (n_expanded > 0 ? n_expanded : 1));
    if (!kept || !full) {
        free(kept);
        free(full);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    const int32_t n_img_tok = m->has_vision ? m->vision.n_image_tokens : 0;
    int32_t row = 0, at = 0, image = 0, image_row = 0;
    for (int32_t t = 0; t < n_tokens; t++) {
        if (m->arch->image_rows_in_decoder && tokens[t] == m->image_token_id) {
            for (int32_t j = 0; j < c->img.n_rows[image]; j++) {
                full[row++] = at + c->img.src[image_row + j];
            }
            image_row += c->img.n_rows[image++];
            at += n_img_tok;
        } else {
            full[row++] = at++;
        }
    }
    int32_t n = 0;
    for (int32_t i = 0; i < rows->n; i++) {
        if (rows->is_image[i]) {
            kept[n++] = full[rows->pos[i] - n_past];
        }
    }
    const int32_t rc = vtrim_context_set_kept(c, kept, n);
    free(kept);
    free(full);
    return rc;
}

static int32_t check_prompt(const struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens,
                            struct vtrim_image * const * images, int32_t n_images) {
    const struct vtrim_model * m = c->model;
    int32_t n_placeholders = 0;
    for (int32_t i = 0; i < n_tokens; i++) {
        // A placeholder that becomes decoder rows never reaches the embedding: it may be a virtual id past the
        // vocabulary (llama.cpp's LLaVA-1.5 text files have no "<image>" token).
        const bool placeholder = m->arch->image_rows_in_decoder && tokens[i] == m->image_token_id;
        if (!placeholder && (tokens[i] < 0 || tokens[i] >= m->tok_embd->ne[1])) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "token %d at position %d is outside the vocabulary (%lld)",
                              tokens[i], i, (long long) m->tok_embd->ne[1]);
        }
        n_placeholders += m->has_vision && tokens[i] == m->image_token_id;
    }
    if (n_images > 0 && !m->has_vision) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "this model has no vision tower; it takes no images");
    }
    if (n_placeholders != n_images) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "the prompt has %d image placeholder(s) (token %d) but %d image(s) "
                          "were given", n_placeholders, m->image_token_id, n_images);
    }
    for (int32_t i = 0; i < n_images; i++) {
        if (!images[i]) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image %d is NULL", i);
        }
    }
    return m->arch->prefill_check ? m->arch->prefill_check(c, n_images) : 0;
}

int32_t vtrim_prefill(struct vtrim_context * c, const int32_t * tokens, int32_t n_tokens,
                      struct vtrim_image * const * images, int32_t n_images) {
    if (!c || !tokens || n_tokens <= 0 || n_images < 0 || (n_images > 0 && !images)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_prefill: need a context, at least one token, and the images");
    }
    const struct vtrim_model * m = c->model;
    const struct vtrim_arch * a = m->arch;
    int32_t rc = check_prompt(c, tokens, n_tokens, images, n_images);
    if (rc < 0) {
        return rc;
    }
    const int32_t n_img_tok = m->has_vision ? m->vision.n_image_tokens : 0;
    const int64_t n_full = a->image_rows_in_decoder ? n_tokens + (int64_t) n_images * (n_img_tok - 1) : n_tokens;
    if (c->n_past + n_full > c->params.n_ctx) {
        return vtrim_fail(VTRIM_ERR_CONTEXT_FULL, "the prompt needs %lld positions (%d images of %d tokens) but only "
                          "%d of n_ctx=%d are free", (long long) n_full, n_images, n_img_tok,
                          c->params.n_ctx - c->n_past, c->params.n_ctx);
    }
    int32_t * kv_n = malloc(sizeof(int32_t) * (size_t) c->kv.n_layer);
    // A stage per policy, and an encoder policy's per image.
    const size_t max_stages = (size_t) c->policies.n * (size_t) (n_images + 1) + 1;
    struct vtrim_reduce_stage * stages = realloc(c->stages, sizeof *stages * max_stages);
    if (!kv_n || !stages) {
        free(kv_n);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    c->stages = stages;
    c->n_stages = 0;
    memcpy(kv_n, c->kv.n, sizeof(int32_t) * (size_t) c->kv.n_layer);
    const int32_t n_past = c->n_past;
    double flops_full = 0.0, flops = 0.0;
    for (int l = 0; l < m->text.n_layer; l++) {
        flops_full += vtrim_layer_flops(&m->text, (double) n_full, c->kv.n[l]);
    }

    const int64_t t0 = ggml_time_us(), host_in0 = c->host_bytes_in, host_out0 = c->host_bytes_out;
    c->img.n_images = 0;
    c->img.n_cached = 0;
    rc = n_images > 0 ? a->encode(c, images, n_images) : 0;
    const int64_t t1 = ggml_time_us();
    if (rc == 0) {
        vtrim_stage_vision_decoder(c, n_full);
    }
    int64_t n_expanded = n_tokens;
    for (int32_t i = 0; a->image_rows_in_decoder && i < c->img.n_images; i++) {
        n_expanded += c->img.n_rows[i] - 1;
    }
    struct vtrim_rows rows = {0};
    if (rc == 0) {
        rc = expand_prompt(c, tokens, n_tokens, (int32_t) n_expanded, &rows);
    }
    if (rc == 0 && a->prepare_rows) {
        rc = a->prepare_rows(c, tokens, n_tokens, &rows);
    }
    if (rc == 0) {
        rc = run_prompt(c, &rows, n_images > 0, &flops);
    }
    int32_t n_image_tokens = n_images * n_img_tok, n_kept = vtrim_rows_count_image(&rows);
    if (rc == 0 && a->image_result) {
        rc = a->image_result(c, n_images, &n_image_tokens, &n_kept);
    } else if (rc == 0) {
        rc = record_kept_rows(c, &rows, n_past, tokens, n_tokens, (int32_t) n_expanded);
    }
    if (a->prefill_end) {
        a->prefill_end(c, &rows, rc == 0);
    }
    vtrim_rows_free(&rows);
    if (rc < 0) {   // the sequence as it was before the call
        memcpy(c->kv.n, kv_n, sizeof(int32_t) * (size_t) c->kv.n_layer);
        c->n_past = n_past;
        c->has_logits = false;
        c->n_stages = 0;
        free(kv_n);
        return rc;
    }
    free(kv_n);
    c->n_past += (int32_t) n_expanded;
    const int64_t t2 = ggml_time_us();
    memset(&c->stats, 0, sizeof c->stats);
    c->stats.n_prompt_tokens = (int32_t) n_expanded;
    c->stats.n_images = n_images;
    c->stats.n_image_tokens = n_image_tokens;
    c->stats.n_image_tokens_kept = n_kept;
    c->stats.t_encode_ms = n_images > 0 ? (t1 - t0) / 1000.0 : 0.0;   // no image: no encode, not the bookkeeping's microsecond
    c->stats.t_prefill_ms = (t2 - t1) / 1000.0;
    c->stats.prefill_flops = flops;
    c->stats.prefill_flops_full = flops_full;
    c->stats.host_bytes_in = c->host_bytes_in - host_in0;
    c->stats.host_bytes_out = c->host_bytes_out - host_out0;
    c->stats.n_images_cached = c->img.n_cached;
    return 0;
}

int32_t vtrim_decode(struct vtrim_context * c, int32_t token) {
    if (!c) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_decode: ctx is NULL");
    }
    if (c->n_past == 0) {
        return vtrim_fail(VTRIM_ERR_STATE, "vtrim_decode before vtrim_prefill");
    }
    const struct vtrim_model * m = c->model;
    if (token < 0 || token >= m->tok_embd->ne[1] || (m->has_vision && token == m->image_token_id)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "cannot decode token %d", token);
    }
    if (c->n_past + 1 > c->params.n_ctx) {
        return vtrim_fail(VTRIM_ERR_CONTEXT_FULL, "the context is full (n_ctx=%d)", c->params.n_ctx);
    }
    int32_t pos = c->n_past;
    bool is_image = false;
    struct vtrim_rows rows = { .n = 1, .pos = &pos, .token = &token, .is_image = &is_image };
    const int64_t t0 = ggml_time_us();
    const int32_t rc = vtrim_forward(c, &rows, 0, m->text.n_layer, NULL, NULL, NULL, true);
    if (rc < 0) {   // one chunk: the cache was not advanced
        c->has_logits = false;
        return rc;
    }
    c->n_past++;
    c->stats.t_decode_ms += (ggml_time_us() - t0) / 1000.0;
    c->stats.n_decoded++;
    return 0;
}
