// MllamaImageProcessor (transformers 5.23, PIL backend: image_processing_pil_mllama.py), step for step:
//   canvas    among the supported (tiles_h, tiles_w) arrangements, the one whose scale
//             min(canvas_h / h, canvas_w / w) is the smallest >= 1 (the least enlargement), else the largest
//             < 1 (the least reduction); ties (exact float64 equality) go to the smallest area, then the first;
//   fit       each side clipped to [tile, canvas side], the image scaled by the smaller of the two ratios,
//             the other side floor(side * ratio), at least 1 and at most its clipped target;
//   resize    Pillow's resampling of the uint8 image (always, even to the same size);
//   pad       zeros at the bottom and right up to the canvas, still uint8, so the padding is rescaled and
//             normalised with the rest and becomes -mean/std;
//   rescale   float32(uint8 * factor) with the product in float64; normalize (x - mean) / std in float32;
//   split     tiles row by row (tile ty * tiles_w + tx), each [3][S][S]; the tile axis is padded to
//             max_image_tiles with zeros (raw zeros, not normalised).
// The float steps are vtrim_image_rescale_normalize's (image_clip.c), so both pipelines round alike.
#include "image/image.h"

#include "api/error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void vtrim_mllama_pp_default(struct vtrim_mllama_pp * pp) {
    static const float mean[3] = { 0.48145466f, 0.4578275f, 0.40821073f };
    static const float std[3]  = { 0.26862954f, 0.26130258f, 0.27577711f };
    memset(pp, 0, sizeof *pp);
    pp->tile_size       = 560;
    pp->max_image_tiles = 4;
    pp->resample        = VTRIM_RESAMPLE_BILINEAR;
    pp->rescale_factor  = 1.0 / 255.0;
    pp->do_resize = pp->do_rescale = pp->do_normalize = pp->do_pad = true;
    memcpy(pp->mean, mean, sizeof mean);
    memcpy(pp->std, std, sizeof std);
}

static int32_t check_params(const struct vtrim_mllama_pp * pp) {
    if (!pp) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: NULL params");
    if (!pp->do_resize || !pp->do_pad) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: do_resize and do_pad must be true "
                          "(as MllamaImageProcessor requires)");
    }
    if (pp->tile_size <= 0 || pp->tile_size > VTRIM_MLLAMA_MAX_TILE_SIZE) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: tile size %d is out of range (1..%d)",
                          pp->tile_size, VTRIM_MLLAMA_MAX_TILE_SIZE);
    }
    if (pp->max_image_tiles <= 0 || pp->max_image_tiles > VTRIM_MLLAMA_MAX_TILES) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: max_image_tiles %d is out of range (1..%d)",
                          pp->max_image_tiles, VTRIM_MLLAMA_MAX_TILES);
    }
    if (pp->do_rescale && !(isfinite(pp->rescale_factor) && pp->rescale_factor > 0.0)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: bad rescale factor %g", pp->rescale_factor);
    }
    if (pp->do_normalize) {
        for (int c = 0; c < 3; c++) {
            if (!(pp->std[c] != 0.0f) || !isfinite(pp->std[c]) || !isfinite(pp->mean[c])) {
                return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: bad mean/std for channel %d", c);
            }
        }
    }
    if (pp->n_aspect_ratios < 0 || pp->n_aspect_ratios > VTRIM_MLLAMA_MAX_ASPECT_RATIOS) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: %d aspect ratios (at most %d)",
                          pp->n_aspect_ratios, VTRIM_MLLAMA_MAX_ASPECT_RATIOS);
    }
    for (int32_t i = 0; i < pp->n_aspect_ratios; i++) {
        int32_t th = pp->aspect_ratios[i][0], tw = pp->aspect_ratios[i][1];
        if (th <= 0 || tw <= 0 || th > pp->max_image_tiles || tw > pp->max_image_tiles ||
            th * tw > pp->max_image_tiles) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: aspect ratio %d (%d x %d tiles) does not "
                              "fit max_image_tiles %d", i, th, tw, pp->max_image_tiles);
        }
    }
    return 0;
}

// HF's get_all_supported_aspect_ratios: the first loop variable is the first element of each pair, which
// get_optimal_tiled_canvas reads as the number of tiles down.
static int32_t aspect_ratios_of(const struct vtrim_mllama_pp * pp, int32_t ar[][2]) {
    if (pp->n_aspect_ratios > 0) {
        memcpy(ar, pp->aspect_ratios, (size_t)pp->n_aspect_ratios * sizeof ar[0]);
        return pp->n_aspect_ratios;
    }
    int32_t n = 0;
    for (int32_t a = 1; a <= pp->max_image_tiles; a++) {
        for (int32_t b = 1; b <= pp->max_image_tiles; b++) {
            if (a * b <= pp->max_image_tiles) {
                ar[n][0] = a;
                ar[n][1] = b;
                n++;
            }
        }
    }
    return n;
}

// The scale factor of get_optimal_tiled_canvas: the smaller of the two ratios, in float64 as numpy divides.
static double canvas_scale(const int32_t ar[2], int32_t tile, int32_t w, int32_t h) {
    double scale_h = (double)(ar[0] * tile) / (double)h;
    double scale_w = (double)(ar[1] * tile) / (double)w;
    return scale_w > scale_h ? scale_h : scale_w;
}

int32_t vtrim_mllama_plan_image(int32_t width, int32_t height, const struct vtrim_mllama_pp * pp,
                                struct vtrim_mllama_plan * plan) {
    int32_t rc = check_params(pp);
    if (rc) return rc;
    if (!plan) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: NULL plan");
    if (width <= 0 || height <= 0 || width > VTRIM_IMAGE_MAX_SIDE || height > VTRIM_IMAGE_MAX_SIDE) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: image size %d x %d is out of range",
                          width, height);
    }
    const int32_t tile = pp->tile_size;
    int32_t ar[VTRIM_MLLAMA_MAX_ASPECT_RATIOS][2];
    const int32_t n_ar = aspect_ratios_of(pp, ar);

    // The least enlargement if some canvas enlarges (or keeps) the image, else the least reduction.
    bool   any_up = false;
    double best_up = INFINITY, best_down = -INFINITY;
    for (int32_t i = 0; i < n_ar; i++) {
        double s = canvas_scale(ar[i], tile, width, height);
        if (s >= 1.0) {
            any_up = true;
            if (s < best_up) best_up = s;
        } else if (s > best_down) {
            best_down = s;
        }
    }
    const double selected = any_up ? best_up : best_down;
    int32_t chosen = -1;
    int64_t chosen_area = 0;
    for (int32_t i = 0; i < n_ar; i++) {
        if (canvas_scale(ar[i], tile, width, height) != selected) continue;
        int64_t area = (int64_t)ar[i][0] * tile * ((int64_t)ar[i][1] * tile);
        if (chosen < 0 || area < chosen_area) {  // np.argmin: the first of the smallest
            chosen = i;
            chosen_area = area;
        }
    }
    // HF's list.index() of the chosen pair: the first equal pair (a given list could repeat one).
    int32_t id = chosen;
    for (int32_t i = 0; i < chosen; i++) {
        if (ar[i][0] == ar[chosen][0] && ar[i][1] == ar[chosen][1]) {
            id = i;
            break;
        }
    }

    const int32_t canvas_h = ar[chosen][0] * tile, canvas_w = ar[chosen][1] * tile;
    // get_image_size_fit_to_canvas
    const int32_t target_w = width  < tile ? tile : (width  > canvas_w ? canvas_w : width);
    const int32_t target_h = height < tile ? tile : (height > canvas_h ? canvas_h : height);
    const double  scale_h = (double)target_h / (double)height;
    const double  scale_w = (double)target_w / (double)width;
    int32_t new_w, new_h;
    if (scale_w < scale_h) {
        new_w = target_w;
        double f = floor((double)height * scale_w);
        new_h = f < 1.0 ? 1 : (f > (double)target_h ? target_h : (int32_t)f);
    } else {
        new_h = target_h;
        double f = floor((double)width * scale_h);
        new_w = f < 1.0 ? 1 : (f > (double)target_w ? target_w : (int32_t)f);
    }

    plan->tiles_h = ar[chosen][0];
    plan->tiles_w = ar[chosen][1];
    plan->n_tiles = plan->tiles_h * plan->tiles_w;
    plan->aspect_ratio_id = id + 1;
    plan->resized_w = new_w;
    plan->resized_h = new_h;
    return 0;
}

int32_t vtrim_mllama_preprocess(const struct vtrim_image * image, const struct vtrim_mllama_pp * pp, float * out,
                                int32_t * n_tiles, int32_t * aspect_ratio_id, int32_t * tiles_h, int32_t * tiles_w) {
    if (!image || !image->rgb) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: NULL image");
    if (!out) return vtrim_fail(VTRIM_ERR_INVALID_ARG, "mllama preprocess: out is NULL");
    struct vtrim_mllama_plan plan;
    int32_t rc = vtrim_mllama_plan_image(image->width, image->height, pp, &plan);
    if (rc) return rc;

    const int32_t S = pp->tile_size;
    const size_t  tile_floats = (size_t)3 * S * S;
    // rescale_factor 0 tells vtrim_image_rescale_normalize not to rescale.
    struct vtrim_image_pp fpp = {
        .rescale_factor = pp->do_rescale ? pp->rescale_factor : 0.0,
        .do_normalize   = pp->do_normalize,
    };
    memcpy(fpp.mean, pp->mean, sizeof fpp.mean);
    memcpy(fpp.std, pp->std, sizeof fpp.std);

    uint8_t * resized = malloc((size_t)plan.resized_w * plan.resized_h * 3);
    uint8_t * tile    = malloc((size_t)S * S * 3);
    if (!resized || !tile) {
        rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "mllama preprocess: out of memory (%d x %d image)",
                        plan.resized_w, plan.resized_h);
        goto done;
    }
    rc = vtrim_image_resize_rgb(image->rgb, image->width, image->height, plan.resized_w, plan.resized_h,
                                pp->resample, resized);
    if (rc) goto done;

    for (int32_t ty = 0; ty < plan.tiles_h; ty++) {
        for (int32_t tx = 0; tx < plan.tiles_w; tx++) {
            // The part of the resized image inside this tile; the rest is the zero padding.
            const int32_t x0 = tx * S, y0 = ty * S;
            const int32_t nx = plan.resized_w - x0 < S ? plan.resized_w - x0 : S;
            const int32_t ny = plan.resized_h - y0 < S ? plan.resized_h - y0 : S;
            memset(tile, 0, (size_t)S * S * 3);
            for (int32_t y = 0; y < ny && nx > 0; y++) {
                memcpy(tile + (size_t)y * S * 3, resized + (((size_t)(y0 + y) * plan.resized_w) + x0) * 3,
                       (size_t)nx * 3);
            }
            vtrim_image_rescale_normalize(tile, S, S, &fpp, out + (size_t)(ty * plan.tiles_w + tx) * tile_floats);
        }
    }
    memset(out + (size_t)plan.n_tiles * tile_floats, 0,
           (size_t)(pp->max_image_tiles - plan.n_tiles) * tile_floats * sizeof *out);

    if (n_tiles)         *n_tiles = plan.n_tiles;
    if (aspect_ratio_id) *aspect_ratio_id = plan.aspect_ratio_id;
    if (tiles_h)         *tiles_h = plan.tiles_h;
    if (tiles_w)         *tiles_w = plan.tiles_w;
done:
    free(resized);
    free(tile);
    return rc;
}
