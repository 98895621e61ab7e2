// The after-prefill hook (VTRIM_HOOK_AFTER_PREFILL): a method that reshapes the KV cache once the prompt ran,
// from the attention of query rows whose Q the prefill captured (runtime/after_prefill.c).
#pragma once

#include "runtime/stages.h"

// Before the prompt runs: capture the Q of p's query rows (p->r->query_rows over rows) in every layer.
int32_t vtrim_capture_begin(struct vtrim_context * ctx, const struct vtrim_policy * p, const struct vtrim_rows * rows);
void    vtrim_capture_end(struct vtrim_context * ctx);

// After every layer ran with the capture: score, let the method choose each layer's rows per KV head, compact
// the cache (the KV cache is unchanged on error) and record the stage.
int32_t vtrim_stage_after_prefill(struct vtrim_context * ctx, const struct vtrim_policy * p);
// A prompt without images: the stage records that nothing was dropped.
void    vtrim_stage_after_prefill_none(struct vtrim_context * ctx, const struct vtrim_policy * p);
