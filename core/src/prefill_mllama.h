// Llama-3.2-Vision's part of the prefill: images into the cross-attention cache, which rows see which
// image, and the Trimmed Llama stage.
#pragma once

#include "context.h"
#include "forward.h"

// Each image through the vision tower; K/V of its states into the cross cache. With trim_pending only the
// first cross layer's K/V are computed and the states are kept for vtrim_mllama_trim.
int32_t vtrim_mllama_encode(struct vtrim_context * ctx, struct vtrim_image * const * images, int32_t n_images,
                            bool trim_pending);
// The images each prompt row cross-attends to (bit i: image i), as HF's get_cross_attention_token_mask.
void    vtrim_mllama_cross_visibility(const struct vtrim_model * m, const int32_t * tokens, int32_t n, uint32_t * sees);
// Trimmed Llama at the first cross layer: rows (the prompt) with h_in their states entering it. Chooses the
// kept states, computes the trimmed layers' K/V from them and records the stage.
int32_t vtrim_mllama_trim(struct vtrim_context * ctx, const struct vtrim_reduce_params * p,
                          const struct vtrim_rows * rows, const float * h_in, struct vtrim_reduce_stage * stage);
// The image states the trimmed layers hold (all real-tile states when nothing was trimmed), as rows of the
// prefill's image-major states, into ctx->kept_image_rows.
int32_t vtrim_mllama_record_kept(struct vtrim_context * ctx);
