// CLIPImageProcessor and LlavaImageProcessor (transformers 5.23, PIL backend), step for step:
//   [LLaVA do_pad] pad to a square of the longer side, filled with int(mean*255), the image centred at
//                  (side - size) // 2;
//   resize         shortest edge -> n, long edge int(n * long / short), Pillow's resampling of the uint8 image;
//   center crop    offsets (size - crop) // 2 (floor); a side smaller than the crop is padded with zeros
//                  around it (HF's center_crop pads before it crops, so the zeros are normalised too);
//   rescale        float32(uint8 * factor) with the product in float64 (numpy upcasts first);
//   normalize      (x - mean) / std in float32.
// Only the pixels that survive the crop are resampled.
#include "image/image.h"

#include "api/error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// Python's // for a positive divisor
static int32_t floor_div(int32_t a, int32_t b) {
    int32_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

void vtrim_image_shortest_edge_size(int32_t w, int32_t h, int32_t shortest_edge, int32_t * out_w, int32_t * out_h) {
    int32_t shorter = w <= h ? w : h;
    int32_t longer  = w <= h ? h : w;
    // int(n * long / short): the product is exact, the quotient a correctly rounded double, then truncated.
    double  q = (double)((int64_t)shortest_edge * longer) / (double)shorter;
    int32_t new_long = q >= (double)INT32_MAX ? INT32_MAX : (int32_t)q;
    if (w <= h) {
        *out_w = shortest_edge;
        *out_h = new_long;
    } else {
        *out_w = new_long;
        *out_h = shortest_edge;
    }
}

// numpy multiplies by the Python float 1/255; a factor that went through float32 (a GGUF key) is mapped back.
static double exact_rescale_factor(double f) {
    if (f == 0.0) return 1.0;
    if ((float)f == (float)(1.0 / 255.0)) return 1.0 / 255.0;
    return f;
}

void vtrim_image_rescale_normalize(const uint8_t * rgb, int32_t w, int32_t h, const struct vtrim_image_pp * pp,
                                   float * out) {
    const double  scale = exact_rescale_factor(pp->rescale_factor);
    const size_t  n = (size_t)w * (size_t)h;
    for (int c = 0; c < 3; c++) {
        // float32 operands and results, as numpy's float32 arrays; no fused multiply-add is possible here.
        const float mean = pp->do_normalize ? pp->mean[c] : 0.0f;
        const float std  = pp->do_normalize ? pp->std[c]  : 1.0f;
        float * o = out + (size_t)c * n;
        for (size_t i = 0; i < n; i++) {
            float x = (float)((double)rgb[3 * i + c] * scale);
            o[i] = pp->do_normalize ? (x - mean) / std : x;
        }
    }
}

// The sizes of every step, so that the output size can be known before anything is computed.
struct clip_plan {
    int32_t in_w, in_h;          // after padding to a square
    int32_t pad_x, pad_y;        // where the image sits in the padded square
    int32_t rs_w, rs_h;          // after the resize
    int32_t out_w, out_h;        // after the crop
    int32_t crop_x, crop_y;      // top-left of the crop in the resized image (negative: zero padding)
};

static int32_t clip_plan_make(const struct vtrim_image * image, const struct vtrim_image_pp * pp,
                              struct clip_plan * p) {
    if (!image || !image->rgb || !pp) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "preprocess: NULL image or params");
    if (image->width <= 0 || image->height <= 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "preprocess: empty image");
    }
    memset(p, 0, sizeof *p);
    p->in_w = image->width;
    p->in_h = image->height;
    if (pp->do_pad && p->in_w != p->in_h) {
        int32_t side = p->in_w > p->in_h ? p->in_w : p->in_h;
        p->pad_x = (side - p->in_w) / 2;
        p->pad_y = (side - p->in_h) / 2;
        p->in_w = p->in_h = side;
    }

    p->rs_w = p->in_w;
    p->rs_h = p->in_h;
    if (pp->do_resize) {
        if (pp->shortest_edge > 0) {
            vtrim_image_shortest_edge_size(p->in_w, p->in_h, pp->shortest_edge, &p->rs_w, &p->rs_h);
        } else if (pp->resize_w > 0 && pp->resize_h > 0) {
            p->rs_w = pp->resize_w;
            p->rs_h = pp->resize_h;
        } else {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "preprocess: resize without a size");
        }
        if (p->rs_w > VTRIM_RESIZE_MAX_SIDE || p->rs_h > VTRIM_RESIZE_MAX_SIDE) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "preprocess: a %d x %d image would be resized to %d x %d",
                              image->width, image->height, p->rs_w, p->rs_h);
        }
    }

    p->out_w = p->rs_w;
    p->out_h = p->rs_h;
    if (pp->do_center_crop) {
        if (pp->crop_w <= 0 || pp->crop_h <= 0 || pp->crop_w > VTRIM_IMAGE_MAX_SIDE ||
            pp->crop_h > VTRIM_IMAGE_MAX_SIDE) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "preprocess: crop size %d x %d is out of range",
                              pp->crop_w, pp->crop_h);
        }
        p->out_w = pp->crop_w;
        p->out_h = pp->crop_h;
        p->crop_x = floor_div(p->rs_w - p->out_w, 2);
        p->crop_y = floor_div(p->rs_h - p->out_h, 2);
    }
    if ((int64_t)p->out_w * p->out_h > VTRIM_IMAGE_MAX_PIXELS) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "preprocess: output of %d x %d pixels is too large",
                          p->out_w, p->out_h);
    }
    if (pp->do_normalize) {
        for (int c = 0; c < 3; c++) {
            if (!(pp->std[c] != 0.0f) || !isfinite(pp->std[c]) || !isfinite(pp->mean[c])) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "preprocess: bad mean/std for channel %d", c);
            }
        }
    }
    return 0;
}

int32_t vtrim_image_pp_output_size(const struct vtrim_image * image, const struct vtrim_image_pp * pp,
                                   int32_t * out_w, int32_t * out_h) {
    struct clip_plan p;
    int32_t rc = clip_plan_make(image, pp, &p);
    if (rc) return rc;
    if (out_w) *out_w = p.out_w;
    if (out_h) *out_h = p.out_h;
    return 0;
}

// LLaVA's pad_to_square: the fill is int(mean * 255), truncated, from the mean as the processor holds it.
static uint8_t pad_level(float mean) {
    double v = (double)mean * 255.0;
    return v <= 0.0 ? 0 : (v >= 255.0 ? 255 : (uint8_t)(int32_t)v);
}

int32_t vtrim_image_preprocess_clip(const struct vtrim_image * image, const struct vtrim_image_pp * pp,
                                    float * out) {
    struct clip_plan p;
    int32_t rc = clip_plan_make(image, pp, &p);
    if (rc) return rc;
    if (!out) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "preprocess: out is NULL");

    uint8_t * padded = NULL, * window = NULL, * cropped = NULL;
    const uint8_t * src = image->rgb;
    if (p.in_w != image->width || p.in_h != image->height) {
        padded = malloc((size_t)p.in_w * p.in_h * 3);
        if (!padded) goto oom;
        const uint8_t fill[3] = { pad_level(pp->mean[0]), pad_level(pp->mean[1]), pad_level(pp->mean[2]) };
        for (size_t i = 0; i < (size_t)p.in_w * p.in_h; i++) memcpy(padded + 3 * i, fill, 3);
        for (int32_t y = 0; y < image->height; y++) {
            memcpy(padded + (((size_t)(y + p.pad_y) * p.in_w) + p.pad_x) * 3,
                   image->rgb + (size_t)y * image->width * 3, (size_t)image->width * 3);
        }
        src = padded;
    }

    // The part of the resized image inside the crop; the rest of the crop stays zero.
    int32_t x0 = p.crop_x > 0 ? p.crop_x : 0, x1 = p.crop_x + p.out_w < p.rs_w ? p.crop_x + p.out_w : p.rs_w;
    int32_t y0 = p.crop_y > 0 ? p.crop_y : 0, y1 = p.crop_y + p.out_h < p.rs_h ? p.crop_y + p.out_h : p.rs_h;
    window  = malloc((size_t)(x1 - x0) * (size_t)(y1 - y0) * 3);
    cropped = calloc((size_t)p.out_w * p.out_h, 3);
    if (!window || !cropped) goto oom;
    // Without a resize the sizes match and the resampler copies the window.
    int32_t resample = pp->do_resize ? pp->resample : VTRIM_RESAMPLE_BICUBIC;
    rc = vtrim_image_resize_rgb_window(src, p.in_w, p.in_h, p.rs_w, p.rs_h, resample,
                                       x0, y0, x1 - x0, y1 - y0, window);
    if (rc) goto done;
    for (int32_t y = y0; y < y1; y++) {
        memcpy(cropped + (((size_t)(y - p.crop_y) * p.out_w) + (x0 - p.crop_x)) * 3,
               window + (size_t)(y - y0) * (x1 - x0) * 3, (size_t)(x1 - x0) * 3);
    }
    vtrim_image_rescale_normalize(cropped, p.out_w, p.out_h, pp, out);
    goto done;
oom:
    rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "preprocess: out of memory (%d x %d image)", p.in_w, p.in_h);
done:
    free(padded);
    free(window);
    free(cropped);
    return rc;
}
