#include "model/gguf_open.h"

#include "ggml.h"
#include "gguf.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

// One forwarding logger for the process (ggml's logger is global); what each thread captures is its own.
static ggml_log_callback g_prev_cb;
static void *            g_prev_data;
static atomic_int        g_installed;   // 0: no, 1: being installed, 2: yes

static _Thread_local char * t_why;
static _Thread_local size_t t_n_why;

static void capture(enum ggml_log_level level, const char * text, void * user_data) {
    if (t_why && level == GGML_LOG_LEVEL_ERROR) {
        if (t_why[0] == '\0') {   // the first error names the cause; later ones are "failed to read ..."
            const char * colon = strstr(text, ": ");   // "gguf_init_from_file_impl: duplicate tensor ..."
            snprintf(t_why, t_n_why, "%s", colon ? colon + 2 : text);
            const size_t n = strlen(t_why);
            if (n > 0 && t_why[n - 1] == '\n') {
                t_why[n - 1] = '\0';
            }
        }
        return;   // it becomes the error message instead of a line on stderr
    }
    if (g_prev_cb) {
        g_prev_cb(level, text, g_prev_data);
    }
}

static void install(void) {
    int expected = 0;
    if (atomic_compare_exchange_strong(&g_installed, &expected, 1)) {
        ggml_log_get(&g_prev_cb, &g_prev_data);
        ggml_log_set(capture, NULL);
        atomic_store(&g_installed, 2);
    }
}

struct gguf_context * vtrim_gguf_open(const char * path, char * why, size_t n_why) {
    install();
    if (n_why > 0) {
        why[0] = '\0';
    }
    t_why = n_why > 0 ? why : NULL;
    t_n_why = n_why;
    struct gguf_init_params gp = { .no_alloc = true, .ctx = NULL };
    struct gguf_context * g = gguf_init_from_file(path, gp);
    t_why = NULL;
    return g;
}
