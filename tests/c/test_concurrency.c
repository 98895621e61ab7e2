// Four threads, four contexts on one model, each generating with a different reduction at the same time:
// every thread's tokens and last logits must equal a run of the same work alone, one after another.
//     vtrim-concurrency-test model.gguf        (tests/test_c_unit.py runs it on the tiny LLaVA fixture)
#include "vtrim.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_WORKERS 4
#define N_TOKENS  12

struct job {
    struct vtrim_model * model;
    int                  which;     // the reduction (add_reduction)
    int32_t              tokens[N_TOKENS];
    float *              logits;    // the last step's
    int32_t              rc;
    char                 error[256];
};

static int32_t fail(struct job * j, int32_t rc) {
    j->rc = rc;
    snprintf(j->error, sizeof j->error, "%s", vtrim_last_error());
    return rc;
}

// FastV stages that fit any decoder of >= 2 layers (a third stage where there are >= 3).
static int32_t add_reduction(struct vtrim_context * ctx, int which, int32_t n_layer) {
    struct vtrim_fastv_params p;
    vtrim_fastv_default(&p);
    p.k = 1;
    int32_t rc = 0;
    if (which == 1) {
        rc = vtrim_reduce_add_fastv(ctx, &p);
    } else if (which == 2) {
        p.ratio = 0.75f, p.score = VTRIM_FASTV_SCORE_MEAN;
        rc = vtrim_reduce_add_fastv(ctx, &p);
    } else if (which == 3) {
        p.ratio = 0.25f;
        rc = vtrim_reduce_add_fastv(ctx, &p);
        if (rc == 0 && n_layer >= 3) {
            p.k = 2, p.ratio = 0.5f;
            rc = vtrim_reduce_add_fastv(ctx, &p);
        }
    }
    return rc;
}

static void * run(void * arg) {
    struct job * j = arg;
    struct vtrim_model_info info;
    vtrim_model_get_info(j->model, &info);
    struct vtrim_context_params cp;
    vtrim_context_params_default(&cp);
    cp.n_ctx = 512;
    cp.n_threads = 1;
    cp.kv_type = VTRIM_KV_F32;
    struct vtrim_context * ctx = NULL;
    if (vtrim_context_init(j->model, &cp, &ctx) != 0) {
        fail(j, -1);
        return NULL;
    }
    uint8_t px[40 * 30 * 3];
    for (int i = 0; i < (int) sizeof px; i++) {
        px[i] = (uint8_t) (i * 7 + 13 * j->which);
    }
    struct vtrim_image * img = NULL;
    char prompt[256];
    int32_t ids[256], n = 0, len = 0;
    int32_t rc = vtrim_image_from_pixels(px, 40, 30, &img);
    rc = rc ? rc : add_reduction(ctx, j->which, info.n_layer);
    rc = rc ? rc : vtrim_chat_format(j->model, "What is in the picture?", 1, prompt, (int32_t) sizeof prompt - 1, &len);
    rc = rc ? rc : vtrim_tokenize(j->model, prompt, len, true, ids, 256, &n);
    rc = rc ? rc : vtrim_prefill(ctx, ids, n, &img, 1);
    for (int t = 0; rc == 0 && t < N_TOKENS; t++) {
        rc = vtrim_logits(ctx, j->logits, info.n_vocab);
        int32_t best = 0;
        for (int32_t v = 1; rc == 0 && v < info.n_vocab; v++) {
            best = j->logits[v] > j->logits[best] ? v : best;
        }
        j->tokens[t] = best;
        rc = rc ? rc : vtrim_decode(ctx, best);
    }
    rc = rc ? rc : vtrim_logits(ctx, j->logits, info.n_vocab);
    if (rc != 0) {
        fail(j, rc);
    }
    vtrim_image_free(img);
    vtrim_context_free(ctx);
    return NULL;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s model.gguf\n", argv[0]);
        return 2;
    }
    struct vtrim_model_params mp;
    vtrim_model_params_default(&mp);
    mp.device = VTRIM_DEVICE_CPU;
    struct vtrim_model * model = NULL;
    if (vtrim_model_load(argv[1], NULL, &mp, &model) != 0) {
        fprintf(stderr, "load: %s\n", vtrim_last_error());
        return 1;
    }
    struct vtrim_model_info info;
    vtrim_model_get_info(model, &info);
    static struct job alone[N_WORKERS], together[N_WORKERS];
    for (int i = 0; i < N_WORKERS; i++) {
        alone[i] = (struct job) { .model = model, .which = i };
        together[i] = (struct job) { .model = model, .which = i };
        alone[i].logits = malloc(sizeof(float) * (size_t) info.n_vocab);
        together[i].logits = malloc(sizeof(float) * (size_t) info.n_vocab);
        run(&alone[i]);
    }
    pthread_t th[N_WORKERS];
    for (int i = 0; i < N_WORKERS; i++) {
        pthread_create(&th[i], NULL, run, &together[i]);
    }
    for (int i = 0; i < N_WORKERS; i++) {
        pthread_join(th[i], NULL);
    }
    int failed = 0;
    for (int i = 0; i < N_WORKERS; i++) {
        if (alone[i].rc || together[i].rc) {
            fprintf(stderr, "worker %d: %s%s\n", i, alone[i].error, together[i].error);
            failed = 1;
        } else if (memcmp(alone[i].tokens, together[i].tokens, sizeof alone[i].tokens) != 0 ||
                   memcmp(alone[i].logits, together[i].logits, sizeof(float) * (size_t) info.n_vocab) != 0) {
            fprintf(stderr, "worker %d (reduction %d): concurrent run differs from the run alone\n", i, i);
            failed = 1;
        }
        free(alone[i].logits);
        free(together[i].logits);
    }
    // the reductions did something different: the four runs alone are not all the same
    int distinct = 0;
    for (int i = 1; i < N_WORKERS; i++) {
        distinct += memcmp(alone[0].tokens, alone[i].tokens, sizeof alone[0].tokens) != 0;
    }
    vtrim_model_free(model);
    if (failed) {
        return 1;
    }
    printf("%d workers identical to their sequential runs (%d of %d differ from the unreduced one)\n", N_WORKERS,
           distinct, N_WORKERS - 1);
    return 0;
}
