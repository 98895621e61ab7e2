// vtrim-cli: chat with an image from C only (edge devices: no Python).
//
//   vtrim-cli -m llava.gguf [--mmproj mmproj.gguf] --image cat.jpg [-p "What is this?"]
//             [-n 256] [-t threads] [-c n_ctx] [--temp 0] [--seed 0]
//
// With -p it answers once; without, it reads questions from stdin, one per line, in one conversation.
#include "vtrim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct options {
    const char * model, * mmproj, * image, * prompt;
    int32_t n_predict, n_threads, n_ctx;
    float temperature;
    uint64_t seed;
};

static void usage(const char * argv0) {
    fprintf(stderr, "usage: %s -m MODEL.gguf [--mmproj F] --image IMG [-p PROMPT] [-n N] [-t THREADS] "
                    "[-c N_CTX] [--temp T] [--seed S]\n", argv0);
}

static int parse(int argc, char ** argv, struct options * o) {
    *o = (struct options) { .n_predict = 256, .n_ctx = 4096 };
    for (int i = 1; i < argc; i++) {
        const char * a = argv[i];
        const char * v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            return -1;
        }
        if      (!strcmp(a, "-m") || !strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "--mmproj")) o->mmproj = v;
        else if (!strcmp(a, "--image")) o->image = v;
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "-n")) o->n_predict = atoi(v);
        else if (!strcmp(a, "-t")) o->n_threads = atoi(v);
        else if (!strcmp(a, "-c")) o->n_ctx = atoi(v);
        else if (!strcmp(a, "--temp")) o->temperature = (float) atof(v);
        else if (!strcmp(a, "--seed")) o->seed = strtoull(v, NULL, 10);
        else return -1;
        i++;
    }
    return o->model ? 0 : -1;
}

static int fail(const char * what) {
    fprintf(stderr, "vtrim-cli: %s: %s\n", what, vtrim_last_error());
    return 1;
}

// One turn: format, tokenize, prefill, then sample and print until end of generation.
static int turn(struct vtrim_model * model, struct vtrim_context * ctx, struct vtrim_sampler * smp,
                const char * question, struct vtrim_image * image, bool first, int32_t n_predict) {
    int32_t n_text = 0, n_tok = 0;
    if (vtrim_chat_format(model, question, image ? 1 : 0, NULL, 0, &n_text) != VTRIM_ERR_BUFFER_TOO_SMALL &&
        n_text == 0) {
        return fail("chat format");
    }
    char * text = malloc((size_t) n_text + 8);
    int32_t * tokens = malloc(sizeof(int32_t) * ((size_t) n_text + 8));
    int rc = 1;
    if (text && tokens && vtrim_chat_format(model, question, image ? 1 : 0, text, n_text, &n_text) == 0 &&
        vtrim_tokenize(model, text, n_text, first, tokens, n_text + 8, &n_tok) == 0 &&
        vtrim_prefill(ctx, tokens, n_tok, &image, image ? 1 : 0) == 0) {
        rc = 0;
    } else {
        fail("prompt");
    }
    free(text);
    free(tokens);
    if (rc) {
        return rc;
    }
    int32_t reply[4096];
    int32_t n_reply = 0, printed = 0;
    char buf[16384];
    for (int32_t i = 0; i < n_predict && n_reply < 4096; i++) {
        int32_t tok;
        if (vtrim_sampler_sample(smp, ctx, &tok) != 0) {
            return fail("sample");
        }
        if (vtrim_token_is_eog(model, tok)) {
            break;
        }
        reply[n_reply++] = tok;
        int32_t n = 0;
        if (vtrim_detokenize(model, reply, n_reply, true, buf, sizeof buf, &n) == 0 && n > printed) {
            fwrite(buf + printed, 1, (size_t) (n - printed), stdout);
            fflush(stdout);
            printed = n;
        }
        if (vtrim_decode(ctx, tok) != 0) {
            return fail("decode");
        }
    }
    printf("\n");
    struct vtrim_stats st;
    vtrim_get_stats(ctx, &st);
    fprintf(stderr, "[%d image tokens (%d kept), encode %.0f ms, prefill %.0f ms, %d tokens at %.1f tok/s, "
                    "KV %.1f MiB]\n", st.n_image_tokens, st.n_image_tokens_kept, st.t_encode_ms, st.t_prefill_ms,
            st.n_decoded, st.t_decode_ms > 0 ? st.n_decoded * 1000.0 / st.t_decode_ms : 0.0,
            st.kv_cache_bytes / 1048576.0);
    return 0;
}

int main(int argc, char ** argv) {
    struct options o;
    if (parse(argc, argv, &o) != 0) {
        usage(argv[0]);
        return 2;
    }
    struct vtrim_model_params mp;
    vtrim_model_params_default(&mp);
    struct vtrim_model * model = NULL;
    if (vtrim_model_load(o.model, o.mmproj, &mp, &model) != 0) {
        return fail("load");
    }
    struct vtrim_context_params cp;
    vtrim_context_params_default(&cp);
    cp.n_ctx = o.n_ctx;
    cp.n_threads = o.n_threads;
    struct vtrim_context * ctx = NULL;
    struct vtrim_image * image = NULL;
    struct vtrim_sampler * smp = NULL;
    struct vtrim_sampler_params sp;
    vtrim_sampler_params_default(&sp);
    sp.temperature = o.temperature;
    sp.seed = o.seed;
    int rc = 0;
    if (vtrim_context_init(model, &cp, &ctx) != 0) {
        rc = fail("context");
    } else if (o.image && vtrim_image_from_file(o.image, &image) != 0) {
        rc = fail("image");
    } else if (vtrim_sampler_init(&sp, &smp) != 0) {
        rc = fail("sampler");
    } else if (o.prompt) {
        rc = turn(model, ctx, smp, o.prompt, image, true, o.n_predict);
    } else {
        char line[8192];
        bool first = true;
        fprintf(stderr, "> ");
        while (rc == 0 && fgets(line, sizeof line, stdin)) {
            line[strcspn(line, "\r\n")] = '\0';
            if (!line[0]) {
                break;
            }
            rc = turn(model, ctx, smp, line, first ? image : NULL, first, o.n_predict);
            first = false;
            fprintf(stderr, "> ");
        }
    }
    vtrim_sampler_free(smp);
    vtrim_image_free(image);
    vtrim_context_free(ctx);
    vtrim_model_free(model);
    return rc;
}
