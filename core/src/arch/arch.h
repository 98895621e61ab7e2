// Per-architecture pieces behind one small interface: hyperparameters, tensor binding, graphs.
#pragma once

#include "model.h"

struct gguf_context;

// text: the main GGUF; mmproj: llama.cpp's separate vision file, or NULL.
int32_t vtrim_arch_read_hparams(struct vtrim_model * m, const struct gguf_context * text,
                                const struct gguf_context * mmproj);
int32_t vtrim_arch_bind_tensors(struct vtrim_model * m);

// llama.c: the Llama decoder
int32_t vtrim_llama_read_hparams(struct vtrim_model * m, const struct gguf_context * g);
int32_t vtrim_llama_bind_tensors(struct vtrim_model * m);

// clip.c: the CLIP vision tower (LLaVA) and its mlp2x projector
int32_t vtrim_clip_read_hparams(struct vtrim_model * m, const struct gguf_context * g, bool legacy);
int32_t vtrim_clip_bind_tensors(struct vtrim_model * m);
