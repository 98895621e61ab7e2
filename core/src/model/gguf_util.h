// Typed, checked reads of GGUF metadata: a missing required key or a wrong type is a VTRIM_ERR_FORMAT
// naming the key, never an abort inside ggml.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct gguf_context;

bool    vtrim_gguf_has(const struct gguf_context * g, const char * key);
// Integers of any GGUF integer type; fails on other types or when out of int32 range.
int32_t vtrim_gguf_i32(const struct gguf_context * g, const char * key, int32_t * out, bool required);
int32_t vtrim_gguf_f32(const struct gguf_context * g, const char * key, float * out, bool required);
int32_t vtrim_gguf_bool(const struct gguf_context * g, const char * key, bool * out, bool required);
// Copies the string into out (size n); fails if it does not fit.
int32_t vtrim_gguf_str(const struct gguf_context * g, const char * key, char * out, size_t n, bool required);
// An array of n floats exactly.
int32_t vtrim_gguf_f32_array(const struct gguf_context * g, const char * key, float * out, int32_t n, bool required);
// An integer array of at most n_max values; *n receives the count.
int32_t vtrim_gguf_i32_array(const struct gguf_context * g, const char * key, int32_t * out, int32_t n_max,
                             int32_t * n, bool required);
// The same into a new array (*out, freed by the caller even on failure) as long as the file's.
int32_t vtrim_gguf_i32_array_alloc(const struct gguf_context * g, const char * key, int32_t ** out, int32_t * n,
                                   bool required);
