// Graph pieces of the Llama decoder, shared by LLaVA (and the text stack of mllama).
#pragma once

#include "kv_cache.h"
#include "model.h"

// Input tensors a decoder graph asks the caller to fill (NULL when absent).
struct vtrim_llama_inputs {
    struct ggml_tensor * text_ids;    // I32 [n_text]: token ids of the text positions, in order
    struct ggml_tensor * image_embd;  // F32 [n_embd, n_image]: image embeddings, in order
    struct ggml_tensor * order;       // I32 [n_tokens]: row of [text..., image...] for each position
    struct ggml_tensor * pos;         // I32 [n_tokens]: RoPE positions
    struct ggml_tensor * mask;        // F32 [n_kv, n_tokens]: 0 where visible, -INF elsewhere
};

struct ggml_tensor * vtrim_llama_build_inp_embd(struct ggml_context * ctx, const struct vtrim_model * m,
                                                struct vtrim_llama_inputs * in, int32_t n_text, int32_t n_image,
                                                int32_t n_tokens);
// Runs all decoder layers over `embd` ([n_embd, n_tokens]), appending K/V at row kv->n[il] of every layer,
// and returns the logits of the last position ([n_vocab, 1]). Does not advance kv->n.
struct ggml_tensor * vtrim_llama_build_decoder(struct ggml_context * ctx, struct ggml_cgraph * gf,
                                               const struct vtrim_model * m, struct vtrim_kv_cache * kv,
                                               struct ggml_tensor * embd, struct vtrim_llama_inputs * in);
