// C unit tests of the pieces that need no model: the mask builder, the sampler on plain arrays, the policy
// list and the methods' apply, and (with VTRIM_UNIT_GGML, built by CMake against ggml) the KV cache's
// position bookkeeping, truncation and per-head compaction. tests/test_c_unit.py runs them.
#include "kv/mask.h"
#include "reduce/ficoco.h"
#include "reduce/reduce.h"
#include "runtime/sampling.h"
#include "vtrim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_failed = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
            g_failed++;                                                              \
        }                                                                            \
    } while (0)

#ifndef VTRIM_UNIT_GGML
// The sampler's link to a context: never called by these tests.
int32_t vtrim_context_vocab_size(const struct vtrim_context * ctx) { (void) ctx; return 0; }
int32_t vtrim_logits(const struct vtrim_context * ctx, float * logits, int32_t n_vocab) {
    (void) ctx; (void) logits; (void) n_vocab;
    return VTRIM_ERR_STATE;
}
#endif

static void test_mask_from_positions(void) {
    // cached rows at positions 0, 3, 7 (gaps after a reduction), then two new rows at 8 and 9, padded to 8
    const int32_t cols[] = { 0, 3, 7, 8, 9 };
    const int32_t rows[] = { 8, 9 };
    float mask[2 * 8];
    vtrim_kv_mask_fill(cols, 5, rows, 2, 8, mask);
    const float want[2][8] = { { 0, 0, 0, 0, -INFINITY, -INFINITY, -INFINITY, -INFINITY },
                               { 0, 0, 0, 0, 0, -INFINITY, -INFINITY, -INFINITY } };
    for (int r = 0; r < 2; r++) {
        for (int j = 0; j < 8; j++) {
            CHECK(mask[r * 8 + j] == want[r][j]);
        }
    }
    // a query before a cached row does not see it: any order of positions masks by position
    const int32_t early[] = { 5 };
    vtrim_kv_mask_fill(cols, 5, early, 1, 5, mask);
    CHECK(mask[0] == 0 && mask[1] == 0 && isinf(mask[2]) && isinf(mask[3]) && isinf(mask[4]));
}

static struct vtrim_sampler * sampler(float temperature, int32_t top_k, float top_p, uint64_t seed) {
    struct vtrim_sampler_params p;
    vtrim_sampler_params_default(&p);
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.seed = seed;
    struct vtrim_sampler * s = NULL;
    CHECK(vtrim_sampler_init(&p, &s) == 0);
    return s;
}

static void test_sampling(void) {
    struct vtrim_sampler * g = sampler(0.0f, 0, 1.0f, 0);
    const float ties[] = { 1.0f, 3.0f, 3.0f, -2.0f };
    int32_t tok = -1;
    CHECK(vtrim_sample_logits(g, ties, 4, &tok) == 0 && tok == 1);          // ties go to the lower id
    const float with_nan[] = { NAN, 0.5f, NAN, 0.25f };
    CHECK(vtrim_sample_logits(g, with_nan, 4, &tok) == 0 && tok == 1);      // NaN never wins
    const float all_nan[] = { NAN, NAN };
    CHECK(vtrim_sample_logits(g, all_nan, 2, &tok) == VTRIM_ERR_INVALID_ARG);
    vtrim_sampler_free(g);

    // top_k 1 at any temperature is greedy
    struct vtrim_sampler * k1 = sampler(1.5f, 1, 1.0f, 7);
    const float logits[] = { 0.1f, 2.0f, 1.9f, -1.0f, 0.0f };
    for (int i = 0; i < 10; i++) {
        CHECK(vtrim_sample_logits(k1, logits, 5, &tok) == 0 && tok == 1);
    }
    vtrim_sampler_free(k1);

    // a seed gives the same draws; the draws stay among the top_k
    struct vtrim_sampler * a = sampler(1.0f, 3, 1.0f, 42), * b = sampler(1.0f, 3, 1.0f, 42);
    int seen[5] = { 0 };
    for (int i = 0; i < 200; i++) {
        int32_t ta = -1, tb = -2;
        CHECK(vtrim_sample_logits(a, logits, 5, &ta) == 0 && vtrim_sample_logits(b, logits, 5, &tb) == 0);
        CHECK(ta == tb);
        if (ta >= 0 && ta < 5) {
            seen[ta]++;
        }
    }
    CHECK(seen[3] == 0 && seen[4] == 0 && seen[1] > 0 && seen[2] > 0);
    vtrim_sampler_free(a);
    vtrim_sampler_free(b);
}

static void test_policy_list(void) {
    struct vtrim_reduce_caps caps = { .n_layer = 8, .image_rows_in_decoder = true, .first_cross_layer = -1 };
    struct vtrim_policy_list l = { 0 };
    struct vtrim_fastv_params p;
    vtrim_fastv_default(&p);
    CHECK(p.k == 2 && p.ratio == 0.5f && p.score == VTRIM_FASTV_SCORE_LAST);
    for (int k = 1; k <= 6; k++) {   // more than any fixed count
        p.k = k;
        CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_fastv, &p, &caps) == 0);
    }
    p.k = 3;
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_fastv, &p, &caps) == VTRIM_ERR_INVALID_ARG);   // out of order
    p.k = 8;
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_fastv, &p, &caps) == VTRIM_ERR_INVALID_ARG);   // k == n_layer
    CHECK(l.n == 6);
    int32_t order[8];
    CHECK(vtrim_policy_list_order(&l, VTRIM_HOOK_VISION_ENCODER, order) == 6);
    for (int i = 0; i < 6; i++) {
        CHECK(order[i] == i && l.items[i].layer == i + 1 && l.items[i].n_steps == 1 &&
              l.items[i].step_layers[0] == i + 1);
    }
    struct vtrim_trim_params t;
    vtrim_trim_default(&t);
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_trim, &t, &caps) == VTRIM_ERR_INVALID_ARG);    // no cross layers
    vtrim_policy_list_free(&l);
}

static void test_fastv_apply(void) {
    // rows: text, 4 image rows, text; keep int(0.5 * 4) = 2 image rows by score, ties to the lower row
    const bool is_image[] = { false, true, true, true, true, false };
    const float scores[] = { 0.9f, 0.1f, 0.3f, 0.3f, 0.2f, 0.0f };
    struct vtrim_fastv_params p;
    vtrim_fastv_default(&p);
    int32_t kept[6];
    struct vtrim_reduce_output out = { .kept = kept };
    const struct vtrim_reduce_input in = { .n = 6, .is_image = is_image, .scores = scores, .n_head = 1 };
    CHECK(vtrim_reducer_fastv.apply(&p, &in, &out) == 0);
    CHECK(out.n_kept == 4 && kept[0] == 0 && kept[1] == 2 && kept[2] == 3 && kept[3] == 5 && out.n_merge == 0);
    int32_t q[6];
    p.score = VTRIM_FASTV_SCORE_MEAN;
    CHECK(vtrim_reducer_fastv.query_rows(&p, is_image, 6, q) == 1 && q[0] == 5);
}

static void test_trim_apply(void) {
    // two heads over 6 states of one image; union of each head's top int(0.25 * 6) = 1 state
    const float scores[2 * 6] = { 0.1f, 0.5f, 0.1f, 0.1f, 0.1f, 0.1f,
                                  0.1f, 0.1f, 0.1f, 0.1f, 0.6f, 0.0f };
    const int32_t off[] = { 0 }, len[] = { 6 };
    struct vtrim_trim_params p;
    vtrim_trim_default(&p);
    int32_t kept[6];
    struct vtrim_reduce_output out = { .kept = kept };
    const struct vtrim_reduce_input in = { .n = 6, .scores = scores, .n_head = 2, .n_groups = 1, .group_off = off,
                                           .group_len = len };
    CHECK(vtrim_reducer_trim.apply(&p, &in, &out) == 0);
    CHECK(out.n_kept == 2 && kept[0] == 1 && kept[1] == 4 && !out.include_hook_layer);
}

static void test_vlcache(void) {
    struct vtrim_vlcache_params p;
    vtrim_vlcache_default(&p);
    CHECK(p.budget == 0.1f && p.threshold == 0.01f && p.recent == 0.1f);
    const struct vtrim_reduce_caps caps = { .n_layer = 2, .image_rows_in_decoder = true, .first_cross_layer = -1 };
    const struct vtrim_reduce_caps cross = { .n_layer = 2, .n_cross = 1, .first_cross_layer = 1 };
    CHECK(vtrim_reducer_vlcache.validate(&p, &caps) == 0);
    CHECK(vtrim_reducer_vlcache.validate(&p, &cross) == VTRIM_ERR_INVALID_ARG);
    const float bad[][3] = { { 0.0f, 0.01f, 0.1f }, { 2.5f, 0.01f, 0.1f }, { 0.1f, 1.0f, 0.1f }, { 0.1f, -0.1f, 0.1f },
                             { 0.1f, 0.01f, 1.5f }, { 0.1f, 0.01f, -0.5f } };
    for (int i = 0; i < 6; i++) {
        const struct vtrim_vlcache_params b = { bad[i][0], bad[i][1], bad[i][2] };
        CHECK(vtrim_reducer_vlcache.validate(&b, &caps) == VTRIM_ERR_INVALID_ARG);
    }
    // digest: 2 query heads on 1 KV head, queries at positions 2 and 3 over 4 rows
    const float probs[2 * 2 * 4] = { 0.5f, 0.499f, 0.001f, 0.0f,   0.25f, 0.25f, 0.25f, 0.25f,
                                     1.0f, 0.0f, 0.0f, 0.0f,       0.97f, 0.01f, 0.01f, 0.01f };
    const int32_t q_pos[] = { 2, 3 }, kv_pos[] = { 0, 1, 2, 3 };
    const struct vtrim_layer_attn a = { .n_q = 2, .n_head = 2, .n_head_kv = 1, .n_kv = 4, .probs = probs,
                                        .q_pos = q_pos, .kv_pos = kv_pos };
    float density, sc[4];
    CHECK(vtrim_reducer_vlcache.digest_layer(&p, &a, &density, sc) == 0);
    CHECK(fabsf(density - 11.0f / 14.0f) < 1e-6f);    // head sparsities 1/7 and 2/7
    CHECK(fabsf(sc[0] - 1.36f) < 1e-6f && fabsf(sc[1] - 0.3795f) < 1e-6f && fabsf(sc[3] - 0.13f) < 1e-6f);
    // apply: budget 0.25 over densities 0.75 / 0.25 -> k = 4 and 1 of 10 rows; recent 0.5 -> w = 2 and 1
    const struct vtrim_vlcache_params q = { .budget = 0.25f, .threshold = 0.01f, .recent = 0.5f };
    const float s0[2 * 10] = { 0.1f, 0.9f, 0.1f, 0.5f, 0.5f, 0, 0, 0, 0, 0,    0.7f, 0, 0, 0, 0, 0, 0, 0.2f, 0, 0 };
    const float s1[2 * 10] = { 0 };
    const float * scores[] = { s0, s1 };
    const int32_t rows[] = { 10, 10 };
    const float dens[] = { 0.75f, 0.25f };
    int32_t keep[2], k0[20], k1[20];
    int32_t * kept[] = { k0, k1 };
    const struct vtrim_reduce_input in = { .n_layer = 2, .n_head_kv = 2, .layer_rows = rows, .layer_density = dens,
                                           .layer_scores = scores };
    struct vtrim_reduce_output out = { .layer_keep = keep, .layer_kept = kept };
    CHECK(vtrim_reducer_vlcache.apply(&q, &in, &out) == 0);
    CHECK(keep[0] == 4 && keep[1] == 1);
    CHECK(k0[0] == 1 && k0[1] == 3 && k0[2] == 8 && k0[3] == 9);   // ties (rows 3, 4) to the lower row
    CHECK(k0[4] == 0 && k0[5] == 7 && k0[6] == 8 && k0[7] == 9);   // the second head keeps its own
    CHECK(k1[0] == 9 && k1[1] == 9);
}

static void test_ficoco_step(void) {
    // R = 10 over S = 4 steps: 3, 3, 2, 2
    CHECK(vtrim_ficoco_step_drop(10, 4, 0) == 3 && vtrim_ficoco_step_drop(10, 4, 1) == 3 &&
          vtrim_ficoco_step_drop(10, 4, 2) == 2 && vtrim_ficoco_step_drop(10, 4, 3) == 2);
    CHECK(vtrim_ficoco_step_drop(10, 4, 4) == 0);

    // 3 x 3 grid: windows {0,1,3,4}, {2,5}, {6,7}, {8}; candidates hold patches 0,1,2,4,5,8 (3, 6, 7 gone)
    const int32_t patch[] = { 0, 1, 2, 4, 5, 8 };
    float s[] = { 1.0f, 3.0f, -2.0f, 3.0f, -4.0f, 5.0f };
    CHECK(vtrim_ficoco_local_penalty(s, patch, 6, 3) == 0);
    // window {0,1,4}: the tie of 3.0 goes to the lower patch (1), doubled; {2,5}: -2 > -4, halved; {8}: alone
    CHECK(s[0] == 1.0f && s[1] == 6.0f && s[2] == -1.0f && s[3] == 3.0f && s[4] == -4.0f && s[5] == 5.0f);

    // 5 rows of which rows 1..4 are candidates; drop r = 2 by score, ties to the lower candidate
    const int32_t cand[] = { 1, 2, 3, 4 };
    const float score[] = { 0.5f, 0.9f, 0.1f, 0.9f };   // drops rows 2 and 4
    float attn[5 * 5] = { 0 };
    attn[2 * 5 + 1] = 1.0f; attn[2 * 5 + 3] = 1.0f;   // row 2: a tie between kept rows 1 and 3 -> row 1
    attn[4 * 5 + 3] = 2.0f; attn[4 * 5 + 0] = 9.0f;   // row 4: row 0 is not a candidate, row 3 wins
    bool keep[5] = { true, true, true, true, true };
    int32_t src[8], dst[8];
    float w[8];
    struct vtrim_reduce_output out = { .merge_src = src, .merge_dst = dst, .merge_w = w, .merge_cap = 8 };
    CHECK(vtrim_ficoco_step(cand, 4, attn, 5, score, 2, 0.998f, keep, &out) == 0);
    CHECK(keep[0] && keep[1] && !keep[2] && keep[3] && !keep[4]);
    CHECK(out.n_merge == 2 && src[0] == 2 && dst[0] == 1 && w[0] == 1.0f && src[1] == 4 && dst[1] == 3);

    // eps = 0: m = n_kept, weights a softmax over the kept rows' logits
    bool keep2[5] = { true, true, true, true, true };
    out.n_merge = 0;
    CHECK(vtrim_ficoco_step(cand, 4, attn, 5, score, 2, 0.0f, keep2, &out) == 0);
    CHECK(out.n_merge == 4 && src[2] == 4 && dst[2] == 3 && dst[3] == 1);
    CHECK(fabsf(w[2] - 1.0f / (1.0f + expf(-2.0f))) < 1e-6f && fabsf(w[2] + w[3] - 1.0f) < 1e-6f);
    out.n_merge = 0;
    out.merge_cap = 3;                                   // 4 merges do not fit
    CHECK(vtrim_ficoco_step(cand, 4, attn, 5, score, 2, 0.0f, keep2, &out) == VTRIM_ERR_STATE);
    CHECK(vtrim_ficoco_step(cand, 4, attn, 5, score, 4, 0.998f, keep2, &out) == VTRIM_ERR_STATE);   // r = n
}

static void test_ficoco_l(void) {
    struct vtrim_ficoco_l_params p;
    vtrim_ficoco_l_default(&p);
    CHECK(p.tokens == 64 && p.start_layer == 4 && p.beta == 0.6f && p.eps == 0.998f);
    // validate and steps: layers start_layer .. n_layer - 1
    struct vtrim_reduce_caps caps = { .n_layer = 8, .image_rows_in_decoder = true, .first_cross_layer = -1,
                                      .vision_grid = 2 };
    struct vtrim_policy_list l = { 0 };
    p.tokens = 5;                                        // N = 2 x 2
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_ficoco_l, &p, &caps) == VTRIM_ERR_INVALID_ARG);
    p.tokens = 2;
    p.start_layer = 8;
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_ficoco_l, &p, &caps) == VTRIM_ERR_INVALID_ARG);
    p.start_layer = 5;
    caps.image_rows_in_decoder = false;
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_ficoco_l, &p, &caps) == VTRIM_ERR_INVALID_ARG);
    caps.image_rows_in_decoder = true;
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_ficoco_l, &p, &caps) == 0);
    CHECK(l.n == 1 && l.items[0].n_steps == 3 && l.items[0].step_layers[0] == 5 && l.items[0].step_layers[2] == 7);
    vtrim_policy_list_free(&l);

    // rows: text 0, image 1..4, text 5, image 6..9, text 10 11 (T); tokens 2 over 2 steps: step 0 drops 1 each
    enum { n = 12 };
    const bool is_image[n] = { 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0 };
    const int32_t off[] = { 1, 6 }, len[] = { 4, 4 };
    float attn[n * n] = { 0 };
    attn[2 * n + 1] = attn[2 * n + 3] = attn[2 * n + 4] = 1.0f;   // row 2: like its image's rows, s = 0.6
    attn[10 * n + 3] = 1.0f;                                      // row 3: the text looks at it, s = -0.2
    // image 2: all ties: the lower row (6) goes, into the lower kept row (7)
    int32_t kept[n], src[n], dst[n];
    float w[n];
    struct vtrim_reduce_output out = { .kept = kept, .merge_src = src, .merge_dst = dst, .merge_w = w,
                                       .merge_cap = n };
    struct vtrim_reduce_input in = { .n = n, .is_image = is_image, .n_groups = 2, .group_off = off,
                                     .group_len = len, .attn = attn, .step = 0, .n_steps = 2 };
    CHECK(vtrim_reducer_ficoco_l.apply(&p, &in, &out) == 0);
    const int32_t want[] = { 0, 1, 3, 4, 5, 7, 8, 9, 10, 11 };
    CHECK(out.n_kept == 10 && memcmp(kept, want, sizeof want) == 0);
    CHECK(out.n_merge == 2 && src[0] == 2 && dst[0] == 1 && w[0] == 1.0f && src[1] == 6 && dst[1] == 7);
    // the last step drops what is left over tokens: 2 of each image's 4
    in.step = 1;
    CHECK(vtrim_reducer_ficoco_l.apply(&p, &in, &out) == 0 && out.n_kept == 8 && out.n_merge == 4);
    // tokens >= the rows: nothing goes
    p.tokens = 4;
    CHECK(vtrim_reducer_ficoco_l.apply(&p, &in, &out) == 0 && out.n_kept == n && out.n_merge == 0);
}

static void test_ficoco_v(void) {
    // a 4-layer tower of 3 x 3 patches (odd: narrow edge windows)
    const struct vtrim_reduce_caps caps = { .n_layer = 4, .image_rows_in_decoder = true, .first_cross_layer = -1,
                                            .n_vision_layer = 4, .vision_grid = 3 };
    const struct vtrim_reduce_caps cross = { .n_layer = 4, .n_cross = 1, .first_cross_layer = 1,
                                             .n_vision_layer = 4 };
    struct vtrim_ficoco_v_params p;
    vtrim_ficoco_v_default(&p);
    CHECK(p.tokens == 64 && p.start_layer == 12 && p.lam == 0.35f && p.eps == 0.998f);
    struct vtrim_policy_list l = { 0 };
    p.tokens = 7;
    p.start_layer = 4;    // f = 3
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_ficoco_v, &p, &caps) == VTRIM_ERR_INVALID_ARG);
    p.start_layer = 1;
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_ficoco_v, &p, &cross) == VTRIM_ERR_INVALID_ARG);
    p.tokens = 10;
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_ficoco_v, &p, &caps) == VTRIM_ERR_INVALID_ARG);
    p.tokens = 7;
    CHECK(vtrim_policy_list_add(&l, &vtrim_reducer_ficoco_v, &p, &caps) == 0);
    CHECK(l.n == 1 && l.items[0].layer == 1 && l.items[0].n_steps == 3 && l.items[0].step_layers[2] == 3);
    vtrim_policy_list_free(&l);

    // One step dropping r = 2 of 9 patches (rows 1..9; row 0 the CLS). Logits: the CLS row's for patch k is
    // 0.1 k, row 1 (patch 0) has logit 1 for row 5, the rest 0. Scores -0.65 * 0.1 k (+ 0.35 / 9 for
    // patch 0); each 2x2 window's largest (negative) is halved: patch 0 (-0.013) and patch 2 (-0.0975) are
    // the largest and go. Targets (m = 1): row 1 -> row 5 (logit 1); row 3 -> row 2 (all 0: the lowest kept).
    float attn[10 * 10] = { 0 };
    int32_t orig[10];
    for (int i = 0; i < 10; i++) {
        orig[i] = i;
        attn[i] = 0.1f * (float) i;
    }
    attn[0] = 0.0f;
    attn[1 * 10 + 5] = 1.0f;
    int32_t kept[10], src[100], dst[100];
    float w[100];
    struct vtrim_reduce_output out = { .kept = kept, .merge_src = src, .merge_dst = dst, .merge_w = w,
                                       .merge_cap = 100 };
    struct vtrim_reduce_input in = { .n = 10, .attn = attn, .orig = orig, .step = 0, .n_steps = 1, .grid = 3 };
    CHECK(vtrim_reducer_ficoco_v.apply(&p, &in, &out) == 0);
    CHECK(out.n_kept == 8 && kept[0] == 0 && kept[1] == 2 && kept[2] == 4 && kept[7] == 9);
    CHECK(out.n_merge == 2 && src[0] == 1 && dst[0] == 5 && w[0] == 1.0f && src[1] == 3 && dst[1] == 2);
    p.tokens = 9;         // nothing to drop: every row kept, no merge
    CHECK(vtrim_reducer_ficoco_v.apply(&p, &in, &out) == 0 && out.n_kept == 10 && out.n_merge == 0);
}

#ifdef VTRIM_UNIT_GGML
#include "attn_probe.h"
#include "graph/graph.h"
#include "kv/kv_cache.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

// The head-mean logit matrix against the arithmetic, with GQA (4 query heads over 2 KV heads).
static void test_logits_head_mean(void) {
    ggml_backend_t cpu = ggml_backend_cpu_init();
    enum { HD = 3, NH = 4, NKV = 2, NQ = 5, NK = 6 };
    float q[NQ][NH][HD], k[NK][NKV][HD];
    for (int i = 0; i < NQ * NH * HD; i++) {
        (&q[0][0][0])[i] = (float) ((i * 37) % 11) / 7.0f - 0.6f;
    }
    for (int i = 0; i < NK * NKV * HD; i++) {
        (&k[0][0][0])[i] = (float) ((i * 53) % 13) / 9.0f - 0.5f;
    }
    struct ggml_init_params ip = { .mem_size = 32 * ggml_tensor_overhead() + ggml_graph_overhead(), .mem_buffer = NULL,
                                   .no_alloc = true };
    struct ggml_context * gctx = ggml_init(ip);
    struct ggml_tensor * tq = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, HD, NH, NQ);
    struct ggml_tensor * tk = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, HD, NKV, NK);
    struct ggml_tensor * out = vtrim_attn_logits_head_mean(gctx, tq, tk, 0.5f);
    struct ggml_cgraph * gf = ggml_new_graph(gctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(gctx, cpu);
    ggml_backend_tensor_set(tq, q, 0, sizeof q);
    ggml_backend_tensor_set(tk, k, 0, sizeof k);
    CHECK(ggml_backend_graph_compute(cpu, gf) == GGML_STATUS_SUCCESS);
    float got[NQ][NK];
    CHECK(out->ne[0] == NK && out->ne[1] == NQ);
    ggml_backend_tensor_get(out, got, 0, sizeof got);
    for (int i = 0; i < NQ; i++) {
        for (int j = 0; j < NK; j++) {
            double want = 0.0;
            for (int h = 0; h < NH; h++) {
                for (int d = 0; d < HD; d++) {
                    want += 0.5 * q[i][h][d] * k[j][h / (NH / NKV)][d];
                }
            }
            CHECK(fabs(got[i][j] - want / NH) < 1e-5);
        }
    }
    ggml_backend_buffer_free(buf);
    ggml_free(gctx);
    ggml_backend_free(cpu);
}

// The chunked explicit attention (graph/graph.c) against ggml's flash attention and a double-precision
// reference, with chunks of 5 query rows and a padded tail (rows from TAIL on see only the keys before it).
static void test_chunked_attn(void) {
    ggml_backend_t cpu = ggml_backend_cpu_init();
    enum { HD = 8, NH = 2, N = 37, TAIL = 24, NM = 64 };   // NM: the mask's rows, padded for flash attention
    static float q[N][NH][HD], k[N][NH][HD], v[N][NH][HD];
    static ggml_fp16_t mask[NM][N];
    for (int i = 0; i < N * NH * HD; i++) {
        (&q[0][0][0])[i] = (float) ((i * 37) % 23) / 11.0f - 1.0f;
        (&k[0][0][0])[i] = (float) ((i * 53) % 19) / 9.0f - 1.0f;
        (&v[0][0][0])[i] = (float) ((i * 71) % 17) / 8.0f - 1.0f;
    }
    for (int i = 0; i < NM; i++) {
        for (int j = 0; j < N; j++) {   // as HF's padded tiles: padding against padding is masked
            const bool pad_i = i >= TAIL || i % 10 == 9, pad_j = j >= TAIL || j % 10 == 9;
            mask[i][j] = ggml_fp32_to_fp16(pad_i && pad_j ? -INFINITY : 0.0f);
        }
    }
    struct ggml_init_params ip = { .mem_size = 512 * ggml_tensor_overhead() + ggml_graph_overhead(), .mem_buffer = NULL,
                                   .no_alloc = true };
    struct ggml_context * gctx = ggml_init(ip);
    struct ggml_tensor * tq = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, HD, NH, N);
    struct ggml_tensor * tk = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, HD, NH, N);
    struct ggml_tensor * tv = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, HD, NH, N);
    struct ggml_tensor * tm = ggml_new_tensor_2d(gctx, GGML_TYPE_F16, N, NM);
    const float scale = 0.35f;
    const int64_t chunk_bytes = 5 * N * NH * (int64_t) sizeof(float);
    struct ggml_tensor * chunked = vtrim_build_chunked_attn(gctx, tq, tk, tv, tm, scale, chunk_bytes, TAIL);
    struct ggml_tensor * whole = vtrim_build_chunked_attn(gctx, tq, tk, tv, tm, scale, chunk_bytes, N);
    struct ggml_tensor * flash = vtrim_build_flash_attn(gctx, tq, tk, tv, tm, scale);
    struct ggml_cgraph * gf = ggml_new_graph(gctx);
    ggml_build_forward_expand(gf, chunked);
    ggml_build_forward_expand(gf, whole);
    ggml_build_forward_expand(gf, flash);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(gctx, cpu);
    ggml_backend_tensor_set(tq, q, 0, sizeof q);
    ggml_backend_tensor_set(tk, k, 0, sizeof k);
    ggml_backend_tensor_set(tv, v, 0, sizeof v);
    ggml_backend_tensor_set(tm, mask, 0, sizeof mask);
    CHECK(ggml_backend_graph_compute(cpu, gf) == GGML_STATUS_SUCCESS);
    CHECK(chunked->ne[0] == HD * NH && chunked->ne[1] == N);
    static float got[3][N][NH * HD];
    ggml_backend_tensor_get(chunked, got[0], 0, sizeof got[0]);
    ggml_backend_tensor_get(whole, got[1], 0, sizeof got[1]);
    ggml_backend_tensor_get(flash, got[2], 0, sizeof got[2]);
    double worst = 0.0;
    for (int i = 0; i < N; i++) {
        for (int h = 0; h < NH; h++) {
            double s[N], mx = -INFINITY, z = 0.0;
            for (int j = 0; j < N; j++) {
                double dot = 0.0;
                for (int d = 0; d < HD; d++) {
                    dot += (double) q[i][h][d] * k[j][h][d];
                }
                s[j] = scale * dot + ggml_fp16_to_fp32(mask[i][j]);
                mx = s[j] > mx ? s[j] : mx;
            }
            for (int j = 0; j < N; j++) {
                s[j] = exp(s[j] - mx);
                z += s[j];
            }
            for (int d = 0; d < HD; d++) {
                double want = 0.0;
                for (int j = 0; j < N; j++) {
                    want += s[j] / z * v[j][h][d];
                }
                for (int r = 0; r < 3; r++) {
                    const double e = fabs(got[r][i][h * HD + d] - want);
                    worst = e > worst ? e : worst;
                }
            }
        }
    }
    CHECK(worst < 1e-5);
    ggml_backend_buffer_free(buf);
    ggml_free(gctx);
    ggml_backend_free(cpu);
}

// K element (channel c of row r) and V element as the test writes them.
static float kval(int r, int c) { return (float) (r * 100 + c); }
static float vval(int r, int c) { return (float) (r * 100 + c) + 0.5f; }

static void test_kv_cache(void) {
    ggml_backend_t cpu = ggml_backend_cpu_init();
    struct vtrim_kv_cache kv;
    const int hd = 4, nh = 2, n_ctx = 16, n_embd_kv = hd * nh;
    CHECK(vtrim_kv_cache_init(&kv, 2, n_ctx, hd, nh, GGML_TYPE_F32, ggml_backend_get_default_buffer_type(cpu), NULL, NULL) == 0);
    float * k = malloc(sizeof(float) * n_embd_kv * n_ctx), * v = malloc(sizeof(float) * n_embd_kv * n_ctx);
    for (int r = 0; r < n_ctx; r++) {
        for (int c = 0; c < n_embd_kv; c++) {
            k[r * n_embd_kv + c] = kval(r, c);
            v[c * n_ctx + r] = vval(r, c);   // V is stored transposed
        }
    }
    ggml_backend_tensor_set(kv.k[0], k, 0, ggml_nbytes(kv.k[0]));
    ggml_backend_tensor_set(kv.v[0], v, 0, ggml_nbytes(kv.v[0]));

    // positions with gaps, appended in two calls; out of order is refused
    const int32_t p1[] = { 0, 2, 4, 6 }, p2[] = { 8, 9 }, bad[] = { 9 };
    CHECK(vtrim_kv_append(&kv, 0, p1, 4) == 0 && vtrim_kv_append(&kv, 0, p2, 2) == 0 && kv.n[0] == 6);
    CHECK(vtrim_kv_append(&kv, 0, bad, 1) == VTRIM_ERR_STATE && kv.n[0] == 6);
    CHECK(vtrim_kv_append(&kv, 1, p1, 4) == 0 && vtrim_kv_append(&kv, 1, p2, 2) == 0);
    CHECK(vtrim_kv_same_rows(&kv, 0, 1));

    // truncation: drop every row after position 6
    CHECK(vtrim_kv_truncate(&kv, 6) == 0 && kv.n[0] == 4 && kv.n[1] == 4);

    // per-head compaction of layer 0: head 0 keeps rows {0, 2}, head 1 keeps rows {1, 3}
    const int32_t keep[] = { 0, 2, 1, 3 };
    struct ggml_init_params ip = { .mem_size = 64 * ggml_tensor_overhead() + ggml_graph_overhead(), .mem_buffer = NULL,
                                   .no_alloc = true };
    struct ggml_context * gctx = ggml_init(ip);
    struct ggml_cgraph * gf = ggml_new_graph(gctx);
    struct ggml_tensor * idx;
    vtrim_kv_build_compact(gctx, gf, &kv, 0, 2, &idx);
    ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(cpu));
    CHECK(ggml_gallocr_alloc_graph(ga, gf));
    int32_t idx_data[4];
    vtrim_kv_compact_index(&kv, keep, 2, true, idx_data);
    ggml_backend_tensor_set(idx, idx_data, 0, sizeof idx_data);
    CHECK(ggml_backend_graph_compute(cpu, gf) == GGML_STATUS_SUCCESS);
    CHECK(vtrim_kv_commit_compact(&kv, 0, keep, 2, true) == 0 && kv.n[0] == 2);
    ggml_backend_tensor_get(kv.k[0], k, 0, ggml_nbytes(kv.k[0]));
    ggml_backend_tensor_get(kv.v[0], v, 0, ggml_nbytes(kv.v[0]));
    for (int h = 0; h < nh; h++) {
        for (int i = 0; i < 2; i++) {
            const int r = keep[h * 2 + i];
            for (int c = h * hd; c < (h + 1) * hd; c++) {
                CHECK(k[i * n_embd_kv + c] == kval(r, c));
                CHECK(v[c * n_ctx + i] == vval(r, c));
            }
            CHECK(vtrim_kv_positions(&kv, 0, h)[i] == p1[r]);
        }
    }
    CHECK(!vtrim_kv_same_rows(&kv, 0, 1));
    // the heads hold different rows: a truncation between them would leave them with different counts
    CHECK(vtrim_kv_truncate(&kv, 4) == VTRIM_ERR_UNSUPPORTED && kv.n[0] == 2 && kv.n[1] == 4);
    CHECK(vtrim_kv_truncate(&kv, 6) == 0 && kv.n[0] == 2 && kv.n[1] == 4);
    CHECK(vtrim_kv_truncate(&kv, 2) == 0 && kv.n[0] == 1 && kv.n[1] == 2);
    ggml_gallocr_free(ga);
    ggml_free(gctx);
    free(k);
    free(v);
    vtrim_kv_cache_free(&kv);
    ggml_backend_free(cpu);
}
#endif

int main(void) {
    test_mask_from_positions();
    test_sampling();
    test_policy_list();
    test_fastv_apply();
    test_trim_apply();
    test_vlcache();
    test_ficoco_step();
    test_ficoco_l();
    test_ficoco_v();
#ifdef VTRIM_UNIT_GGML
    test_kv_cache();
    test_logits_head_mean();
    test_chunked_attn();
#endif
    if (g_failed) {
        fprintf(stderr, "%d check(s) failed\n", g_failed);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
