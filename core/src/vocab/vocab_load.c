// Loading a vocabulary: the tokenizer.ggml.* keys of a GGUF, checked and turned into the hash indexes the
// tokenizers look tokens and merges up in, the special-token list and the byte tables.
#include "vocab/vocab_internal.h"

#include "api/error.h"
#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KEY_MODEL        "tokenizer.ggml.model"
#define KEY_PRE          "tokenizer.ggml.pre"
#define KEY_TOKENS       "tokenizer.ggml.tokens"
#define KEY_SCORES       "tokenizer.ggml.scores"
#define KEY_TYPES        "tokenizer.ggml.token_type"
#define KEY_MERGES       "tokenizer.ggml.merges"
#define KEY_ADD_BOS      "tokenizer.ggml.add_bos_token"
#define KEY_ADD_EOS      "tokenizer.ggml.add_eos_token"
#define KEY_ADD_PREFIX   "tokenizer.ggml.add_space_prefix"

// ---- hash indexes -----------------------------------------------------------------------------

static uint64_t hash_bytes(const char * s, size_t n) {   // FNV-1a
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t) s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t hash_u64(uint64_t x) {   // splitmix64's finalizer
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27; x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// A power of two with at least twice as many slots as entries, so probe chains stay short.
static uint32_t slot_count(size_t n_entries) {
    uint32_t n = 16;
    while (n < 2 * n_entries) {
        n *= 2;
    }
    return n;
}

int32_t vtrim_vocab_lookup(const struct vtrim_vocab * v, const char * bytes, size_t len) {
    for (uint32_t i = (uint32_t) hash_bytes(bytes, len) & v->text_mask;; i = (i + 1) & v->text_mask) {
        const int32_t slot = v->text_slots[i];
        if (slot == 0) {
            return -1;
        }
        const int32_t id = slot - 1;
        if (v->text_len[id] == len && memcmp(vtrim_vocab_text(v, id), bytes, len) == 0) {
            return id;
        }
    }
}

const struct vtrim_merge_slot * vtrim_vocab_merge(const struct vtrim_vocab * v, int32_t left, int32_t right) {
    if (!v->merge_slots) {
        return NULL;
    }
    const uint64_t key = (uint64_t) (uint32_t) left << 32 | (uint32_t) right;
    for (uint32_t i = (uint32_t) hash_u64(key) & v->merge_mask;; i = (i + 1) & v->merge_mask) {
        const struct vtrim_merge_slot * s = &v->merge_slots[i];
        if (s->key == key) {
            return s;
        }
        if (s->key == VTRIM_MERGE_EMPTY) {
            return NULL;
        }
    }
}

// Indexes every token's text; a text that appears twice keeps its lowest id.
static int32_t build_text_index(struct vtrim_vocab * v) {
    const uint32_t n_slots = slot_count((size_t) v->n_tokens);
    v->text_slots = calloc(n_slots, sizeof *v->text_slots);
    if (!v->text_slots) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the token index");
    }
    v->text_mask = n_slots - 1;
    for (int32_t id = 0; id < v->n_tokens; id++) {
        const char * text = vtrim_vocab_text(v, id);
        uint32_t i = (uint32_t) hash_bytes(text, v->text_len[id]) & v->text_mask;
        for (;; i = (i + 1) & v->text_mask) {
            const int32_t slot = v->text_slots[i];
            if (slot == 0) {
                v->text_slots[i] = id + 1;
                break;
            }
            if (v->text_len[slot - 1] == v->text_len[id] &&
                memcmp(vtrim_vocab_text(v, slot - 1), text, v->text_len[id]) == 0) {
                break;
            }
        }
    }
    return VTRIM_OK;
}

// ---- reading the GGUF keys --------------------------------------------------------------------

// The id of `key` if it has type `type` (for arrays: of elements `elem`); -1 if it is absent and optional.
static int32_t find_key(const struct gguf_context * g, const char * key, enum gguf_type type, enum gguf_type elem,
                        bool required, int64_t * id) {
    *id = gguf_find_key(g, key);
    if (*id < 0) {
        return required ? vtrim_fail(VTRIM_ERR_FORMAT, "%s is missing", key) : VTRIM_OK;
    }
    const enum gguf_type t = gguf_get_kv_type(g, *id);
    if (t != type || (type == GGUF_TYPE_ARRAY && gguf_get_arr_type(g, *id) != elem)) {
        const enum gguf_type shown = t == GGUF_TYPE_ARRAY ? gguf_get_arr_type(g, *id) : t;
        return vtrim_fail(VTRIM_ERR_FORMAT, "%s has type %s%s, expected %s%s", key,
                          t == GGUF_TYPE_ARRAY ? "array of " : "", gguf_type_name(shown),
                          type == GGUF_TYPE_ARRAY ? "array of " : "",
                          gguf_type_name(type == GGUF_TYPE_ARRAY ? elem : type));
    }
    return VTRIM_OK;
}

static int32_t read_bool(const struct gguf_context * g, const char * key, bool dflt, bool * out, bool * present) {
    int64_t id;
    const int32_t rc = find_key(g, key, GGUF_TYPE_BOOL, GGUF_TYPE_BOOL, false, &id);
    if (rc) {
        return rc;
    }
    *out = id < 0 ? dflt : gguf_get_val_bool(g, id);
    if (present) {
        *present = id >= 0;
    }
    return VTRIM_OK;
}

// A token id stored as any integer type; -1 when absent. Ids outside the vocabulary are an error.
static int32_t read_token_id(const struct gguf_context * g, const char * key, int32_t n_tokens, int32_t * out) {
    *out = -1;
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        return VTRIM_OK;
    }
    int64_t value;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8:  value = gguf_get_val_u8(g, id);  break;
        case GGUF_TYPE_INT8:   value = gguf_get_val_i8(g, id);  break;
        case GGUF_TYPE_UINT16: value = gguf_get_val_u16(g, id); break;
        case GGUF_TYPE_INT16:  value = gguf_get_val_i16(g, id); break;
        case GGUF_TYPE_UINT32: value = gguf_get_val_u32(g, id); break;
        case GGUF_TYPE_INT32:  value = gguf_get_val_i32(g, id); break;
        case GGUF_TYPE_INT64:  value = gguf_get_val_i64(g, id); break;
        case GGUF_TYPE_UINT64: {
            const uint64_t u = gguf_get_val_u64(g, id);
            value = u > INT64_MAX ? -1 : (int64_t) u;
            break;
        }
        default:
            return vtrim_fail(VTRIM_ERR_FORMAT, "%s has type %s, expected an integer", key,
                              gguf_type_name(gguf_get_kv_type(g, id)));
    }
    if (value < 0 || value >= n_tokens) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "%s is %lld, outside the vocabulary of %d tokens", key,
                          (long long) value, n_tokens);
    }
    *out = (int32_t) value;
    return VTRIM_OK;
}

static int32_t read_kind(struct vtrim_vocab * v, const struct gguf_context * g) {
    int64_t id;
    int32_t rc = find_key(g, KEY_MODEL, GGUF_TYPE_STRING, GGUF_TYPE_STRING, true, &id);
    if (rc) {
        return rc;
    }
    const char * model = gguf_get_val_str(g, id);
    if (strcmp(model, "llama") == 0) {
        v->kind = VTRIM_VOCAB_SPM;
        return VTRIM_OK;
    }
    if (strcmp(model, "gpt2") != 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "%s is \"%s\"; supported: \"llama\" (SentencePiece), "
                          "\"gpt2\" (byte-level BPE)", KEY_MODEL, model);
    }
    v->kind = VTRIM_VOCAB_BPE;
    rc = find_key(g, KEY_PRE, GGUF_TYPE_STRING, GGUF_TYPE_STRING, false, &id);
    if (rc) {
        return rc;
    }
    // Files written before tokenizer.ggml.pre existed, and "default", get the Llama-3 split.
    const char * pre = id < 0 ? "default" : gguf_get_val_str(g, id);
    if (strcmp(pre, "llama-bpe") != 0 && strcmp(pre, "llama3") != 0 && strcmp(pre, "default") != 0) {
        return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "%s is \"%s\"; supported: \"llama-bpe\"", KEY_PRE, pre);
    }
    return VTRIM_OK;
}

static int32_t read_tokens(struct vtrim_vocab * v, const struct gguf_context * g) {
    int64_t id;
    int32_t rc = find_key(g, KEY_TOKENS, GGUF_TYPE_ARRAY, GGUF_TYPE_STRING, true, &id);
    if (rc) {
        return rc;
    }
    const size_t n = gguf_get_arr_n(g, id);
    if (n == 0 || n > INT32_MAX / 2) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "%s has %zu entries", KEY_TOKENS, n);
    }
    v->n_tokens = (int32_t) n;
    v->text_off = malloc(n * sizeof *v->text_off);
    v->text_len = malloc(n * sizeof *v->text_len);
    v->scores   = calloc(n, sizeof *v->scores);
    v->types    = malloc(n);
    if (!v->text_off || !v->text_len || !v->scores || !v->types) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for %zu tokens", n);
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const size_t len = strlen(gguf_get_arr_str(g, id, i));
        if (len > UINT32_MAX - total - 1) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "%s: the token texts exceed 4 GiB", KEY_TOKENS);
        }
        v->text_off[i] = (uint32_t) total;
        v->text_len[i] = (uint32_t) len;
        total += len + 1;
    }
    v->text_blob = malloc(total);
    if (!v->text_blob) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the token texts");
    }
    for (size_t i = 0; i < n; i++) {
        memcpy(v->text_blob + v->text_off[i], gguf_get_arr_str(g, id, i), v->text_len[i] + 1);
    }

    rc = find_key(g, KEY_SCORES, GGUF_TYPE_ARRAY, GGUF_TYPE_FLOAT32, v->kind == VTRIM_VOCAB_SPM, &id);
    if (rc) {
        return rc;
    }
    if (id >= 0) {
        if (gguf_get_arr_n(g, id) != n) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "%s has %zu entries for %zu tokens", KEY_SCORES,
                              gguf_get_arr_n(g, id), n);
        }
        memcpy(v->scores, gguf_get_arr_data(g, id), n * sizeof *v->scores);
    }

    rc = find_key(g, KEY_TYPES, GGUF_TYPE_ARRAY, GGUF_TYPE_INT32, false, &id);
    if (rc) {
        return rc;
    }
    if (id < 0) {
        memset(v->types, VTRIM_TOKEN_NORMAL, n);
        return VTRIM_OK;
    }
    if (gguf_get_arr_n(g, id) != n) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "%s has %zu entries for %zu tokens", KEY_TYPES, gguf_get_arr_n(g, id), n);
    }
    const int32_t * types = gguf_get_arr_data(g, id);
    for (size_t i = 0; i < n; i++) {
        if (types[i] < 0 || types[i] > VTRIM_TOKEN_BYTE) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "%s[%zu] is %d, not a token type (0..6)", KEY_TYPES, i, types[i]);
        }
        v->types[i] = (uint8_t) (types[i] == 0 ? VTRIM_TOKEN_NORMAL : types[i]);  // 0: "undefined"
    }
    return VTRIM_OK;
}

// Merges are "left right" in rank order; a rule whose parts or result are not tokens can never apply to the
// token-id symbols vocab_bpe.c merges, so it is left out.
static int32_t read_merges(struct vtrim_vocab * v, const struct gguf_context * g) {
    int64_t id;
    int32_t rc = find_key(g, KEY_MERGES, GGUF_TYPE_ARRAY, GGUF_TYPE_STRING, true, &id);
    if (rc) {
        return rc;
    }
    const size_t n = gguf_get_arr_n(g, id);
    if (n > INT32_MAX / 4) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "%s has %zu entries", KEY_MERGES, n);
    }
    const uint32_t n_slots = slot_count(n);
    v->merge_slots = malloc((size_t) n_slots * sizeof *v->merge_slots);
    if (!v->merge_slots) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for %zu merges", n);
    }
    v->merge_mask = n_slots - 1;
    for (uint32_t i = 0; i < n_slots; i++) {
        v->merge_slots[i].key = VTRIM_MERGE_EMPTY;
    }
    char * joined = NULL;
    size_t joined_cap = 0;
    for (size_t r = 0; r < n; r++) {
        const char * rule = gguf_get_arr_str(g, id, r);
        const size_t len = strlen(rule);
        const char * space = len > 1 ? memchr(rule + 1, ' ', len - 1) : NULL;
        if (!space) {
            free(joined);
            return vtrim_fail(VTRIM_ERR_FORMAT, "%s[%zu] is \"%s\", not two tokens separated by a space",
                              KEY_MERGES, r, rule);
        }
        const size_t n_left = (size_t) (space - rule), n_right = len - n_left - 1;
        const int32_t left = vtrim_vocab_lookup(v, rule, n_left);
        const int32_t right = vtrim_vocab_lookup(v, space + 1, n_right);
        if (left < 0 || right < 0) {
            continue;
        }
        if (n_left + n_right > joined_cap) {
            free(joined);
            joined_cap = 2 * (n_left + n_right);
            joined = malloc(joined_cap);
            if (!joined) {
                return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory while reading merges");
            }
        }
        memcpy(joined, rule, n_left);
        memcpy(joined + n_left, space + 1, n_right);
        const int32_t merged = vtrim_vocab_lookup(v, joined, n_left + n_right);
        if (merged < 0) {
            continue;
        }
        const uint64_t key = (uint64_t) (uint32_t) left << 32 | (uint32_t) right;
        uint32_t i = (uint32_t) hash_u64(key) & v->merge_mask;
        while (v->merge_slots[i].key != VTRIM_MERGE_EMPTY && v->merge_slots[i].key != key) {
            i = (i + 1) & v->merge_mask;
        }
        if (v->merge_slots[i].key == VTRIM_MERGE_EMPTY) {   // a repeated rule keeps its first rank
            v->merge_slots[i] = (struct vtrim_merge_slot) { key, (int32_t) r, merged };
        }
    }
    free(joined);
    return VTRIM_OK;
}

static int32_t read_special_ids(struct vtrim_vocab * v, const struct gguf_context * g) {
    static const char * const keys[6] = {
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
    };
    int32_t * const ids[6] = { &v->bos, &v->eos, &v->unk, &v->pad, &v->eot, &v->eom };
    for (int i = 0; i < 6; i++) {
        const int32_t rc = read_token_id(g, keys[i], v->n_tokens, ids[i]);
        if (rc) {
            return rc;
        }
    }
    // Llama-3 instruct models end a turn with <|eot_id|> (and a tool call with <|eom_id|>), while their GGUF
    // often names only <|end_of_text|> as EOS; generation must stop on all of them.
    if (v->eot < 0) {
        const int32_t t = vtrim_vocab_find(v, "<|eot_id|>");
        v->eot = t >= 0 && v->types[t] == VTRIM_TOKEN_CONTROL ? t : -1;
    }
    if (v->eom < 0) {
        const int32_t t = vtrim_vocab_find(v, "<|eom_id|>");
        v->eom = t >= 0 && v->types[t] == VTRIM_TOKEN_CONTROL ? t : -1;
    }

    bool explicit_bos, explicit_eos;
    int32_t rc = read_bool(g, KEY_ADD_BOS, true, &v->add_bos, &explicit_bos);
    if (rc == VTRIM_OK) {
        rc = read_bool(g, KEY_ADD_EOS, false, &v->add_eos, &explicit_eos);
    }
    if (rc == VTRIM_OK) {
        rc = read_bool(g, KEY_ADD_PREFIX, v->kind == VTRIM_VOCAB_SPM, &v->add_space_prefix, NULL);
    }
    if (rc) {
        return rc;
    }
    if (v->add_bos && v->bos < 0) {
        if (explicit_bos) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "%s is set but tokenizer.ggml.bos_token_id is missing", KEY_ADD_BOS);
        }
        v->add_bos = false;
    }
    if (v->add_eos && v->eos < 0) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "%s is set but tokenizer.ggml.eos_token_id is missing", KEY_ADD_EOS);
    }
    return VTRIM_OK;
}

// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes (controls,
// space, DEL, NBSP, soft hyphen) for the codepoints from U+0100 on, in byte order.
static void build_byte_alphabet(struct vtrim_vocab * v) {
    uint32_t next = 256;
    for (int i = 0; i < 512; i++) {
        v->cp_to_byte[i] = -1;
    }
    for (uint32_t b = 0; b < 256; b++) {
        const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        v->byte_to_cp[b] = printable ? b : next++;
        v->cp_to_byte[v->byte_to_cp[b]] = (int16_t) b;
    }
}

static size_t utf8_encode(uint32_t cp, char * out) {
    if (cp < 0x80) {
        out[0] = (char) cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char) (0xC0 | (cp >> 6));
        out[1] = (char) (0x80 | (cp & 0x3F));
        return 2;
    }
    out[0] = (char) (0xE0 | (cp >> 12));   // the alphabet never goes past U+0143
    out[1] = (char) (0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char) (0x80 | (cp & 0x3F));
    return 3;
}

static void find_byte_tokens(struct vtrim_vocab * v) {
    for (int b = 0; b < 256; b++) {
        char text[8];
        size_t len;
        if (v->kind == VTRIM_VOCAB_SPM) {
            len = (size_t) snprintf(text, sizeof text, "<0x%02X>", b);
        } else {
            len = utf8_encode(v->byte_to_cp[b], text);
        }
        v->byte_token[b] = vtrim_vocab_lookup(v, text, len);
    }
}

struct special_key {
    uint32_t len;
    int32_t  id;
};

static int by_length_desc(const void * a, const void * b) {
    const struct special_key * x = a, * y = b;
    if (x->len != y->len) {
        return x->len > y->len ? -1 : 1;
    }
    return x->id < y->id ? -1 : x->id > y->id;
}

static bool is_special_type(uint8_t type) {
    return type == VTRIM_TOKEN_CONTROL || type == VTRIM_TOKEN_USER_DEFINED || type == VTRIM_TOKEN_UNKNOWN;
}

static int32_t collect_specials(struct vtrim_vocab * v) {
    size_t n = 0;
    for (int32_t id = 0; id < v->n_tokens; id++) {
        n += is_special_type(v->types[id]) && v->text_len[id] > 0;
    }
    struct special_key * keys = malloc((n ? n : 1) * sizeof *keys);
    v->specials = malloc((n ? n : 1) * sizeof *v->specials);
    if (!keys || !v->specials) {
        free(keys);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the special tokens");
    }
    n = 0;
    for (int32_t id = 0; id < v->n_tokens; id++) {
        if (is_special_type(v->types[id]) && v->text_len[id] > 0) {
            keys[n++] = (struct special_key) { v->text_len[id], id };
            v->special_first_byte[(uint8_t) vtrim_vocab_text(v, id)[0]] = 1;
        }
    }
    qsort(keys, n, sizeof *keys, by_length_desc);
    for (size_t i = 0; i < n; i++) {
        v->specials[i] = keys[i].id;
    }
    v->n_specials = (int32_t) n;
    free(keys);
    return VTRIM_OK;
}

// ---- load / free ------------------------------------------------------------------------------

static int32_t load_into(struct vtrim_vocab * v, const struct gguf_context * g) {
    int32_t rc;
    if ((rc = read_kind(v, g)) || (rc = read_tokens(v, g)) || (rc = build_text_index(v))) {
        return rc;
    }
    if (v->kind == VTRIM_VOCAB_BPE && (rc = read_merges(v, g))) {
        return rc;
    }
    if ((rc = read_special_ids(v, g)) || (rc = collect_specials(v))) {
        return rc;
    }
    build_byte_alphabet(v);
    find_byte_tokens(v);
    // transformers' LlamaTokenizer (legacy=False, the default and what LLaVA-1.5's tokenizer uses) prefixes
    // only the start of the text with "▁", not the text after a special token such as <image>.
    v->prefix_after_special = false;
    v->ignore_merges = v->kind == VTRIM_VOCAB_BPE;
    return VTRIM_OK;
}

int32_t vtrim_vocab_load(const struct gguf_context * gguf, struct vtrim_vocab ** out) {
    if (!gguf || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_vocab_load: NULL argument");
    }
    *out = NULL;
    struct vtrim_vocab * v = calloc(1, sizeof *v);
    if (!v) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the vocabulary");
    }
    v->bos = v->eos = v->unk = v->pad = v->eot = v->eom = -1;
    const int32_t rc = load_into(v, gguf);
    if (rc) {
        vtrim_vocab_free(v);
        return rc;
    }
    *out = v;
    return VTRIM_OK;
}

void vtrim_vocab_free(struct vtrim_vocab * v) {
    if (!v) {
        return;
    }
    free(v->text_blob);
    free(v->text_off);
    free(v->text_len);
    free(v->scores);
    free(v->types);
    free(v->text_slots);
    free(v->merge_slots);
    free(v->specials);
    free(v);
}
