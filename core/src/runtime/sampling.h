// The sampler's decision from one row of logits, apart from any context, so it can be tested (and reused)
// on plain arrays. vtrim_sampler_sample (vtrim.h) reads the context's logits and calls this.
#pragma once

#include "vtrim.h"

// Picks the next token from n_vocab logits as the sampler's parameters say (see struct vtrim_sampler_params)
// and advances its random generator when it draws. NaN logits never win; fails with VTRIM_ERR_INVALID_ARG
// when every logit is NaN.
int32_t vtrim_sample_logits(struct vtrim_sampler * s, const float * logits, int32_t n_vocab, int32_t * token);

// The vocabulary size of the context's model (runtime/context.c): all the sampler needs of a context.
int32_t vtrim_context_vocab_size(const struct vtrim_context * ctx);
