// Opening a GGUF with ggml's parser, and saying why it refused a file: ggml reports the cause (a duplicate
// tensor name, a string longer than the file, a shape that overflows) only through its log, so the log is
// captured for the duration of the parse and its first error becomes the message.
#pragma once

#include <stddef.h>

struct gguf_context;

// The parsed metadata (no tensor data), or NULL with ggml's first error line in why ("" if it logged none).
struct gguf_context * vtrim_gguf_open(const char * path, char * why, size_t n_why);
