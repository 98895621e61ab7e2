// The prefill path on a tiny model ($VTRIM_FUZZ_MODEL): random token ids (some out of range), image counts
// that may not match the placeholders, small images of any shape, FastV parameters in and out of range, and
// a decode after. Every call returns 0 or an error; after an error the context still prefills.
// Input: byte 0 = images (0-2), byte 1 = FastV k, byte 2 = FastV ratio (/ 200), byte 3 = image width,
// byte 4 = image height, then token ids as little-endian 16-bit values (0xFFFF: the image placeholder).
#include "fuzz_common.h"

static struct vtrim_model * g_model;
static struct vtrim_context * g_ctx;
static struct vtrim_model_info g_info;

int LLVMFuzzerInitialize(int * argc, char *** argv) {
    g_model = fuzz_model_from_env("VTRIM_FUZZ_MODEL", false);
    vtrim_model_get_info(g_model, &g_info);
    struct vtrim_context_params cp;
    vtrim_context_params_default(&cp);
    cp.n_ctx = 256;
    cp.n_batch = 64;   // several chunks for the longer inputs
    cp.n_threads = 1;
    if (vtrim_context_init(g_model, &cp, &g_ctx) != 0) {
        fprintf(stderr, "context: %s\n", vtrim_last_error());
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 5 || size > 5 + 2 * 300) {
        return 0;
    }
    const int32_t n_images = data[0] % 3, w = 1 + data[3] % 48, h = 1 + data[4] % 48;
    const int32_t n_tok = (int32_t) (size - 5) / 2;
    int32_t * tok = malloc(sizeof(int32_t) * (size_t) (n_tok > 0 ? n_tok : 1));
    for (int32_t i = 0; i < n_tok; i++) {
        const int32_t v = data[5 + 2 * i] | (data[6 + 2 * i] << 8);
        tok[i] = v == 0xFFFF ? g_info.image_token_id : v % (g_info.n_vocab + 8);   // a few out of range
    }
    struct vtrim_image * images[2] = { NULL, NULL };
    uint8_t * px = malloc((size_t) w * (size_t) h * 3);
    for (int32_t i = 0; i < w * h * 3; i++) {
        px[i] = (uint8_t) (i * 31 + data[2]);
    }
    for (int32_t i = 0; i < n_images; i++) {
        if (vtrim_image_from_pixels(px, w, h, &images[i]) != 0) {
            abort();
        }
    }
    vtrim_context_reset(g_ctx);
    vtrim_reduce_clear(g_ctx);
    if (data[1] != 0) {
        struct vtrim_fastv_params fp;
        vtrim_fastv_default(&fp);
        fp.k = data[1] % 8;
        fp.ratio = data[2] / 200.0f;   // up to 1.275: out of range above 200
        vtrim_reduce_add_fastv(g_ctx, &fp);   // may refuse: then the prefill runs unreduced
    }
    int32_t rc = vtrim_prefill(g_ctx, tok, n_tok, images, n_images);
    if (rc == 0) {
        rc = vtrim_decode(g_ctx, 1);
        if (rc != 0 && rc != VTRIM_ERR_CONTEXT_FULL) {
            fprintf(stderr, "decode after a prefill: %s\n", vtrim_last_error());
            abort();
        }
    } else if (vtrim_last_error()[0] == '\0') {
        abort();
    }
    for (int32_t i = 0; i < n_images; i++) {
        vtrim_image_free(images[i]);
    }
    free(px);
    free(tok);
    return 0;
}
