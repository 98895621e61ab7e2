// vtrim-quantize: a GGUF's weight matrices quantized with ggml's quantizers (C only, as llama-quantize).
#include "vtrim.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char * k_usage =
    "usage: %s [--vision-type T] [-t N] IN.gguf OUT.gguf TYPE\n"
    "\n"
    "Quantizes the weight matrices of a pyvtrim or llama.cpp GGUF (f32/f16/bf16): a single-file model, a\n"
    "text file, or an mmproj (run it once per file of a two-file model). Metadata is copied.\n"
    "\n"
    "  TYPE               the text tower: q8_0, q6_K, q5_K_M, q4_K_M, q4_0 (llama.cpp's per-tensor rules:\n"
    "                     the _M types keep attn_v, ffn_down of some layers and output in Q6_K), or bf16\n"
    "  --vision-type T    the vision tower and projector: q8_0 (default), f16, same (the text's base type),\n"
    "                     or one of the TYPEs\n"
    "  -t, --threads N    threads (default: all cores)\n";

static const struct { const char * name; int32_t type; } k_types[] = {
    { "q8_0", VTRIM_QUANT_Q8_0 }, { "q6_K", VTRIM_QUANT_Q6_K }, { "q5_K_M", VTRIM_QUANT_Q5_K_M },
    { "q4_K_M", VTRIM_QUANT_Q4_K_M }, { "q4_0", VTRIM_QUANT_Q4_0 }, { "f16", VTRIM_QUANT_F16 },
    { "bf16", VTRIM_QUANT_BF16 },
    { "same", VTRIM_QUANT_SAME },
};

static int type_of(const char * s, bool vision, int32_t * out) {
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++) {
        const bool vision_only = k_types[i].type == VTRIM_QUANT_F16 || k_types[i].type == VTRIM_QUANT_SAME;
        if (strcmp(s, k_types[i].name) == 0 && (vision || !vision_only)) {
            *out = k_types[i].type;
            return 0;
        }
    }
    return -1;
}

int main(int argc, char ** argv) {
    struct vtrim_quantize_params p;
    vtrim_quantize_params_default(&p);
    const char * pos[3] = { NULL, NULL, NULL };
    int n_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char * a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf(k_usage, argv[0]);
            return 0;
        }
        if (!strcmp(a, "--vision-type") || !strcmp(a, "-t") || !strcmp(a, "--threads")) {
            const char * v = i + 1 < argc ? argv[++i] : NULL;
            char * end = NULL;
            errno = 0;
            const long n = v ? strtol(v, &end, 10) : 0;
            if (!v) {
                fprintf(stderr, "%s: %s needs a value\n", argv[0], a);
                return 2;
            }
            if (a[1] == '-' && a[2] == 'v') {
                if (type_of(v, true, &p.vision_type) != 0) {
                    fprintf(stderr, "%s: --vision-type %s: expected q8_0, f16, bf16, same, q6_K, q5_K_M, q4_K_M or q4_0\n",
                            argv[0], v);
                    return 2;
                }
            } else if (errno || end == v || *end || n < 1 || n > 1024) {
                fprintf(stderr, "%s: %s %s: expected an integer in [1, 1024]\n", argv[0], a, v);
                return 2;
            } else {
                p.n_threads = (int32_t) n;
            }
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "%s: unknown option %s; see --help\n", argv[0], a);
            return 2;
        } else if (n_pos < 3) {
            pos[n_pos++] = a;
        } else {
            fprintf(stderr, "%s: too many arguments; see --help\n", argv[0]);
            return 2;
        }
    }
    if (n_pos != 3) {
        fprintf(stderr, k_usage, argv[0]);
        return 2;
    }
    if (type_of(pos[2], false, &p.type) != 0) {
        fprintf(stderr, "%s: TYPE %s: expected q8_0, q6_K, q5_K_M, q4_K_M or q4_0\n", argv[0], pos[2]);
        return 2;
    }
    struct vtrim_quantize_report r;
    if (vtrim_quantize(pos[0], pos[1], &p, &r) != 0) {
        fprintf(stderr, "%s: %s\n", argv[0], vtrim_last_error());
        return 1;
    }
    fprintf(stderr, "%s: %d tensors, %d quantized, %d with a fallback type; %.1f MiB -> %.1f MiB\n", pos[1],
            r.n_tensors, r.n_quantized, r.n_fallback, r.bytes_in / 1048576.0, r.bytes_out / 1048576.0);
    return 0;
}
