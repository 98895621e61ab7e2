// The vocabulary's text side: special-token matching around the two tokenizers (vocab_spm.c, vocab_bpe.c),
// detokenization, and the small containers they share. Loading is in vocab_load.c.
#include "vocab/vocab_internal.h"

#include "api/error.h"

#include <stdlib.h>
#include <string.h>

static const char k_space_marker[] = "\xe2\x96\x81";  // U+2581 "▁", SentencePiece's visible space

// ---- small helpers shared with the tokenizers ---------------------------------------------------

int32_t vtrim_token_list_push(struct vtrim_token_list * list, int32_t token) {
    if (list->n == list->cap) {
        const size_t cap = list->cap ? 2 * list->cap : 64;
        int32_t * data = realloc(list->data, cap * sizeof *data);
        if (!data) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory while tokenizing");
        }
        list->data = data;
        list->cap = cap;
    }
    list->data[list->n++] = token;
    return VTRIM_OK;
}

size_t vtrim_utf8_len(const char * s, size_t avail) {
    static const uint8_t by_high_nibble[16] = { 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4 };
    const size_t want = by_high_nibble[(uint8_t) s[0] >> 4];
    size_t n = 1;
    while (n < want && n < avail && ((uint8_t) s[n] & 0xC0) == 0x80) {
        n++;
    }
    return n;
}

int32_t vtrim_pair_heap_push(struct vtrim_pair_heap * h, struct vtrim_pair p) {
    if (h->n == h->cap) {
        const size_t cap = h->cap ? 2 * h->cap : 64;
        struct vtrim_pair * data = realloc(h->data, cap * sizeof *data);
        if (!data) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory while tokenizing");
        }
        h->data = data;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {   // sift up
        const size_t parent = (i - 1) / 2;
        const struct vtrim_pair * q = &h->data[parent];
        if (q->key < p.key || (q->key == p.key && q->left <= p.left)) {
            break;
        }
        h->data[i] = *q;
        i = parent;
    }
    h->data[i] = p;
    return VTRIM_OK;
}

struct vtrim_pair vtrim_pair_heap_pop(struct vtrim_pair_heap * h) {
    const struct vtrim_pair top = h->data[0];
    const struct vtrim_pair last = h->data[--h->n];
    size_t i = 0;
    for (;;) {   // sift the last element down from the root
        size_t child = 2 * i + 1;
        if (child >= h->n) {
            break;
        }
        const struct vtrim_pair * a = &h->data[child];
        if (child + 1 < h->n) {
            const struct vtrim_pair * b = &h->data[child + 1];
            if (b->key < a->key || (b->key == a->key && b->left < a->left)) {
                a = b;
                child++;
            }
        }
        if (last.key < a->key || (last.key == a->key && last.left <= a->left)) {
            break;
        }
        h->data[i] = *a;
        i = child;
    }
    if (h->n > 0) {
        h->data[i] = last;
    }
    return top;
}

// ---- queries ----------------------------------------------------------------------------------

int32_t vtrim_vocab_n_tokens(const struct vtrim_vocab * v) { return v->n_tokens; }
int32_t vtrim_vocab_bos(const struct vtrim_vocab * v) { return v->bos; }
int32_t vtrim_vocab_eos(const struct vtrim_vocab * v) { return v->eos; }

bool vtrim_vocab_is_eog(const struct vtrim_vocab * v, int32_t token) {
    return token >= 0 && (token == v->eos || token == v->eot || token == v->eom);
}

int32_t vtrim_vocab_find(const struct vtrim_vocab * v, const char * text) {
    return text ? vtrim_vocab_lookup(v, text, strlen(text)) : -1;
}

const char * vtrim_vocab_token_text(const struct vtrim_vocab * v, int32_t token) {
    return token >= 0 && token < v->n_tokens ? vtrim_vocab_text(v, token) : NULL;
}

int32_t vtrim_vocab_token_type(const struct vtrim_vocab * v, int32_t token) {
    return token >= 0 && token < v->n_tokens ? v->types[token] : -1;
}

bool vtrim_vocab_is_spm(const struct vtrim_vocab * v) { return v->kind == VTRIM_VOCAB_SPM; }

// ---- tokenize ---------------------------------------------------------------------------------

static int32_t tokenize_fragment(const struct vtrim_vocab * v, const char * text, size_t len, bool at_start,
                                 struct vtrim_token_list * out) {
    if (len == 0) {
        return VTRIM_OK;
    }
    if (v->kind == VTRIM_VOCAB_SPM) {
        return vtrim_spm_tokenize(v, text, len, at_start || v->prefix_after_special, out);
    }
    return vtrim_bpe_tokenize(v, text, len, out);
}

// The longest special token whose text starts at text[0], or -1. Without parse_special only user-defined
// tokens count (they are part of the vocabulary's text, like "<image>" can be; control tokens are not).
static int32_t match_special(const struct vtrim_vocab * v, const char * text, size_t avail, bool parse_special) {
    if (!v->special_first_byte[(uint8_t) text[0]]) {
        return -1;
    }
    for (int32_t i = 0; i < v->n_specials; i++) {
        const int32_t id = v->specials[i];
        const size_t len = v->text_len[id];
        if (len <= avail && (parse_special || v->types[id] == VTRIM_TOKEN_USER_DEFINED) &&
            memcmp(vtrim_vocab_text(v, id), text, len) == 0) {
            return id;
        }
    }
    return -1;
}

static int32_t tokenize_all(const struct vtrim_vocab * v, const char * text, size_t len, bool add_special,
                            bool parse_special, struct vtrim_token_list * out) {
    int32_t rc;
    if (add_special && v->add_bos && (rc = vtrim_token_list_push(out, v->bos))) {
        return rc;
    }
    size_t start = 0;   // of the text not yet tokenized
    for (size_t pos = 0; pos < len;) {
        const int32_t special = match_special(v, text + pos, len - pos, parse_special);
        if (special < 0) {
            pos++;
            continue;
        }
        if ((rc = tokenize_fragment(v, text + start, pos - start, start == 0, out)) ||
            (rc = vtrim_token_list_push(out, special))) {
            return rc;
        }
        pos += v->text_len[special];
        start = pos;
    }
    if ((rc = tokenize_fragment(v, text + start, len - start, start == 0, out))) {
        return rc;
    }
    if (add_special && v->add_eos && (rc = vtrim_token_list_push(out, v->eos))) {
        return rc;
    }
    return VTRIM_OK;
}

int32_t vtrim_vocab_tokenize_ex(const struct vtrim_vocab * v, const char * text, int32_t text_len,
                                bool add_special, bool parse_special, int32_t * tokens, int32_t n_max,
                                int32_t * n_out) {
    if (!v || !n_out || text_len < 0 || (!text && text_len > 0) || n_max < 0 || (!tokens && n_max > 0)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "tokenize: NULL argument or negative length");
    }
    *n_out = 0;
    struct vtrim_token_list list = { 0 };
    const int32_t rc = tokenize_all(v, text, (size_t) text_len, add_special, parse_special, &list);
    if (rc) {
        free(list.data);
        return rc;
    }
    if (list.n > INT32_MAX) {
        free(list.data);
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "tokenize: the text has more than 2^31 tokens");
    }
    *n_out = (int32_t) list.n;
    if (list.n > (size_t) n_max) {
        free(list.data);
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "the text has %d tokens, the buffer holds %d", *n_out, n_max);
    }
    if (list.n) {
        memcpy(tokens, list.data, list.n * sizeof *tokens);
    }
    free(list.data);
    return VTRIM_OK;
}

int32_t vtrim_vocab_tokenize(const struct vtrim_vocab * v, const char * text, int32_t text_len,
                             bool add_special, int32_t * tokens, int32_t n_max, int32_t * n_out) {
    return vtrim_vocab_tokenize_ex(v, text, text_len, add_special, true, tokens, n_max, n_out);
}

// ---- detokenize -------------------------------------------------------------------------------

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

// The bytes a token stands for, written to dst when it is not NULL; returns their count.
static size_t token_bytes(const struct vtrim_vocab * v, int32_t id, char * dst) {
    const char * text = vtrim_vocab_text(v, id);
    const size_t len = v->text_len[id];
    const uint8_t type = v->types[id];
    if (type == VTRIM_TOKEN_CONTROL || type == VTRIM_TOKEN_UNKNOWN || type == VTRIM_TOKEN_UNUSED) {
        return 0;
    }
    if (type == VTRIM_TOKEN_BYTE) {   // "<0xXX>"
        if (len != 6 || hex_digit(text[3]) < 0 || hex_digit(text[4]) < 0) {
            return 0;
        }
        if (dst) {
            *dst = (char) (hex_digit(text[3]) * 16 + hex_digit(text[4]));
        }
        return 1;
    }
    size_t n = 0;
    if (v->kind == VTRIM_VOCAB_SPM) {
        for (size_t i = 0; i < len;) {
            const bool marker = len - i >= 3 && memcmp(text + i, k_space_marker, 3) == 0;
            if (dst) {
                dst[n] = marker ? ' ' : text[i];
            }
            n++;
            i += marker ? 3 : 1;
        }
        return n;
    }
    if (type == VTRIM_TOKEN_USER_DEFINED) {   // stored as plain text, not in the byte alphabet
        if (dst) {
            memcpy(dst, text, len);
        }
        return len;
    }
    for (size_t i = 0; i < len;) {   // map each codepoint of the byte alphabet back to its byte
        const uint8_t lead = (uint8_t) text[i];
        const size_t cl = vtrim_utf8_len(text + i, len - i);
        int32_t byte = -1;
        if (cl == 1 && lead < 0x80) {
            byte = v->cp_to_byte[lead];
        } else if (cl == 2 && (lead & 0xE0) == 0xC0) {
            const uint32_t cp = (uint32_t) (lead & 0x1F) << 6 | ((uint8_t) text[i + 1] & 0x3F);
            byte = cp < 512 ? v->cp_to_byte[cp] : -1;
        }
        if (byte >= 0) {
            if (dst) {
                dst[n] = (char) byte;
            }
            n++;
        } else {   // not in the alphabet: keep it as it is
            if (dst) {
                memcpy(dst + n, text + i, cl);
            }
            n += cl;
        }
        i += cl;
    }
    return n;
}

int32_t vtrim_vocab_detokenize(const struct vtrim_vocab * v, const int32_t * tokens, int32_t n_tokens,
                               bool remove_leading_space, char * text, int32_t n_max, int32_t * n_out) {
    if (!v || !n_out || n_tokens < 0 || (!tokens && n_tokens > 0) || n_max < 0 || (!text && n_max > 0)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "detokenize: NULL argument or negative count");
    }
    *n_out = 0;
    size_t total = 0;
    for (int32_t i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= v->n_tokens) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "token %d (at %d) is outside the vocabulary of %d tokens",
                              tokens[i], i, v->n_tokens);
        }
        total += token_bytes(v, tokens[i], NULL);
        if (total > INT32_MAX) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "detokenize: the text would exceed 2 GiB");
        }
    }
    char * buf = malloc(total ? total : 1);
    if (!buf) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory while detokenizing");
    }
    size_t n = 0;
    for (int32_t i = 0; i < n_tokens; i++) {
        n += token_bytes(v, tokens[i], buf + n);
    }
    // SentencePiece's dummy prefix: the first word of a text carries a space the text never had.
    const size_t skip = remove_leading_space && v->kind == VTRIM_VOCAB_SPM && v->add_space_prefix &&
                        n > 0 && buf[0] == ' ';
    *n_out = (int32_t) (n - skip);
    if (n - skip > (size_t) n_max) {
        free(buf);
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "the text has %d bytes, the buffer holds %d", *n_out, n_max);
    }
    if (n - skip) {
        memcpy(text, buf + skip, n - skip);
    }
    free(buf);
    return VTRIM_OK;
}
