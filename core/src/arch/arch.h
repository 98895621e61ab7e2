// Per-architecture pieces behind one small interface: hyperparameters, tensor binding, graphs.
#pragma once

#include "model.h"

struct gguf_context;

// text: the main GGUF; mmproj: llama.cpp's separate vision file, or NULL.
int32_t vtrim_arch_read_hparams(struct vtrim_model * m, const struct gguf_context * text,
                                const struct gguf_context * mmproj);
int32_t vtrim_arch_bind_tensors(struct vtrim_model * m);
// vtrim_vocab_tokenize for this model: where the image placeholder has no token of its own (llama.cpp's
// LLaVA-1.5 text file), the text "<image>" becomes its virtual id (n_vocab).
int32_t vtrim_arch_tokenize(const struct vtrim_model * m, const char * text, int32_t text_len, bool add_special,
                            int32_t * tokens, int32_t n_max, int32_t * n_out);
// The image placeholder's text (e.g. "<image>"), or NULL for a model that takes no images.
const char * vtrim_arch_image_placeholder(const struct vtrim_model * m);

// llama.c: the Llama decoder
// arch: the key prefix ("llama", "mllama")
int32_t vtrim_llama_read_hparams(struct vtrim_model * m, const struct gguf_context * g, const char * arch);
int32_t vtrim_llama_bind_tensors(struct vtrim_model * m);

// clip.c: the CLIP vision tower (LLaVA) and its mlp2x projector
int32_t vtrim_clip_read_hparams(struct vtrim_model * m, const struct gguf_context * g, bool legacy);
int32_t vtrim_clip_bind_tensors(struct vtrim_model * m);

// mllama.c: Llama-3.2-Vision (text hparams via llama.c, vision tower, cross-attention layers)
int32_t vtrim_mllama_read_hparams(struct vtrim_model * m, const struct gguf_context * g);
int32_t vtrim_mllama_bind_tensors(struct vtrim_model * m);
// The layer's index among the cross-attention layers, or -1 for a self-attention layer.
int32_t vtrim_mllama_cross_index(const struct vtrim_model * m, int il);
int32_t vtrim_mllama_bind_cross_layer(struct vtrim_model * m, int il);
