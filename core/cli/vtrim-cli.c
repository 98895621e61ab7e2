// vtrim-cli: chat with an image from C only (edge devices: no Python).
//
//   vtrim-cli -m llava.gguf [--mmproj mmproj.gguf] --image cat.jpg [-p "What is this?"] [-n 256] ...
//
// With -p it answers once; without, it reads questions from stdin, one per line, in one conversation,
// until an empty line or end of input. Ctrl-C stops the answer being written (and, at the prompt, quits).
// When a turn no longer fits in the context, the conversation is cleared (the image stays) and the turn
// starts it anew, with a notice on stderr.
#include "vtrim.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct options {
    const char * model, * mmproj, * image, * prompt, * rpc;
    long n_predict, n_threads, n_ctx, top_k, ficoco_v, ficoco_v_layer;
    long ficoco_l, ficoco_l_start;   // FiCoCo-L's image tokens per image (0: off) and first layer (-1: 4)
    float temperature, top_p;
    unsigned long long seed;
    float vlcache;          // VL-Cache budget; < 0: off
    long fastv_k;           // FastV's layer K; 0: off
    float fastv_ratio;      // FastV's dropped fraction
    float trim;             // Trimmed Llama's k_ratio, when has_trim
    bool has_trim;
    bool no_mmap;
    bool print_tokens;      // the generated ids on stderr after each answer
};

static const char * k_usage =
    "usage: %s -m MODEL.gguf [--mmproj F] [--image IMG] [-p PROMPT] [options]\n"
    "\n"
    "Chats with a vision-language model (LLaVA-1.5, Llama-3.2-Vision) about an image.\n"
    "With -p: answers that question and exits. Without: reads one question per line from stdin in one\n"
    "conversation; an empty line or end of input quits, Ctrl-C stops the current answer.\n"
    "\n"
    "  -m, --model F        the GGUF model (text + vision, or the text part with --mmproj)\n"
    "      --mmproj F       llama.cpp's separate vision GGUF\n"
    "      --image F        the image (JPEG, PNG, BMP, GIF, TGA, PNM); the first turn carries it\n"
    "  -p, --prompt TEXT    answer this question and exit\n"
    "  -n, --n-predict N    at most N tokens per answer (default 256)\n"
    "  -t, --threads N      CPU threads (default: all cores)\n"
    "  -c, --ctx-size N     tokens in the KV cache, image tokens included (default 4096; 0: the model's)\n"
    "      --temp T         sampling temperature (default 0: greedy)\n"
    "      --top-k K        top-k filter when sampling (default 40; 0: off)\n"
    "      --top-p P        top-p filter when sampling (default 0.95; 1: off)\n"
    "      --seed S         sampling seed (default 0)\n"
    "      --fastv K:R      FastV: drop the fraction R of the image tokens after decoder layer K (e.g. 2:0.5;\n"
    "                       LLaVA)\n"
    "      --trim K_RATIO   Trimmed Llama: each head keeps its top K_RATIO of the cross-attended image\n"
    "                       features (e.g. 0.25; Llama-3.2-Vision)\n"
    "      --ficoco-v N[:L] FiCoCo-V: merge each image's patches inside the vision tower down to N tokens,\n"
    "                       from vision layer L on (default 12; e.g. 64 or 64:12; LLaVA)\n"
    "      --ficoco-l N[:L] FiCoCo-L: merge each image's tokens inside the decoder, from layer L on\n"
    "                       (default 4), down to N (e.g. 64; LLaVA)\n"
    "      --vlcache B      VL-Cache: after each prefill with the image, keep a mean fraction B of the KV\n"
    "                       cache per layer (e.g. 0.1), chosen per layer and KV head (LLaVA models)\n"
    "      --rpc H:P,...    ggml rpc-server hosts that take equal shares of the decoder layers\n"
    "      --no-mmap        read the weights into memory instead of mapping the file\n"
    "      --print-tokens   after each answer, its token ids on stderr (a line \"tokens: 306 1017 ...\"; the\n"
    "                       end-of-generation token is not included): compare builds, e.g. greedy on two CPUs\n"
    "  -h, --help           this text\n"
    "      --version        the library's version and backends\n"
    "\n"
    "Answers go to stdout; timings, token counts and why each answer ended go to stderr.\n";

static volatile sig_atomic_t g_interrupted = 0;

static void on_sigint(int sig) {
    (void) sig;
    g_interrupted = 1;
}

static int bad_value(const char * argv0, const char * opt, const char * v, const char * want) {
    fprintf(stderr, "%s: %s %s: expected %s\n", argv0, opt, v, want);
    return -1;
}

static int parse_long(const char * argv0, const char * opt, const char * v, long lo, long hi, long * out) {
    char * end = NULL;
    errno = 0;
    const long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        char want[96];
        snprintf(want, sizeof want, "an integer in [%ld, %ld]", lo, hi);
        return bad_value(argv0, opt, v, want);
    }
    *out = x;
    return 0;
}

// K:R, K >= 1 (the library checks it against the model's layers), R a number.
static int parse_fastv(const char * argv0, const char * opt, const char * v, long * k, float * ratio) {
    char * end = NULL;
    errno = 0;
    const long n = strtol(v, &end, 10);
    if (!errno && end != v && *end == ':' && n >= 1 && n <= INT_MAX) {
        const char * r = end + 1;
        const float x = strtof(r, &end);
        if (!errno && end != r && *end == '\0') {
            *k = n;
            *ratio = x;
            return 0;
        }
    }
    return bad_value(argv0, opt, v, "K:R (layer K >= 1, fraction R dropped), e.g. 2:0.5");
}

static int parse_float(const char * argv0, const char * opt, const char * v, float lo, float hi, float * out) {
    char * end = NULL;
    errno = 0;
    const float x = strtof(v, &end);
    if (errno || end == v || *end || !(x >= lo && x <= hi)) {
        char want[96];
        snprintf(want, sizeof want, "a number in [%g, %g]", lo, hi);
        return bad_value(argv0, opt, v, want);
    }
    *out = x;
    return 0;
}

// --ficoco-v / --ficoco-l N or N:L; *layer = -1 without L
static int parse_tokens_layer(const char * argv0, const char * opt, const char * v, long * tokens, long * start) {
    char * end = NULL;
    errno = 0;
    const long n = strtol(v, &end, 10);
    long layer = -1;
    if (!errno && end != v && *end == ':') {
        const char * l = end + 1;
        layer = strtol(l, &end, 10);
        if (end == l || layer < 0) {
            end = (char *) l;   // reject below
            layer = -2;
        }
    }
    if (errno || end == v || *end || n < 1 || n > INT_MAX || layer < -1 || layer > INT_MAX) {
        return bad_value(argv0, opt, v, "N or N:L (tokens >= 1, start layer >= 0), e.g. 64 or 64:12");
    }
    *tokens = n;
    *start = layer;
    return 0;
}

// 0: run; 1: done (help or version printed); -1: bad arguments (message printed).
static int parse(int argc, char ** argv, struct options * o) {
    *o = (struct options) { .n_predict = 256, .n_ctx = 4096, .top_k = 40, .top_p = 0.95f, .vlcache = -1.0f };
    const char * slash = strrchr(argv[0], '/');
    const char * argv0 = slash ? slash + 1 : argv[0];
    for (int i = 1; i < argc; i++) {
        const char * a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf(k_usage, argv0);
            return 1;
        }
        if (!strcmp(a, "--version")) {
            printf("vtrim-cli %s (%s)\n", vtrim_version(), vtrim_backends());
            return 1;
        }
        if (!strcmp(a, "--no-mmap")) {
            o->no_mmap = true;
            continue;
        }
        if (!strcmp(a, "--print-tokens")) {
            o->print_tokens = true;
            continue;
        }
        const char * v = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = 0;
        if (!v) {
            fprintf(stderr, "%s: %s needs a value (or is unknown); see --help\n", argv0, a);
            return -1;
        }
        if      (!strcmp(a, "-m") || !strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "--mmproj")) o->mmproj = v;
        else if (!strcmp(a, "--image")) o->image = v;
        else if (!strcmp(a, "--rpc")) o->rpc = v;   // the library checks each host:port and says which is wrong
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) rc = parse_long(argv0, a, v, 0, INT_MAX, &o->n_predict);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) rc = parse_long(argv0, a, v, 1, 1024, &o->n_threads);
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) rc = parse_long(argv0, a, v, 0, 1 << 24, &o->n_ctx);
        else if (!strcmp(a, "--temp")) rc = parse_float(argv0, a, v, 0.0f, 100.0f, &o->temperature);
        else if (!strcmp(a, "--top-k")) rc = parse_long(argv0, a, v, 0, INT_MAX, &o->top_k);
        else if (!strcmp(a, "--top-p")) rc = parse_float(argv0, a, v, 0.0f, 1.0f, &o->top_p);
        else if (!strcmp(a, "--ficoco-v")) rc = parse_tokens_layer(argv0, a, v, &o->ficoco_v, &o->ficoco_v_layer);
        else if (!strcmp(a, "--ficoco-l")) rc = parse_tokens_layer(argv0, a, v, &o->ficoco_l, &o->ficoco_l_start);
        // the library says why a budget outside (0, n_layer] does not fit the model
        else if (!strcmp(a, "--vlcache")) rc = parse_float(argv0, a, v, 0.0f, 1e6f, &o->vlcache);
        else if (!strcmp(a, "--fastv")) rc = parse_fastv(argv0, a, v, &o->fastv_k, &o->fastv_ratio);
        // the library says why a k_ratio outside (0, 1] or a model without cross-attention does not fit
        else if (!strcmp(a, "--trim")) {
            rc = parse_float(argv0, a, v, -1e6f, 1e6f, &o->trim);
            o->has_trim = true;
        }
        else if (!strcmp(a, "--seed")) {
            char * end = NULL;
            errno = 0;
            o->seed = strtoull(v, &end, 10);
            if (errno || end == v || *end || v[0] == '-') rc = bad_value(argv0, a, v, "a non-negative integer");
        } else {
            fprintf(stderr, "%s: unknown option %s; see --help\n", argv0, a);
            return -1;
        }
        if (rc) {
            return -1;
        }
        i++;
    }
    if (!o->model) {
        fprintf(stderr, "%s: -m MODEL.gguf is required; see --help\n", argv0);
        return -1;
    }
    return 0;
}

static int fail(const char * what) {
    fprintf(stderr, "vtrim-cli: %s: %s\n", what, vtrim_last_error());
    return 1;
}

// The conversation as the KV cache holds it: whether it has started, and the token that must close the
// last reply before the next user turn (the EOG the model sampled, or EOS when the reply was cut short).
struct conversation {
    bool started;
    bool image_sent;
    int32_t sep;
};

// Formats and tokenizes one user turn, the closing token of the previous reply first; *out is malloc'd.
static int turn_tokens(struct vtrim_model * model, const struct conversation * conv, const char * question,
                       int n_images, int32_t ** out, int32_t * n_out) {
    int32_t n_text = 0;
    if (vtrim_chat_format(model, question, n_images, NULL, 0, &n_text) != VTRIM_ERR_BUFFER_TOO_SMALL) {
        return fail("chat format");
    }
    char * text = malloc((size_t) n_text + 1);
    int32_t * tokens = malloc(sizeof(int32_t) * ((size_t) n_text + 8));
    int32_t n_tok = 0;
    const int32_t off = conv->started ? 1 : 0;
    if (!text || !tokens || vtrim_chat_format(model, question, n_images, text, n_text + 1, &n_text) != 0 ||
        vtrim_tokenize(model, text, n_text, !conv->started, tokens + off, n_text + 7, &n_tok) != 0) {
        free(text);
        free(tokens);
        return fail("prompt");
    }
    free(text);
    if (off) {
        tokens[0] = conv->sep;
    }
    *out = tokens;
    *n_out = n_tok + off;
    return 0;
}

// Prefills one turn. When it does not fit behind the conversation, the conversation is cleared and the
// turn (with the image) starts it anew.
static int prefill_turn(struct vtrim_model * model, struct vtrim_context * ctx, struct conversation * conv,
                        const char * question, struct vtrim_image * image) {
    for (int attempt = 0; attempt < 2; attempt++) {
        const int n_images = image && !conv->image_sent ? 1 : 0;
        int32_t * tokens = NULL, n_tok = 0;
        if (turn_tokens(model, conv, question, n_images, &tokens, &n_tok) != 0) {
            return 1;
        }
        const int32_t rc = vtrim_prefill(ctx, tokens, n_tok, n_images ? &image : NULL, n_images);
        free(tokens);
        if (rc == 0) {
            conv->started = true;
            conv->image_sent = conv->image_sent || n_images;
            return 0;
        }
        if (rc != VTRIM_ERR_CONTEXT_FULL || !conv->started) {
            return fail("prompt");
        }
        fprintf(stderr, "[the context is full: the conversation was cleared%s]\n", image ? "; the image stays" : "");
        if (vtrim_context_reset(ctx) != 0) {
            return fail("reset");
        }
        *conv = (struct conversation) { 0 };
    }
    return 1;
}

// The ids as the Python API's generate() returns them: the answer's tokens, without the closing EOG.
static void write_token_ids(const int32_t * tokens, int32_t n) {
    fputs("tokens:", stderr);
    for (int32_t i = 0; i < n; i++) {
        fprintf(stderr, " %d", tokens[i]);
    }
    fputc('\n', stderr);
}

// One turn: prefill, then sample and print until an end of generation, n_predict tokens, a full context
// or Ctrl-C. Prints why it ended with the timings.
static int turn(struct vtrim_model * model, struct vtrim_context * ctx, struct vtrim_sampler * smp,
                struct conversation * conv, const char * question, struct vtrim_image * image, long n_predict,
                bool show_tokens) {
    if (prefill_turn(model, ctx, conv, question, image) != 0) {
        return 1;
    }
    struct vtrim_model_info info;
    vtrim_model_get_info(model, &info);
    int32_t * reply = NULL;
    char * text = NULL;
    size_t cap = 0, text_cap = 0;
    int32_t n_reply = 0, printed = 0;
    const char * why = "length";
    conv->sep = info.eos_token_id;
    g_interrupted = 0;
    int rc = 0;
    for (long i = 0; i < n_predict && rc == 0; i++) {
        if (g_interrupted) {
            why = "interrupted";
            break;
        }
        int32_t tok;
        if (vtrim_sampler_sample(smp, ctx, &tok) != 0) {
            rc = fail("sample");
            break;
        }
        if (vtrim_token_is_eog(model, tok)) {
            why = "eos";
            conv->sep = tok;
            break;
        }
        if ((size_t) n_reply == cap) {
            cap = cap ? 2 * cap : 256;
            int32_t * grown = realloc(reply, cap * sizeof *reply);
            if (!grown) {
                rc = fail("out of memory");
                break;
            }
            reply = grown;
        }
        reply[n_reply++] = tok;
        // The text of the whole reply, so that characters split over tokens come out whole.
        int32_t n = 0;
        int32_t drc = text ? vtrim_detokenize(model, reply, n_reply, true, text, (int32_t) text_cap, &n)
                           : VTRIM_ERR_BUFFER_TOO_SMALL;
        if (drc == VTRIM_ERR_BUFFER_TOO_SMALL) {
            vtrim_detokenize(model, reply, n_reply, true, NULL, 0, &n);
            text_cap = (size_t) n + 4096;
            char * grown = realloc(text, text_cap);
            if (!grown) {
                rc = fail("out of memory");
                break;
            }
            text = grown;
            drc = vtrim_detokenize(model, reply, n_reply, true, text, (int32_t) text_cap, &n);
        }
        if (drc == 0 && n > printed) {
            fwrite(text + printed, 1, (size_t) (n - printed), stdout);
            fflush(stdout);
            printed = n;
        }
        const int32_t dec = vtrim_decode(ctx, tok);
        if (dec == VTRIM_ERR_CONTEXT_FULL) {
            why = "context_full";
            break;
        }
        if (dec != 0) {
            rc = fail("decode");
        }
    }
    free(text);
    printf("\n");
    fflush(stdout);
    if (rc == 0 && show_tokens) {
        write_token_ids(reply, n_reply);
    }
    free(reply);
    if (rc == 0) {
        struct vtrim_stats st;
        vtrim_get_stats(ctx, &st);
        fprintf(stderr, "[%d image tokens (%d kept), encode %.0f ms, prefill %.0f ms, %d tokens at %.1f tok/s, "
                        "KV %.1f MiB, stopped: %s]\n", st.n_image_tokens, st.n_image_tokens_kept, st.t_encode_ms,
                st.t_prefill_ms, st.n_decoded, st.t_decode_ms > 0 ? st.n_decoded * 1000.0 / st.t_decode_ms : 0.0,
                st.kv_cache_bytes / 1048576.0, why);
    }
    return rc;
}

// A question per line; a line longer than the buffer is read whole.
static char * read_line(void) {
    size_t cap = 1024, n = 0;
    char * line = malloc(cap);
    while (line) {
        if (!fgets(line + n, (int) (cap - n), stdin)) {
            if (n == 0) {
                free(line);
                return NULL;
            }
            break;
        }
        n += strlen(line + n);
        if (n > 0 && line[n - 1] == '\n') {
            break;
        }
        char * grown = realloc(line, cap * 2);
        if (!grown) {
            free(line);
            return NULL;
        }
        line = grown;
        cap *= 2;
    }
    if (line) {
        line[strcspn(line, "\r\n")] = '\0';
    }
    return line;
}

int main(int argc, char ** argv) {
    struct options o;
    const int prc = parse(argc, argv, &o);
    if (prc != 0) {
        return prc > 0 ? 0 : 2;
    }
    struct vtrim_model_params mp;
    vtrim_model_params_default(&mp);
    mp.rpc_servers = o.rpc;
    mp.use_mmap = !o.no_mmap;
    struct vtrim_model * model = NULL;
    if (vtrim_model_load(o.model, o.mmproj, &mp, &model) != 0) {
        return fail("load");
    }
    struct vtrim_context_params cp;
    vtrim_context_params_default(&cp);
    cp.n_ctx = (int32_t) o.n_ctx;
    cp.n_threads = (int32_t) o.n_threads;
    struct vtrim_context * ctx = NULL;
    struct vtrim_image * image = NULL;
    struct vtrim_sampler * smp = NULL;
    struct vtrim_sampler_params sp;
    vtrim_sampler_params_default(&sp);
    sp.temperature = o.temperature;
    sp.top_k = (int32_t) o.top_k;
    sp.top_p = o.top_p;
    sp.seed = o.seed;

#ifdef _WIN32
    signal(SIGINT, on_sigint);
#else
    // No SA_RESTART: Ctrl-C at the prompt interrupts the read, which ends the session.
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
#endif

    struct conversation conv = { 0 };
    int rc = 0;
    struct vtrim_ficoco_v_params fv;
    vtrim_ficoco_v_default(&fv);
    fv.tokens = (int32_t) o.ficoco_v;
    fv.start_layer = o.ficoco_v_layer >= 0 ? (int32_t) o.ficoco_v_layer : fv.start_layer;
    struct vtrim_ficoco_l_params fl;
    vtrim_ficoco_l_default(&fl);
    fl.tokens = (int32_t) o.ficoco_l;
    fl.start_layer = o.ficoco_l_start >= 0 ? (int32_t) o.ficoco_l_start : fl.start_layer;
    struct vtrim_vlcache_params vp;
    vtrim_vlcache_default(&vp);
    vp.budget = o.vlcache;
    struct vtrim_fastv_params fp;
    vtrim_fastv_default(&fp);
    fp.k = (int32_t) o.fastv_k;
    fp.ratio = o.fastv_ratio;
    struct vtrim_trim_params tp;
    vtrim_trim_default(&tp);
    tp.k_ratio = o.trim;
    // in pyvtrim chat's order: the vision tower's reduction, then the decoder's, then the cache's
    if (vtrim_context_init(model, &cp, &ctx) != 0) {
        rc = fail("context");
    } else if (o.ficoco_v > 0 && vtrim_reduce_add_ficoco_v(ctx, &fv) != 0) {
        rc = fail("--ficoco-v");
    } else if (o.fastv_k > 0 && vtrim_reduce_add_fastv(ctx, &fp) != 0) {
        rc = fail("--fastv");
    } else if (o.has_trim && vtrim_reduce_add_trim(ctx, &tp) != 0) {
        rc = fail("--trim");
    } else if (o.ficoco_l > 0 && vtrim_reduce_add_ficoco_l(ctx, &fl) != 0) {
        rc = fail("--ficoco-l");
    } else if (o.vlcache >= 0.0f && vtrim_reduce_add_vlcache(ctx, &vp) != 0) {
        rc = fail("--vlcache");
    } else if (o.image && vtrim_image_from_file(o.image, &image) != 0) {
        rc = fail("image");
    } else if (vtrim_sampler_init(&sp, &smp) != 0) {
        rc = fail("sampler");
    } else if (o.prompt) {
        rc = turn(model, ctx, smp, &conv, o.prompt, image, o.n_predict, o.print_tokens);
        if (rc == 0 && g_interrupted) {
            rc = 130;
        }
    } else {
        for (;;) {
            fprintf(stderr, "> ");
            g_interrupted = 0;
            char * line = read_line();
            if (!line || !line[0] || g_interrupted) {
                if (g_interrupted) {
                    fprintf(stderr, "\n");
                    rc = 130;
                }
                free(line);
                break;
            }
            // A failed turn (an image that fits nowhere, a question longer than the context) is reported and
            // the session goes on.
            turn(model, ctx, smp, &conv, line, image, o.n_predict, o.print_tokens);
            free(line);
        }
    }
    vtrim_sampler_free(smp);
    vtrim_image_free(image);
    vtrim_context_free(ctx);
    vtrim_model_free(model);
    return rc;
}
