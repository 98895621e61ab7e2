// Image decoding (every format stb accepts) and, when $VTRIM_FUZZ_MODEL names a model, its preprocessing
// (resize, crop, tiles): arbitrary bytes must give an image or VTRIM_ERR_IMAGE, never a crash.
#include "fuzz_common.h"

static struct vtrim_model * g_model;
static float * g_pixels;
static int64_t g_n_pixels;

int LLVMFuzzerInitialize(int * argc, char *** argv) {
    if (getenv("VTRIM_FUZZ_MODEL")) {
        g_model = fuzz_model_from_env("VTRIM_FUZZ_MODEL", false);
        struct vtrim_image * probe = NULL;
        const uint8_t px[3] = { 1, 2, 3 };
        int64_t n = 0;
        vtrim_image_from_pixels(px, 1, 1, &probe);
        vtrim_image_preprocess(g_model, probe, NULL, 0, &n);   // the size every image preprocesses to
        vtrim_image_free(probe);
        g_n_pixels = n;
        g_pixels = malloc(sizeof(float) * (size_t) (n > 0 ? n : 1));
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    struct vtrim_image * img = NULL;
    const int32_t rc = vtrim_image_from_memory(data, size, &img);
    if (rc != 0) {
        if (img != NULL || (rc != VTRIM_ERR_IMAGE && rc != VTRIM_ERR_INVALID_ARG && rc != VTRIM_ERR_OUT_OF_MEMORY)) {
            abort();   // a failure must leave no image and say what kind of failure it is
        }
        return 0;
    }
    int32_t w = 0, h = 0;
    if (vtrim_image_size(img, &w, &h) != 0 || w <= 0 || h <= 0) {
        abort();
    }
    // Preprocessing is exercised up to 4 megapixels: larger images take the same code paths, and the largest
    // the decoder accepts (VTRIM_IMAGE_MAX_PIXELS, ~179 MP) takes seconds to resize even uninstrumented.
    if (g_model && (int64_t) w * h <= (4 << 20)) {
        int64_t n = 0;
        int32_t n_tiles = 0, ar = 0;
        if (vtrim_image_tiles(g_model, img, &n_tiles, &ar) != 0 ||
            vtrim_image_preprocess(g_model, img, g_pixels, g_n_pixels, &n) != 0 || n != g_n_pixels) {
            abort();   // a decoded image always preprocesses
        }
    }
    vtrim_image_free(img);
    return 0;
}
