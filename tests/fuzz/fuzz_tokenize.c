// The tokenizers (SentencePiece: $VTRIM_FUZZ_VOCAB_SPM; byte-level BPE: $VTRIM_FUZZ_VOCAB_BPE, the real Llama-2
// and Llama-3 vocabularies), detokenizing, and the chat formatter on arbitrary bytes.
// Input: byte 0 = flags (bit 0: BPE, bit 1: add BOS, bit 2: remove the leading space), byte 1 = images (0-3),
// the rest = text (not NUL-terminated, any bytes).
#include "fuzz_common.h"

static struct vtrim_model * g_vocab[2];
static struct vtrim_model * g_model;   // optional ($VTRIM_FUZZ_MODEL): a chat format with images

int LLVMFuzzerInitialize(int * argc, char *** argv) {
    g_vocab[0] = fuzz_model_from_env("VTRIM_FUZZ_VOCAB_SPM", true);
    g_vocab[1] = fuzz_model_from_env("VTRIM_FUZZ_VOCAB_BPE", true);
    if (getenv("VTRIM_FUZZ_MODEL")) {
        g_model = fuzz_model_from_env("VTRIM_FUZZ_MODEL", true);
    }
    return 0;
}

// Detokenizes tokens with a buffer sized by a first call that reports the size.
static void detokenize(const struct vtrim_model * m, const int32_t * tok, int32_t n, bool strip) {
    int32_t need = 0;
    int32_t rc = vtrim_detokenize(m, tok, n, strip, NULL, 0, &need);
    if (rc == VTRIM_ERR_BUFFER_TOO_SMALL) {
        char * text = malloc((size_t) need + 1);
        int32_t got = 0;
        if (!text || vtrim_detokenize(m, tok, n, strip, text, need, &got) != 0 || got != need) {
            abort();   // the size it asked for must be enough
        }
        free(text);
    } else if (rc != 0 && rc != VTRIM_ERR_INVALID_ARG) {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 2 || size > (1 << 16)) {
        return 0;
    }
    const struct vtrim_model * m = g_vocab[data[0] & 1];
    const bool bos = data[0] & 2, strip = data[0] & 4;
    const int32_t n_images = data[1] % 4;
    const char * text = (const char *) data + 2;
    const int32_t len = (int32_t) size - 2;

    const int32_t cap = len + 8;   // at most one token per byte, plus BOS
    int32_t * tok = malloc(sizeof(int32_t) * (size_t) cap);
    int32_t n = 0;
    if (vtrim_tokenize(m, text, len, bos, tok, cap, &n) != 0 || n > cap) {
        abort();   // any bytes tokenize
    }
    detokenize(m, tok, n, strip);
    // arbitrary ids: in range or a clean error
    int32_t ids[16];
    const int32_t n_ids = len / 4 < 16 ? len / 4 : 16;
    memcpy(ids, text, sizeof(int32_t) * (size_t) n_ids);
    detokenize(m, ids, n_ids, strip);
    free(tok);

    // the chat format of the text as a question (NUL-terminated copy: the API takes a C string)
    char * q = malloc((size_t) len + 1);
    memcpy(q, text, (size_t) len);
    q[len] = '\0';
    const struct vtrim_model * fm = g_model ? g_model : m;
    int32_t need = 0;
    int32_t rc = vtrim_chat_format(fm, q, g_model ? n_images : 0, NULL, 0, &need);
    if (rc == VTRIM_ERR_BUFFER_TOO_SMALL) {
        char * out = malloc((size_t) need + 1);
        int32_t got = 0;
        if (vtrim_chat_format(fm, q, g_model ? n_images : 0, out, need, &got) != 0 || got != need) {
            abort();
        }
        free(out);
    } else if (rc != 0 && rc != VTRIM_ERR_UNSUPPORTED) {
        abort();
    }
    free(q);
    return 0;
}
