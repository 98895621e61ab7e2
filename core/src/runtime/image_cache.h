// The image-embedding cache of a model: what the vision tower and projector made of an image, keyed by a hash
// of its preprocessed pixels, shared by every context of the model (llama.cpp re-encodes an image every turn
// and in every sequence). Bounded in bytes, least recently used out first; thread-safe.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vtrim_image_cache;

// NULL (no cache) when cap_bytes is 0 or the platform has no mutex here; *rc < 0 on failure.
struct vtrim_image_cache * vtrim_image_cache_new(int64_t cap_bytes, int32_t * rc);
void                       vtrim_image_cache_free(struct vtrim_image_cache * cache);

uint64_t vtrim_image_cache_key(const float * pixels, int64_t n);
// On a hit: copies the rows (embd [n_rows][n_embd], src [n_rows]) out and returns true. max_rows bounds them.
bool     vtrim_image_cache_get(struct vtrim_image_cache * cache, uint64_t key, int32_t n_embd, int32_t max_rows,
                               float * embd, int32_t * src, int32_t * n_rows);
// Keeps a copy (evicting the least recently used as needed; an entry larger than the cache is not kept).
void     vtrim_image_cache_put(struct vtrim_image_cache * cache, uint64_t key, int32_t n_embd, int32_t n_rows,
                               const float * embd, const int32_t * src);
int64_t  vtrim_image_cache_bytes(const struct vtrim_image_cache * cache);
