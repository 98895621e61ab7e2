// Thread-local error messages behind every VTRIM_ERR_* return.
#pragma once

#include "vtrim.h"

#if defined(__GNUC__)
#  define VTRIM_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#  define VTRIM_PRINTF(a, b)
#endif

// Sets this thread's message and returns `code`, so a failure reads `return vtrim_fail(VTRIM_ERR_IO, ...)`.
int32_t vtrim_fail(int32_t code, const char * fmt, ...) VTRIM_PRINTF(2, 3);
// Prefixes the current message with more context ("loading x.gguf: ") and returns `code`.
int32_t vtrim_fail_prefix(int32_t code, const char * fmt, ...) VTRIM_PRINTF(2, 3);
void    vtrim_clear_error(void);
