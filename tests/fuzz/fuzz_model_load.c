// Model loading from arbitrary bytes (the GGUF header, metadata, tensor table, the architecture's checks,
// the vocabulary): a model or an error, never a crash, a hang or an allocation the file cannot back.
// Seeds: tests/fuzz/corpus/model_load (tiny valid GGUFs from tests/fuzz/make_seeds.py).
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    char path[64];
    const int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0) {
        return 0;
    }
    struct vtrim_model_params mp;
    vtrim_model_params_default(&mp);
    mp.device = VTRIM_DEVICE_CPU;
    for (int vocab_only = 0; vocab_only <= 1; vocab_only++) {
        mp.vocab_only = vocab_only;
        struct vtrim_model * m = NULL;
        const int32_t rc = vtrim_model_load(path, NULL, &mp, &m);
        if (rc == 0) {
            struct vtrim_model_info info;
            if (vtrim_model_get_info(m, &info) != 0) {
                abort();
            }
            int32_t tok[64], n = 0;
            const char * text = "Hello <image> world";
            vtrim_tokenize(m, text, (int32_t) strlen(text), true, tok, 64, &n);
            vtrim_model_free(m);
        } else if (m != NULL || rc >= 0 || vtrim_last_error()[0] == '\0') {
            abort();   // an error leaves no model and says why
        }
    }
    close(fd);
    return 0;
}
