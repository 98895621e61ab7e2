// Byte-level BPE as Llama-3's tokenizer runs it: the text is split into pre-tokens by the Llama-3 regex
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// (matched here by hand, alternative by alternative, leftmost first), each pre-token's bytes become the
// tokens of GPT-2's byte alphabet, and adjacent tokens merge by rank, lowest rank first.
#include "vocab/vocab_internal.h"

#include "api/error.h"
#include "vocab/unicode_tables.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// ---- the pre-tokenizer ------------------------------------------------------------------------

#define CP_END     UINT32_MAX   // past the end of the text
#define CP_INVALID 0x110000u    // a byte that does not start valid UTF-8: in no class, like punctuation

// The codepoint at byte `pos` and, in *next, where the one after it starts.
static uint32_t cp_at(const uint8_t * s, size_t len, size_t pos, size_t * next) {
    if (pos >= len) {
        *next = len;
        return CP_END;
    }
    const uint8_t b = s[pos];
    *next = pos + 1;
    if (b < 0x80) {
        return b;
    }
    const size_t n = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
    if (n == 0 || n > len - pos) {
        return CP_INVALID;
    }
    uint32_t cp = b & (0x7F >> n);
    for (size_t i = 1; i < n; i++) {
        if ((s[pos + i] & 0xC0) != 0x80) {
            return CP_INVALID;
        }
        cp = cp << 6 | (s[pos + i] & 0x3F);
    }
    *next = pos + n;
    return cp;
}

static uint32_t flags_of(uint32_t cp) {
    return cp == CP_END ? 0 : vtrim_unicode_flags(cp);
}

static bool is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// [^\s\p{L}\p{N}]
static bool is_other(uint32_t cp) {
    const uint32_t classes = VTRIM_UNICODE_WHITESPACE | VTRIM_UNICODE_LETTER | VTRIM_UNICODE_NUMBER;
    return cp != CP_END && (flags_of(cp) & classes) == 0;
}

static uint32_t ascii_lower(uint32_t cp) { return cp >= 'A' && cp <= 'Z' ? cp + 32 : cp; }

// End of the run of letters starting at pos.
static size_t skip_letters(const uint8_t * s, size_t len, size_t pos) {
    size_t next;
    while (flags_of(cp_at(s, len, pos, &next)) & VTRIM_UNICODE_LETTER) {
        pos = next;
    }
    return pos;
}

// End of the regex's match at pos (pos < len).
static size_t match_at(const uint8_t * s, size_t len, size_t pos) {
    size_t p1, p2, p3, q;
    const uint32_t c0 = cp_at(s, len, pos, &p1);
    const uint32_t f0 = flags_of(c0);
    const uint32_t c1 = cp_at(s, len, p1, &p2);

    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if (c0 == '\'') {
        const uint32_t l1 = ascii_lower(c1);
        if (l1 == 's' || l1 == 't' || l1 == 'm' || l1 == 'd') {
            return p2;
        }
        const uint32_t l2 = ascii_lower(cp_at(s, len, p2, &p3));
        if ((l1 == 'r' && l2 == 'e') || (l1 == 'v' && l2 == 'e') || (l1 == 'l' && l2 == 'l')) {
            return p3;
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (f0 & VTRIM_UNICODE_LETTER) {
        return skip_letters(s, len, p1);
    }
    if (!is_newline(c0) && !(f0 & VTRIM_UNICODE_NUMBER) && (flags_of(c1) & VTRIM_UNICODE_LETTER)) {
        return skip_letters(s, len, p2);
    }
    // \p{N}{1,3}
    if (f0 & VTRIM_UNICODE_NUMBER) {
        q = p1;
        for (int i = 1; i < 3 && (flags_of(cp_at(s, len, q, &p2)) & VTRIM_UNICODE_NUMBER); i++) {
            q = p2;
        }
        return q;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    q = c0 == ' ' ? p1 : pos;
    if (is_other(cp_at(s, len, q, &p2))) {
        while (is_other(cp_at(s, len, q, &p2))) {
            q = p2;
        }
        while (is_newline(cp_at(s, len, q, &p2))) {
            q = p2;
        }
        return q;
    }
    // \s*[\r\n]+ ends after the run's last newline; else \s+(?!\S) leaves the run's last whitespace to start
    // the next word (" world"), unless the run ends the text; else \s+.
    size_t end = pos, last_start = pos, after_newline = 0, count = 0;
    for (uint32_t c; (c = cp_at(s, len, end, &q)) != CP_END && (flags_of(c) & VTRIM_UNICODE_WHITESPACE); count++) {
        if (is_newline(c)) {
            after_newline = q;
        }
        last_start = end;
        end = q;
    }
    if (after_newline) {
        return after_newline;
    }
    if (count >= 2 && end < len) {
        return last_start;
    }
    return count ? end : p1;   // every codepoint is in one of the classes above; p1 only guards progress
}

size_t vtrim_llama3_pretokenize(const char * text, size_t len, size_t * ends) {
    const uint8_t * s = (const uint8_t *) text;
    size_t n = 0;
    for (size_t pos = 0; pos < len; pos = ends[n - 1]) {
        ends[n++] = match_at(s, len, pos);
    }
    return n;
}

// ---- byte-level BPE ---------------------------------------------------------------------------

struct bpe_symbol {
    int32_t id;      // -1 for a byte with no token of its own
    int32_t prev;
    int32_t next;    // -1 at the ends
    bool    alive;   // false once merged into its left neighbour
};

struct bpe_session {
    const struct vtrim_vocab * v;
    struct bpe_symbol *  sym;
    struct vtrim_pair_heap heap;
    char *               mapped;   // a pre-token in the byte alphabet (at most 2 bytes per byte)
};

static int32_t queue_pair(struct bpe_session * s, int32_t left, int32_t right) {
    if (left < 0 || right < 0 || s->sym[left].id < 0 || s->sym[right].id < 0) {
        return VTRIM_OK;
    }
    const struct vtrim_merge_slot * m = vtrim_vocab_merge(s->v, s->sym[left].id, s->sym[right].id);
    if (!m) {
        return VTRIM_OK;
    }
    const struct vtrim_pair p = { (double) m->rank, left, right, m->merged };
    return vtrim_pair_heap_push(&s->heap, p);
}

// A symbol that is still a lone byte without a token of its own becomes the unknown token.
static int32_t push_or_unknown(const struct vtrim_vocab * v, int32_t id, uint8_t byte, struct vtrim_token_list * out) {
    if (id < 0) {
        if (v->unk < 0) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "byte 0x%02X has no token in the vocabulary, which has no unknown "
                              "token", byte);
        }
        id = v->unk;
    }
    return vtrim_token_list_push(out, id);
}

// The whole pre-token as one token, when the vocabulary has it (Llama-3's ignore_merges), else -1.
static int32_t whole_word(struct bpe_session * s, const uint8_t * word, size_t len) {
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        const uint32_t cp = s->v->byte_to_cp[word[i]];
        if (cp < 0x80) {
            s->mapped[n++] = (char) cp;
        } else {
            s->mapped[n++] = (char) (0xC0 | (cp >> 6));
            s->mapped[n++] = (char) (0x80 | (cp & 0x3F));
        }
    }
    const int32_t id = vtrim_vocab_lookup(s->v, s->mapped, n);
    return id >= 0 && s->v->types[id] == VTRIM_TOKEN_NORMAL ? id : -1;
}

static int32_t tokenize_word(struct bpe_session * s, const uint8_t * word, size_t len, struct vtrim_token_list * out) {
    int32_t rc;
    if (s->v->ignore_merges) {
        const int32_t id = whole_word(s, word, len);
        if (id >= 0) {
            return vtrim_token_list_push(out, id);
        }
    }
    for (size_t i = 0; i < len; i++) {
        s->sym[i] = (struct bpe_symbol) { s->v->byte_token[word[i]], (int32_t) i - 1,
                                          i + 1 < len ? (int32_t) i + 1 : -1, true };
    }
    s->heap.n = 0;
    for (size_t i = 1; i < len; i++) {
        if ((rc = queue_pair(s, (int32_t) i - 1, (int32_t) i))) {
            return rc;
        }
    }
    while (s->heap.n > 0) {
        const struct vtrim_pair p = vtrim_pair_heap_pop(&s->heap);
        struct bpe_symbol * l = &s->sym[p.left];
        struct bpe_symbol * r = &s->sym[p.right];
        // Stale: a side has merged with something else since; the rule for the current pair (if any) was queued
        // when that pair formed.
        if (!l->alive || !r->alive || l->next != p.right) {
            continue;
        }
        const struct vtrim_merge_slot * m = vtrim_vocab_merge(s->v, l->id, r->id);
        if (!m || m->merged != p.check || (double) m->rank != p.key) {
            continue;
        }
        l->id = m->merged;
        r->alive = false;
        l->next = r->next;
        if (r->next >= 0) {
            s->sym[r->next].prev = p.left;
        }
        if ((rc = queue_pair(s, l->prev, p.left)) || (rc = queue_pair(s, p.left, l->next))) {
            return rc;
        }
    }
    for (int32_t i = 0; i >= 0; i = s->sym[i].next) {
        if ((rc = push_or_unknown(s->v, s->sym[i].id, word[i], out))) {
            return rc;
        }
    }
    return VTRIM_OK;
}

int32_t vtrim_bpe_tokenize(const struct vtrim_vocab * v, const char * text, size_t len, struct vtrim_token_list * out) {
    if (len > INT32_MAX / 2) {   // symbols are indexed with int32_t
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "tokenize: the text is too long (%zu bytes)", len);
    }
    size_t * ends = malloc(len * sizeof *ends);
    struct bpe_session s = { v, malloc(len * sizeof *s.sym), { 0 }, malloc(2 * len) };
    int32_t rc = VTRIM_OK;
    if (!ends || !s.sym || !s.mapped) {
        rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory while tokenizing");
    } else {
        const size_t n_words = vtrim_llama3_pretokenize(text, len, ends);
        for (size_t w = 0, start = 0; w < n_words && rc == VTRIM_OK; start = ends[w++]) {
            rc = tokenize_word(&s, (const uint8_t *) text + start, ends[w] - start, out);
        }
    }
    free(s.heap.data);
    free(s.mapped);
    free(s.sym);
    free(ends);
    return rc;
}
