#include "api/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#if defined(_MSC_VER)
#  define THREAD_LOCAL __declspec(thread)
#else
#  define THREAD_LOCAL _Thread_local
#endif

static THREAD_LOCAL char g_message[1024];

int32_t vtrim_fail(int32_t code, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_message, sizeof g_message, fmt, ap);
    va_end(ap);
    return code;
}

int32_t vtrim_fail_prefix(int32_t code, const char * fmt, ...) {
    char prefix[256];
    char old[sizeof g_message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, g_message, sizeof old);
    snprintf(g_message, sizeof g_message, "%s%.*s", prefix, (int) (sizeof g_message - sizeof prefix), old);
    return code;
}

void vtrim_clear_error(void) { g_message[0] = '\0'; }

const char * vtrim_last_error(void) { return g_message; }
