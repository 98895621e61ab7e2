// What vocab_load.c, vocab.c, vocab_spm.c and vocab_bpe.c share: the vocabulary's layout, its hash indexes and the
// growable token list the tokenizers append to. Not part of the runtime's interface (see vocab.h).
#pragma once

#include "vocab/vocab.h"

#include <stddef.h>
#include <stdint.h>

enum vtrim_vocab_kind { VTRIM_VOCAB_SPM, VTRIM_VOCAB_BPE };

// One BPE merge rule in the (left id, right id) -> (rank, merged id) index.
struct vtrim_merge_slot {
    uint64_t key;      // left << 32 | right; VTRIM_MERGE_EMPTY marks a free slot
    int32_t  rank;     // position in tokenizer.ggml.merges: lower merges first
    int32_t  merged;   // id of left's text followed by right's text
};
#define VTRIM_MERGE_EMPTY UINT64_MAX

struct vtrim_vocab {
    enum vtrim_vocab_kind kind;
    int32_t    n_tokens;
    char *     text_blob;    // every token's text, each NUL-terminated
    uint32_t * text_off;     // [n_tokens] start of a token's text in text_blob
    uint32_t * text_len;     // [n_tokens]
    float *    scores;       // [n_tokens] SentencePiece merge priority (0 for BPE)
    uint8_t *  types;        // [n_tokens] enum vtrim_token_type

    int32_t *  text_slots;   // open addressing: token id + 1 per slot, 0 = free
    uint32_t   text_mask;    // slot count - 1 (a power of two)

    struct vtrim_merge_slot * merge_slots;   // BPE only
    uint32_t   merge_mask;

    // Tokens matched verbatim in the text before the rest is tokenized, longest text first.
    int32_t *  specials;
    int32_t    n_specials;
    uint8_t    special_first_byte[256];      // 1 where some special token's text starts with this byte

    int32_t    byte_token[256];  // SPM: the <0xXX> token of a byte; BPE: the token of the byte's mapped char
    uint32_t   byte_to_cp[256];  // BPE: GPT-2's printable codepoint standing for each byte
    int16_t    cp_to_byte[512];  // its inverse (-1 where no byte maps there)

    int32_t bos, eos, unk, pad, eot, eom;    // -1 where the vocabulary has none
    bool    add_bos, add_eos;
    bool    add_space_prefix;        // SPM: text starts with "▁" like SentencePiece's dummy prefix
    bool    prefix_after_special;    // SPM: also prefix the text that follows a special token (legacy)
    bool    ignore_merges;           // BPE (Llama-3): a pre-token that is itself a token is taken whole
};

// A growing list of token ids. Every append can fail with VTRIM_ERR_OUT_OF_MEMORY.
struct vtrim_token_list {
    int32_t * data;
    size_t    n;
    size_t    cap;
};

int32_t vtrim_token_list_push(struct vtrim_token_list * list, int32_t token);

static inline const char * vtrim_vocab_text(const struct vtrim_vocab * v, int32_t id) {
    return v->text_blob + v->text_off[id];
}

// The id of the token whose text is exactly bytes[0, len), or -1.
int32_t vtrim_vocab_lookup(const struct vtrim_vocab * v, const char * bytes, size_t len);
// The merge rule for two adjacent tokens, or NULL.
const struct vtrim_merge_slot * vtrim_vocab_merge(const struct vtrim_vocab * v, int32_t left, int32_t right);

// Bytes of the UTF-8 character at s: what its lead byte announces, cut short at the first byte that is not a
// continuation byte (so a broken sequence never swallows the next character) and at `avail`. At least 1.
size_t vtrim_utf8_len(const char * s, size_t avail);

// Tokenizers of one piece of text without special tokens; they append to `out`.
// at_text_start: the fragment starts the caller's text (SentencePiece adds its dummy prefix there).
int32_t vtrim_spm_tokenize(const struct vtrim_vocab * v, const char * text, size_t len, bool at_text_start,
                           struct vtrim_token_list * out);
int32_t vtrim_bpe_tokenize(const struct vtrim_vocab * v, const char * text, size_t len,
                           struct vtrim_token_list * out);

// Splits text as the Llama-3 pre-tokenizer regex does. Writes the byte offset where each piece ends into
// ends (capacity len: every piece is at least one byte) and returns the number of pieces.
size_t vtrim_llama3_pretokenize(const char * text, size_t len, size_t * ends);

// A binary min-heap of candidate merges of two adjacent symbols, ordered by key then left index.
struct vtrim_pair {
    double  key;       // SPM: -score; BPE: rank
    int32_t left;      // symbol indices
    int32_t right;
    int32_t check;     // what the pair looked like when queued (SPM: byte length; BPE: merged id)
};

struct vtrim_pair_heap {
    struct vtrim_pair * data;
    size_t n;
    size_t cap;
};

int32_t vtrim_pair_heap_push(struct vtrim_pair_heap * h, struct vtrim_pair p);
struct vtrim_pair vtrim_pair_heap_pop(struct vtrim_pair_heap * h);   // h->n must be > 0
