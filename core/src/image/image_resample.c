// Pillow's Image.resize for 8-bit RGB, reproduced bit for bit (Pillow 13, src/libImaging/Resample.c and
// Geometry.c), because the HF image processors resize with PIL and the vision tower sees the result.
//
// BILINEAR/BICUBIC: a separable convolution, one pass per axis whose size changes (the order: see
// resize_convolution). Per output pixel the filter's support is widened by the downscale factor
// (antialiasing), the double weights are normalised to sum 1, then rounded to 22-bit fixed point; each pass
// accumulates integers from a rounding offset and clips to uint8 before the next pass.
// NEAREST: an affine scale that samples at (x + 0.5) * in/out, the position accumulated in double.
#include "image/image.h"

#include "api/error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// 8 bits of result; two more for sums of weights above 1 or below 0 (negative lobes).
#define RESAMPLE_PRECISION_BITS (32 - 8 - 2)

typedef double (*filter_fn)(double x);

static double filter_bilinear(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

// Keys' cubic convolution with a = -0.5, as Pillow writes it (the same expressions, so the same doubles).
static double filter_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

// For output indices [first, first + count): the first input index, how many inputs, ksize fixed-point weights.
struct resample_coeffs {
    int32_t   ksize;
    int32_t * bounds;  // [count][2]: first input, number of inputs
    int32_t * weights; // [count][ksize]
};

static void coeffs_free(struct resample_coeffs * c) {
    free(c->bounds);
    free(c->weights);
    c->bounds = NULL;
    c->weights = NULL;
}

static int32_t coeffs_init(struct resample_coeffs * c, int32_t in_size, int32_t out_size, int32_t first,
                           int32_t count, filter_fn filter, double filter_support) {
    memset(c, 0, sizeof *c);
    // Pillow passes the box edges as floats: (float)in_size - 0.0f, then widens to double.
    double scale = (double)((float)in_size - 0.0f) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = filter_support * filterscale;
    int32_t ksize = (int32_t)ceil(support) * 2 + 1;

    double * k = malloc((size_t)ksize * sizeof *k);
    c->bounds  = malloc((size_t)count * 2 * sizeof *c->bounds);
    c->weights = malloc((size_t)count * (size_t)ksize * sizeof *c->weights);
    if (!k || !c->bounds || !c->weights) {
        free(k);
        coeffs_free(c);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "resize: out of memory for %d x %d weights", count, ksize);
    }
    c->ksize = ksize;

    double inv_filterscale = 1.0 / filterscale;
    for (int32_t i = 0; i < count; i++) {
        int32_t xx = first + i;
        double center = (xx + 0.5) * scale;
        // (int) truncates toward zero, as Pillow's "round" does; negatives are clamped anyway.
        int32_t xmin = (int32_t)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int32_t xmax = (int32_t)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        int32_t n = xmax - xmin;

        double sum = 0.0;
        for (int32_t x = 0; x < n; x++) {
            k[x] = filter((x + xmin - center + 0.5) * inv_filterscale);
            sum += k[x];
        }
        int32_t * w = c->weights + (size_t)i * ksize;
        for (int32_t x = 0; x < ksize; x++) {
            double v = x < n ? (sum != 0.0 ? k[x] / sum : k[x]) : 0.0;
            double f = v * (1 << RESAMPLE_PRECISION_BITS);
            w[x] = (int32_t)(v < 0 ? -0.5 + f : 0.5 + f);
        }
        c->bounds[2 * i + 0] = xmin;
        c->bounds[2 * i + 1] = n;
    }
    free(k);
    return 0;
}

// Sums start at one half (rounding); a negative sum clips to 0 before the shift.
static inline uint8_t clip8(int64_t acc) {
    if (acc < 0) return 0;
    int64_t v = acc >> RESAMPLE_PRECISION_BITS;
    return v > 255 ? 255 : (uint8_t)v;
}

// n_rows rows of src (stride in bytes, holding columns from col_offset on) -> n_rows rows of dst, out_w wide
static void resample_horizontal(const uint8_t * src, size_t src_stride, int32_t col_offset, int32_t n_rows,
                                uint8_t * dst, int32_t out_w, const struct resample_coeffs * c) {
    const int64_t half = (int64_t)1 << (RESAMPLE_PRECISION_BITS - 1);
    for (int32_t y = 0; y < n_rows; y++) {
        const uint8_t * in = src + (size_t)y * src_stride;
        uint8_t * out = dst + (size_t)y * out_w * 3;
        for (int32_t xx = 0; xx < out_w; xx++) {
            const int32_t * k = c->weights + (size_t)xx * c->ksize;
            const uint8_t * p = in + (size_t)(c->bounds[2 * xx] - col_offset) * 3;
            int32_t n = c->bounds[2 * xx + 1];
            int64_t s0 = half, s1 = half, s2 = half;
            for (int32_t x = 0; x < n; x++) {
                s0 += (int64_t)p[3 * x + 0] * k[x];
                s1 += (int64_t)p[3 * x + 1] * k[x];
                s2 += (int64_t)p[3 * x + 2] * k[x];
            }
            out[3 * xx + 0] = clip8(s0);
            out[3 * xx + 1] = clip8(s1);
            out[3 * xx + 2] = clip8(s2);
        }
    }
}

// src holds rows from row_offset on (stride in bytes), w pixels of each are used
static void resample_vertical(const uint8_t * src, size_t src_stride, int32_t row_offset, int32_t w,
                              uint8_t * dst, int32_t out_h, const struct resample_coeffs * c) {
    const int64_t half = (int64_t)1 << (RESAMPLE_PRECISION_BITS - 1);
    const size_t n_bytes = (size_t)w * 3;
    for (int32_t yy = 0; yy < out_h; yy++) {
        const int32_t * k = c->weights + (size_t)yy * c->ksize;
        const uint8_t * in = src + (size_t)(c->bounds[2 * yy] - row_offset) * src_stride;
        int32_t n = c->bounds[2 * yy + 1];
        uint8_t * out = dst + (size_t)yy * n_bytes;
        for (size_t i = 0; i < n_bytes; i++) {
            int64_t s = half;
            for (int32_t y = 0; y < n; y++) {
                s += (int64_t)in[(size_t)y * src_stride + i] * k[y];
            }
            out[i] = clip8(s);
        }
    }
}

// The window [x0, x0+ww) x [y0, y0+wh) of the resized image. Every output pixel depends only on its own
// coefficients, so the window equals the same pixels of the full resize; each pass reads only the source
// rows (columns) that the window's taps reach.
static int32_t resize_convolution(const uint8_t * src, int32_t w, int32_t h, int32_t out_w, int32_t out_h,
                                  int32_t x0, int32_t y0, int32_t ww, int32_t wh,
                                  filter_fn filter, double support, uint8_t * dst) {
    // An axis whose size does not change is not resampled (Pillow's need_horizontal/need_vertical).
    const bool need_h = out_w != w;
    const bool need_v = out_h != h;
    // Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice what the width
    // does (Pillow <= 12 always went horizontal first); the order changes the intermediate rounding.
    const bool horizontal_first = !((int64_t)h - out_h > 0 && (int64_t)h - out_h > ((int64_t)w - out_w) * 2);
    const size_t stride = (size_t)w * 3;
    struct resample_coeffs cv = {0}, ch = {0};
    uint8_t * tmp = NULL;
    int32_t rc = 0;

    if (need_v && (rc = coeffs_init(&cv, h, out_h, y0, wh, filter, support)) != 0) return rc;
    if (need_h && (rc = coeffs_init(&ch, w, out_w, x0, ww, filter, support)) != 0) goto done;

    if (!need_h && !need_v) {
        for (int32_t y = 0; y < wh; y++) {
            memcpy(dst + (size_t)y * ww * 3, src + (size_t)(y0 + y) * stride + (size_t)x0 * 3, (size_t)ww * 3);
        }
    } else if (!need_v) {
        resample_horizontal(src + (size_t)y0 * stride, stride, 0, wh, dst, ww, &ch);
    } else if (!need_h) {
        resample_vertical(src + (size_t)x0 * 3, stride, 0, ww, dst, wh, &cv);
    } else if (horizontal_first) {
        int32_t r0 = cv.bounds[0], r1 = cv.bounds[2 * (wh - 1)] + cv.bounds[2 * (wh - 1) + 1];
        if (!(tmp = malloc((size_t)ww * (size_t)(r1 - r0) * 3))) goto oom;
        resample_horizontal(src + (size_t)r0 * stride, stride, 0, r1 - r0, tmp, ww, &ch);
        resample_vertical(tmp, (size_t)ww * 3, r0, ww, dst, wh, &cv);
    } else {
        int32_t c0 = ch.bounds[0], c1 = ch.bounds[2 * (ww - 1)] + ch.bounds[2 * (ww - 1) + 1];
        if (!(tmp = malloc((size_t)(c1 - c0) * (size_t)wh * 3))) goto oom;
        resample_vertical(src + (size_t)c0 * 3, stride, 0, c1 - c0, tmp, wh, &cv);
        resample_horizontal(tmp, (size_t)(c1 - c0) * 3, c0, wh, dst, ww, &ch);
    }
    goto done;
oom:
    rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "resize: out of memory (%d x %d -> %d x %d)", w, h, out_w, out_h);
done:
    free(tmp);
    coeffs_free(&ch);
    coeffs_free(&cv);
    return rc;
}

// Pillow's ImagingScaleAffine: the sampling position starts at half a step and is accumulated in double
// from the first output pixel, so the drift of the sum is part of the result.
static int32_t resize_nearest(const uint8_t * src, int32_t w, int32_t h, int32_t out_w, int32_t out_h,
                              int32_t x0, int32_t y0, int32_t ww, int32_t wh, uint8_t * dst) {
    int32_t * xs = malloc((size_t)ww * sizeof *xs);
    if (!xs) return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "resize: out of memory");
    double ax = (double)((float)w - 0.0f) / out_w;
    double ay = (double)((float)h - 0.0f) / out_h;
    double xo = 0.0 + ax * 0.5;
    for (int32_t x = 0; x < x0 + ww; x++) {
        int32_t xi = xo < 0.0 ? -1 : (int32_t)xo;
        if (x >= x0) xs[x - x0] = xi < 0 ? 0 : (xi >= w ? w - 1 : xi);
        xo += ax;
    }
    double yo = 0.0 + ay * 0.5;
    for (int32_t y = 0; y < y0 + wh; y++) {
        int32_t yi = yo < 0.0 ? -1 : (int32_t)yo;
        yo += ay;
        if (y < y0) continue;
        yi = yi < 0 ? 0 : (yi >= h ? h - 1 : yi);
        const uint8_t * in = src + (size_t)yi * w * 3;
        uint8_t * out = dst + (size_t)(y - y0) * ww * 3;
        for (int32_t x = 0; x < ww; x++) {
            memcpy(out + 3 * x, in + 3 * (size_t)xs[x], 3);
        }
    }
    free(xs);
    return 0;
}

int32_t vtrim_image_resize_rgb_window(const uint8_t * src, int32_t w, int32_t h, int32_t out_w, int32_t out_h,
                                      int32_t resample, int32_t x0, int32_t y0, int32_t win_w, int32_t win_h,
                                      uint8_t * dst) {
    if (!src || !dst) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "resize: NULL image");
    if (w <= 0 || h <= 0 || out_w <= 0 || out_h <= 0 || w > VTRIM_IMAGE_MAX_SIDE || h > VTRIM_IMAGE_MAX_SIDE ||
        out_w > VTRIM_RESIZE_MAX_SIDE || out_h > VTRIM_RESIZE_MAX_SIDE) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "resize: %d x %d -> %d x %d is out of range", w, h, out_w, out_h);
    }
    if (x0 < 0 || y0 < 0 || win_w <= 0 || win_h <= 0 || win_w > out_w - x0 || win_h > out_h - y0 ||
        (int64_t)win_w * win_h > VTRIM_IMAGE_MAX_PIXELS) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "resize: window %d,%d %d x %d is outside %d x %d",
                          x0, y0, win_w, win_h, out_w, out_h);
    }
    switch (resample) {
        case VTRIM_RESAMPLE_NEAREST:
            // Pillow copies an image resized to its own size; the sampling would give the same pixels.
            return resize_nearest(src, w, h, out_w, out_h, x0, y0, win_w, win_h, dst);
        case VTRIM_RESAMPLE_BILINEAR:
            return resize_convolution(src, w, h, out_w, out_h, x0, y0, win_w, win_h, filter_bilinear, 1.0, dst);
        case VTRIM_RESAMPLE_BICUBIC:
            return resize_convolution(src, w, h, out_w, out_h, x0, y0, win_w, win_h, filter_bicubic, 2.0, dst);
        default:
            return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "resize: resample filter %d is not supported "
                              "(0 nearest, 2 bilinear, 3 bicubic)", resample);
    }
}

int32_t vtrim_image_resize_rgb(const uint8_t * src, int32_t w, int32_t h, int32_t out_w, int32_t out_h,
                               int32_t resample, uint8_t * dst) {
    return vtrim_image_resize_rgb_window(src, w, h, out_w, out_h, resample, 0, 0, out_w, out_h, dst);
}
