// Graph of the CLIP vision tower + mlp2x projector (LLaVA-1.5).
#pragma once

#include "model.h"

// One image: fills *pixels (F32 [image_size, image_size, 3], the CHW floats of vtrim_image_preprocess)
// and returns the image embeddings [n_embd_text, n_image_tokens].
struct ggml_tensor * vtrim_clip_build(struct ggml_context * ctx, struct ggml_cgraph * gf,
                                      const struct vtrim_model * m, struct ggml_tensor ** pixels);
