// The chat formatter (vtrim_chat_format) on arbitrary questions and image counts, for every template the seed
// models carry: LLaVA-1.5 with images ($VTRIM_FUZZ_MODEL), a text-only llama ($VTRIM_FUZZ_MODEL_TEXT) and the
// real Llama-2 / Llama-3 vocabularies ($VTRIM_FUZZ_VOCAB_SPM / _BPE, their files' own templates).
// Input: byte 0 = model, bytes 1-4 = n_images as a raw int32 (so negative and huge counts too), the rest = the
// question (up to its first NUL: the API takes a C string).
// Checked beyond "no crash": the size a probe reports is the size written; the prompt is the template's
// prefix + one fixed piece per image + the question verbatim + the suffix (the lengths add up and the question
// is there); the prompt tokenizes; impossible counts fail before any allocation (-malloc_limit_mb would catch it).
#include "fuzz_common.h"

#include <stdint.h>

enum { N_MODELS = 4, MAX_FORMATTED = 1 << 20 };
static struct vtrim_model * g_models[N_MODELS];

int LLVMFuzzerInitialize(int * argc, char *** argv) {
    g_models[0] = fuzz_model_from_env("VTRIM_FUZZ_MODEL", true);
    g_models[1] = fuzz_model_from_env("VTRIM_FUZZ_MODEL_TEXT", true);
    g_models[2] = fuzz_model_from_env("VTRIM_FUZZ_VOCAB_SPM", true);
    g_models[3] = fuzz_model_from_env("VTRIM_FUZZ_VOCAB_BPE", true);
    return 0;
}

// The size vtrim_chat_format reports for (q, n); -1 when it refuses.
static int64_t probe(const struct vtrim_model * m, const char * q, int32_t n) {
    int32_t need = -1;
    const int32_t rc = vtrim_chat_format(m, q, n, NULL, 0, &need);
    if (rc == 0 || rc == VTRIM_ERR_BUFFER_TOO_SMALL) {
        return need;
    }
    if (rc != VTRIM_ERR_INVALID_ARG && rc != VTRIM_ERR_UNSUPPORTED) {
        abort();   // a refusal is an argument or capability error, nothing else
    }
    return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 5 || size > (1 << 16)) {
        return 0;
    }
    const struct vtrim_model * m = g_models[data[0] % N_MODELS];
    int32_t n_images;
    memcpy(&n_images, data + 1, sizeof n_images);
    char * q = malloc(size - 4);
    memcpy(q, data + 5, size - 5);
    q[size - 5] = '\0';

    const int64_t need = probe(m, q, n_images);
    if (n_images < 0 && need >= 0) {
        abort();   // a negative count is an argument error
    }
    if (need >= 0) {
        const int64_t bare = probe(m, "", 0), one = probe(m, "", n_images > 0 ? 1 : 0);
        if (bare < 0 || one < bare || need != bare + (int64_t) strlen(q) + (int64_t) n_images * (one - bare)) {
            abort();   // prefix + n x (placeholder + separator) + question + suffix
        }
    }
    if (need >= 0 && need <= MAX_FORMATTED) {
        char * out = malloc((size_t) need + 1);
        int32_t got = -1;
        // one byte short must be refused with the size, the exact size must be enough (no room for a NUL)
        if (need > 0 && vtrim_chat_format(m, q, n_images, out, (int32_t) need - 1, &got) != VTRIM_ERR_BUFFER_TOO_SMALL) {
            abort();
        }
        if (vtrim_chat_format(m, q, n_images, out, (int32_t) need, &got) != 0 || got != need) {
            abort();
        }
        out[need] = '\0';
        if (!strstr(out, q)) {
            abort();   // the user's text reaches the prompt unchanged
        }
        // the prompt tokenizes, in a buffer of the size a first call reports (a space can cost three
        // byte-fallback tokens in a small vocabulary, so no per-byte bound holds)
        int32_t n_tok = 0, n_again = 0;
        int32_t rc = vtrim_tokenize(m, out, (int32_t) need, true, NULL, 0, &n_tok);
        if (rc != VTRIM_ERR_BUFFER_TOO_SMALL || n_tok <= 0) {
            abort();
        }
        int32_t * tok = malloc(sizeof(int32_t) * (size_t) n_tok);
        if (vtrim_tokenize(m, out, (int32_t) need, true, tok, n_tok, &n_again) != 0 || n_again != n_tok) {
            abort();
        }
        free(tok);
        free(out);
    }
    free(q);
    return 0;
}
