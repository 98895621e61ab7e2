// SentencePiece BPE as Llama-2's tokenizer runs it: spaces become "▁", the text gets a "▁" in front, and
// adjacent pieces are merged greedily, the pair whose merged piece has the highest score first. Characters
// that never became a piece fall back to their UTF-8 bytes (<0xXX> tokens).
#include "vocab/vocab_internal.h"

#include "api/error.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char k_space_marker[] = "\xe2\x96\x81";  // U+2581 "▁"

struct spm_symbol {
    size_t  start;   // in the escaped text
    size_t  len;     // 0 once merged into its left neighbour
    int32_t prev;
    int32_t next;    // -1 at the ends
};

struct spm_session {
    const struct vtrim_vocab * v;
    const char *          text;   // escaped
    struct spm_symbol *   sym;
    struct vtrim_pair_heap heap;
};

// Merges only ever produce ordinary pieces: control, unknown, unused and byte tokens are never the result of
// merging text (SentencePiece keeps them out of its piece table).
static int32_t find_piece(const struct vtrim_vocab * v, const char * s, size_t len) {
    const int32_t id = vtrim_vocab_lookup(v, s, len);
    if (id < 0) {
        return -1;
    }
    const uint8_t t = v->types[id];
    return t == VTRIM_TOKEN_NORMAL || t == VTRIM_TOKEN_USER_DEFINED ? id : -1;
}

static int32_t queue_pair(struct spm_session * s, int32_t left, int32_t right) {
    if (left < 0 || right < 0) {
        return VTRIM_OK;
    }
    const size_t len = s->sym[left].len + s->sym[right].len;
    const int32_t id = find_piece(s->v, s->text + s->sym[left].start, len);
    if (id < 0) {
        return VTRIM_OK;
    }
    const struct vtrim_pair p = { -(double) s->v->scores[id], left, right, (int32_t) len };
    return vtrim_pair_heap_push(&s->heap, p);
}

static int32_t emit_bytes(const struct vtrim_vocab * v, const char * s, size_t len, struct vtrim_token_list * out) {
    for (size_t i = 0; i < len; i++) {
        const uint8_t b = (uint8_t) s[i];
        const int32_t id = v->byte_token[b] >= 0 ? v->byte_token[b] : v->unk;
        if (id < 0) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "byte 0x%02X has no <0x%02X> token and the vocabulary has no "
                              "unknown token", b, b);
        }
        const int32_t rc = vtrim_token_list_push(out, id);
        if (rc) {
            return rc;
        }
    }
    return VTRIM_OK;
}

static int32_t merge_and_emit(struct spm_session * s, size_t n_sym, struct vtrim_token_list * out) {
    int32_t rc;
    for (size_t i = 1; i < n_sym; i++) {
        if ((rc = queue_pair(s, (int32_t) i - 1, (int32_t) i))) {
            return rc;
        }
    }
    while (s->heap.n > 0) {
        const struct vtrim_pair p = vtrim_pair_heap_pop(&s->heap);
        struct spm_symbol * l = &s->sym[p.left];
        struct spm_symbol * r = &s->sym[p.right];
        // Stale: one side has been merged into something else since the pair was queued.
        if (l->len == 0 || r->len == 0 || l->next != p.right || l->len + r->len != (size_t) p.check) {
            continue;
        }
        l->len += r->len;
        r->len = 0;
        l->next = r->next;
        if (r->next >= 0) {
            s->sym[r->next].prev = p.left;
        }
        if ((rc = queue_pair(s, l->prev, p.left)) || (rc = queue_pair(s, p.left, l->next))) {
            return rc;
        }
    }
    for (int32_t i = 0; i >= 0; i = s->sym[i].next) {
        const struct spm_symbol * sym = &s->sym[i];
        const int32_t id = find_piece(s->v, s->text + sym->start, sym->len);
        rc = id >= 0 ? vtrim_token_list_push(out, id) : emit_bytes(s->v, s->text + sym->start, sym->len, out);
        if (rc) {
            return rc;
        }
    }
    return VTRIM_OK;
}

int32_t vtrim_spm_tokenize(const struct vtrim_vocab * v, const char * text, size_t len, bool at_text_start,
                           struct vtrim_token_list * out) {
    const bool prefix = v->add_space_prefix && at_text_start;
    size_t n_spaces = 0;
    for (size_t i = 0; i < len; i++) {
        n_spaces += text[i] == ' ';
    }
    const size_t n_esc = len + 2 * n_spaces + (prefix ? 3 : 0);
    if (n_esc > INT32_MAX) {   // symbols are indexed with int32_t
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "tokenize: the text is too long (%zu bytes escaped)", n_esc);
    }
    char * esc = malloc(n_esc);
    struct spm_symbol * sym = malloc(n_esc * sizeof *sym);
    if (!esc || !sym) {
        free(esc);
        free(sym);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory while tokenizing");
    }
    size_t n = 0;
    if (prefix) {
        memcpy(esc, k_space_marker, 3);
        n = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(esc + n, k_space_marker, 3);
            n += 3;
        } else {
            esc[n++] = text[i];
        }
    }
    size_t n_sym = 0;
    for (size_t pos = 0; pos < n_esc;) {   // one symbol per UTF-8 character
        const size_t cl = vtrim_utf8_len(esc + pos, n_esc - pos);
        sym[n_sym] = (struct spm_symbol) { pos, cl, (int32_t) n_sym - 1, pos + cl < n_esc ? (int32_t) n_sym + 1 : -1 };
        n_sym++;
        pos += cl;
    }
    struct spm_session s = { v, esc, sym, { 0 } };
    const int32_t rc = n_sym > 0 ? merge_and_emit(&s, n_sym, out) : VTRIM_OK;
    free(s.heap.data);
    free(sym);
    free(esc);
    return rc;
}
