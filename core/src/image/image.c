// Image objects and decoding: any file stb_image reads becomes packed 8-bit RGB, converted the way the HF
// image processors convert what PIL opens (transformers' convert_to_rgb):
//   grey            -> the grey level in R, G and B;
//   with alpha      -> composited onto opaque white with Pillow's integer alpha_composite (not alpha dropped,
//                      which is what a bare PIL convert("RGB") would do): grey+alpha, RGBA, palettes and
//                      colour keys with transparency (tRNS), GIF;
//   16-bit PNG      -> the high byte of each sample (stb). PIL does the same for 16-bit RGB(A), but opens
//                      16-bit grey as mode I;16 and clips it to 255 on convert("RGB"); we keep the high byte.
// EXIF orientation is ignored, as PIL.Image.open ignores it. Truncated or corrupt PNG/JPEG files are errors
// (image_verify.c), as they are for PIL.
#include "image/image.h"

#include "api/error.h"
#include "stb_image.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int32_t check_size(int32_t code, const char * what, int64_t w, int64_t h) {
    if (w <= 0 || h <= 0) return vtrim_fail(code, "%s: empty image (%lld x %lld)", what, (long long)w, (long long)h);
    if (w > VTRIM_IMAGE_MAX_SIDE || h > VTRIM_IMAGE_MAX_SIDE || w * h > VTRIM_IMAGE_MAX_PIXELS) {
        return vtrim_fail(code, "%s: image of %lld x %lld pixels is too large (at most %d per side, %lld pixels)",
                          what, (long long)w, (long long)h, VTRIM_IMAGE_MAX_SIDE, VTRIM_IMAGE_MAX_PIXELS);
    }
    return 0;
}

int32_t vtrim_image_alloc(int32_t width, int32_t height, struct vtrim_image ** out) {
    if (!out) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image: out is NULL");
    *out = NULL;
    int32_t rc = check_size(VTRIM_ERR_INVALID_ARG, "image", width, height);
    if (rc) return rc;
    struct vtrim_image * img = calloc(1, sizeof *img);
    uint8_t * rgb = malloc((size_t)width * (size_t)height * 3);
    if (!img || !rgb) {
        free(img);
        free(rgb);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "image: out of memory for %d x %d pixels", width, height);
    }
    img->width = width;
    img->height = height;
    img->rgb = rgb;
    *out = img;
    return 0;
}

void vtrim_image_free(struct vtrim_image * image) {
    if (!image) return;
    free(image->rgb);
    free(image);
}

int32_t vtrim_image_size(const struct vtrim_image * image, int32_t * width, int32_t * height) {
    if (!image) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image is NULL");
    if (width) *width = image->width;
    if (height) *height = image->height;
    return 0;
}

int32_t vtrim_image_from_pixels(const uint8_t * rgb, int32_t width, int32_t height, struct vtrim_image ** out) {
    if (!out) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image: out is NULL");
    *out = NULL;
    if (!rgb) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image: pixels are NULL");
    int32_t rc = vtrim_image_alloc(width, height, out);
    if (rc) return rc;
    memcpy((*out)->rgb, rgb, (size_t)width * (size_t)height * 3);
    return 0;
}

// Pillow's ImagingAlphaComposite of a pixel over opaque white, in its integers: with the destination
// opaque, coef1 = a*128 and the result is div255((c*a + 255*(255-a)) * 128 + 128*128) >> 7.
static uint8_t over_white(uint32_t c, uint32_t a) {
    if (a == 0) return 255;
    uint32_t t = (c * a + 255u * (255u - a)) * 128u + (0x80u << 7);
    return (uint8_t)((((t >> 8) + t) >> 8) >> 7);
}

// One loop per channel count, not a switch per pixel: a 179 MP image (the cap) converts in a fraction of a
// second, and a few-hundred-byte RLE file claiming that size cannot keep a caller busy for long.
static void to_rgb(const uint8_t * src, int channels, size_t n_pixels, uint8_t * dst) {
    const uint8_t * p = src;
    switch (channels) {
        case 1:
            for (size_t i = 0; i < n_pixels; i++, p++, dst += 3) dst[0] = dst[1] = dst[2] = p[0];
            break;
        case 2:
            for (size_t i = 0; i < n_pixels; i++, p += 2, dst += 3) {
                dst[0] = dst[1] = dst[2] = over_white(p[0], p[1]);
            }
            break;
        case 3: memcpy(dst, src, n_pixels * 3); break;
        default:
            for (size_t i = 0; i < n_pixels; i++, p += 4, dst += 3) {
                dst[0] = over_white(p[0], p[3]);
                dst[1] = over_white(p[1], p[3]);
                dst[2] = over_white(p[2], p[3]);
            }
            break;
    }
}

int32_t vtrim_image_from_memory(const uint8_t * data, size_t size, struct vtrim_image ** out) {
    if (!out) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image: out is NULL");
    *out = NULL;
    if (!data && size > 0) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image: data is NULL");
    if (size == 0) return vtrim_fail(VTRIM_ERR_IMAGE, "image: no data (0 bytes)");
    if (size > INT_MAX) return vtrim_fail(VTRIM_ERR_IMAGE, "image: %zu bytes is too large to decode", size);

    // Damage stb would decode into garbage, and oversized images, fail here, before any pixel is allocated.
    int32_t rc = vtrim_image_verify(data, size);
    if (rc) return rc;
    int w = 0, h = 0, channels = 0;
    if (!stbi_info_from_memory(data, (int)size, &w, &h, &channels)) {
        return vtrim_fail(VTRIM_ERR_IMAGE, "image: cannot decode: %s", stbi_failure_reason());
    }
    if ((rc = check_size(VTRIM_ERR_IMAGE, "image", w, h)) != 0) return rc;

    uint8_t * pixels = stbi_load_from_memory(data, (int)size, &w, &h, &channels, 0);
    if (!pixels) return vtrim_fail(VTRIM_ERR_IMAGE, "image: cannot decode: %s", stbi_failure_reason());
    if ((rc = check_size(VTRIM_ERR_IMAGE, "image", w, h)) != 0 || channels < 1 || channels > 4) {
        stbi_image_free(pixels);
        return rc ? rc : vtrim_fail(VTRIM_ERR_IMAGE, "image: unexpected %d channels", channels);
    }
    rc = vtrim_image_alloc(w, h, out);
    if (rc == 0) to_rgb(pixels, channels, (size_t)w * (size_t)h, (*out)->rgb);
    stbi_image_free(pixels);
    return rc;
}

int32_t vtrim_image_from_file(const char * path, struct vtrim_image ** out) {
    if (!out) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image: out is NULL");
    *out = NULL;
    if (!path) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "image: path is NULL");

    FILE * f = fopen(path, "rb");
    if (!f) return vtrim_fail(VTRIM_ERR_IO, "cannot open image '%s': %s", path, strerror(errno));

    // Read to the end in growing chunks: works for pipes and reports a directory as a read error.
    size_t cap = 1 << 16, n = 0;
    uint8_t * buf = malloc(cap);
    int32_t rc = 0;
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        if (cap > (size_t)INT_MAX) {
            rc = vtrim_fail(VTRIM_ERR_IMAGE, "image '%s' is larger than 2 GiB", path);
            break;
        }
        uint8_t * grown = realloc(buf, cap * 2);
        if (!grown) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = grown;
        cap *= 2;
    }
    if (!buf) rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory reading image '%s'", path);
    else if (rc == 0 && ferror(f)) rc = vtrim_fail(VTRIM_ERR_IO, "cannot read image '%s': %s", path, strerror(errno));
    fclose(f);

    if (rc == 0) {
        rc = vtrim_image_from_memory(buf, n, out);
        if (rc) vtrim_fail_prefix(rc, "reading '%s': ", path);
    }
    free(buf);
    return rc;
}
