// Tokenizers read from a GGUF's tokenizer.ggml.* keys: SentencePiece (model "llama", Llama-2) and
// byte-level BPE (model "gpt2", pre "llama-bpe", Llama-3). Semantics as in vtrim.h.
#pragma once

#include <stdbool.h>
#include <stdint.h>

struct gguf_context;
struct vtrim_vocab;

enum vtrim_token_type {   // as tokenizer.ggml.token_type stores them
    VTRIM_TOKEN_NORMAL = 1, VTRIM_TOKEN_UNKNOWN = 2, VTRIM_TOKEN_CONTROL = 3,
    VTRIM_TOKEN_USER_DEFINED = 4, VTRIM_TOKEN_UNUSED = 5, VTRIM_TOKEN_BYTE = 6,
};

int32_t vtrim_vocab_load(const struct gguf_context * gguf, struct vtrim_vocab ** out);
void    vtrim_vocab_free(struct vtrim_vocab * vocab);

int32_t vtrim_vocab_n_tokens(const struct vtrim_vocab * vocab);
int32_t vtrim_vocab_bos(const struct vtrim_vocab * vocab);
int32_t vtrim_vocab_eos(const struct vtrim_vocab * vocab);
bool    vtrim_vocab_is_eog(const struct vtrim_vocab * vocab, int32_t token);
// The id of a token's exact text, or -1.
int32_t vtrim_vocab_find(const struct vtrim_vocab * vocab, const char * text);

int32_t vtrim_vocab_tokenize(const struct vtrim_vocab * vocab, const char * text, int32_t text_len,
                             bool add_special, int32_t * tokens, int32_t n_max, int32_t * n_out);
int32_t vtrim_vocab_detokenize(const struct vtrim_vocab * vocab, const int32_t * tokens, int32_t n_tokens,
                               bool remove_leading_space, char * text, int32_t n_max, int32_t * n_out);

// ---- additions ------------------------------------------------------------------------------------

// vtrim_vocab_tokenize with a choice: parse_special false leaves control tokens written in the text as plain
// text (user-defined tokens are still matched), as llama.cpp's test vectors expect.
// vtrim_vocab_tokenize is this with parse_special true.
int32_t vtrim_vocab_tokenize_ex(const struct vtrim_vocab * vocab, const char * text, int32_t text_len,
                                bool add_special, bool parse_special, int32_t * tokens, int32_t n_max,
                                int32_t * n_out);
// A token's text as the vocabulary stores it (SentencePiece "▁", GPT-2 byte alphabet), or NULL out of range.
const char * vtrim_vocab_token_text(const struct vtrim_vocab * vocab, int32_t token);
// enum vtrim_token_type of a token, or -1 out of range.
int32_t vtrim_vocab_token_type(const struct vtrim_vocab * vocab, int32_t token);
// True for SentencePiece (Llama-2, LLaVA-1.5), false for byte-level BPE (Llama-3, mllama).
bool    vtrim_vocab_is_spm(const struct vtrim_vocab * vocab);
