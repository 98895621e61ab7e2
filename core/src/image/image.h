// Images: decoding (stb_image) and the preprocessing of the HF image processors, pixel for pixel.
//
// The reference is transformers' PIL backend (CLIPImageProcessorPil, LlavaImageProcessorPil): uint8 images
// resized by Pillow's Image.resize, so the resampler (image_resample.c) reproduces Pillow's fixed-point
// arithmetic bit for bit, and the float steps (rescale, normalize) follow numpy's dtypes.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vtrim_image {
    int32_t   width;
    int32_t   height;
    uint8_t * rgb;      // width*height*3, row-major, owned
};

// Inputs larger than this are refused (VTRIM_ERR_IMAGE when decoded, VTRIM_ERR_INVALID_ARG from pixels):
// a side above 32768, or more pixels than Pillow's decompression-bomb limit (2 * 89478485).
#define VTRIM_IMAGE_MAX_SIDE   32768
#define VTRIM_IMAGE_MAX_PIXELS 178956970LL

enum vtrim_resample {    // PIL's numbering, as HF image processors store `resample`
    VTRIM_RESAMPLE_NEAREST = 0, VTRIM_RESAMPLE_BILINEAR = 2, VTRIM_RESAMPLE_BICUBIC = 3,
};

// CLIPImageProcessor / LlavaImageProcessor (PIL backend): [pad to square with the mean colour],
// resize so the shortest edge is `shortest_edge`, center-crop to crop_h x crop_w, rescale, normalize.
// Zero-initialise and fill; fields that are zero with their step enabled are errors.
struct vtrim_image_pp {
    bool    do_pad;          // LlavaImageProcessor's do_pad: pad to a square filled with int(mean*255) (truncated)
    bool    do_resize;
    int32_t shortest_edge;   // > 0: size {"shortest_edge": n}
    int32_t resize_h, resize_w; // used when shortest_edge <= 0: size {"height": h, "width": w}
    int32_t resample;        // enum vtrim_resample
    bool    do_center_crop;
    int32_t crop_h, crop_w;
    double  rescale_factor;  // 1/255; 0 means no rescale. A float32 1/255 (as a GGUF stores it) is taken as 1/255.
    bool    do_normalize;
    float   mean[3], std[3];
};

// ---- image objects (image.c) -------------------------------------------------------------------

// A new image with uninitialised pixels; fails with VTRIM_ERR_INVALID_ARG for sizes out of range.
int32_t vtrim_image_alloc(int32_t width, int32_t height, struct vtrim_image ** out);

// PNG and JPEG containers checked before decoding (image_verify.c): truncation, PNG CRCs, declared size.
// Returns 0 for other formats (stb_image alone judges them).
int32_t vtrim_image_verify(const uint8_t * data, size_t size);

// ---- resampling (image_resample.c) ---------------------------------------------------------------

// Pillow's Image.resize((out_w, out_h), resample) of an 8-bit RGB image, bit-exact: NEAREST, BILINEAR and
// BICUBIC. src and dst are packed RGB rows and must not overlap; dst holds out_w*out_h*3 bytes.
int32_t vtrim_image_resize_rgb(const uint8_t * src, int32_t w, int32_t h, int32_t out_w, int32_t out_h,
                               int32_t resample, uint8_t * dst);
// The same pixels, computed only for the window [x0, x0+win_w) x [y0, y0+win_h) of the out_w x out_h result
// (a resize followed by a crop, at the cost of the crop); dst holds win_w*win_h*3 bytes.
int32_t vtrim_image_resize_rgb_window(const uint8_t * src, int32_t w, int32_t h, int32_t out_w, int32_t out_h,
                                      int32_t resample, int32_t x0, int32_t y0, int32_t win_w, int32_t win_h,
                                      uint8_t * dst);
// A resized side may be this large (only the window is ever allocated).
#define VTRIM_RESIZE_MAX_SIDE (1 << 20)

// ---- HF preprocessing steps (image_clip.c) -------------------------------------------------------

// HF's get_resize_output_image_size(size=shortest_edge, default_to_square=False): the short side becomes
// `shortest_edge`, the long side int(shortest_edge * long / short) (truncated, as Python's int()).
void vtrim_image_shortest_edge_size(int32_t w, int32_t h, int32_t shortest_edge, int32_t * out_w, int32_t * out_h);

// uint8 RGB (packed, w x h) -> float CHW: float32(v * rescale_factor) computed in double (numpy's rescale
// upcasts to float64), then (x - mean) / std in float32 (numpy's normalize). out has 3*w*h floats.
void vtrim_image_rescale_normalize(const uint8_t * rgb, int32_t w, int32_t h, const struct vtrim_image_pp * pp,
                                   float * out);

// The size the preprocessing produces (crop_h x crop_w, or the resized size when there is no crop).
int32_t vtrim_image_pp_output_size(const struct vtrim_image * image, const struct vtrim_image_pp * pp,
                                   int32_t * out_w, int32_t * out_h);

// Writes 3*out_h*out_w floats (see vtrim_image_pp_output_size; crop_h*crop_w with the crop), channel-major
// (CHW), as pixel_values[0] of the HF processor.
int32_t vtrim_image_preprocess_clip(const struct vtrim_image * image, const struct vtrim_image_pp * pp,
                                    float * out);

// ---- Llama-3.2-Vision (mllama) tiling (image_mllama.c) ------------------------------------------

// MllamaImageProcessor (PIL backend): choose a canvas of tiles_h x tiles_w tiles among the supported aspect
// ratios, resize the image to fit inside it (aspect ratio kept), zero-pad it at the bottom and right to the
// canvas, rescale and normalise (the padding too: it becomes -mean/std), cut it into tiles row by row.
// Every image is resized, even one smaller than a tile (it is enlarged to at least one tile's side).

#define VTRIM_MLLAMA_MAX_TILES          16
#define VTRIM_MLLAMA_MAX_ASPECT_RATIOS  64   // HF's list for 16 tiles has 50 pairs
#define VTRIM_MLLAMA_MAX_TILE_SIZE    4096

// Zero-initialise and fill (or start from vtrim_mllama_pp_default). HF refuses do_resize or do_pad false,
// and so do we (VTRIM_ERR_INVALID_ARG).
struct vtrim_mllama_pp {
    int32_t tile_size;        // size {"height": S, "width": S}; tiles are S x S
    int32_t max_image_tiles;  // 1..VTRIM_MLLAMA_MAX_TILES
    int32_t resample;         // enum vtrim_resample (mllama: BILINEAR)
    double  rescale_factor;   // 1/255; a float32 1/255 (from a GGUF) is taken as 1/255
    bool    do_resize, do_rescale, do_normalize, do_pad;
    float   mean[3], std[3];
    // The canvases, as (tiles_h, tiles_w) pairs in HF's order: aspect_ratio_id is the index here + 1.
    // n_aspect_ratios == 0: HF's get_all_supported_aspect_ratios(max_image_tiles) (every w, h with w*h <= max,
    // w outer, h inner). A given list must hold pairs with tiles_h * tiles_w <= max_image_tiles.
    int32_t n_aspect_ratios;
    int32_t aspect_ratios[VTRIM_MLLAMA_MAX_ASPECT_RATIOS][2];
};

// Llama-3.2-11B-Vision's preprocessor_config.json: 560-pixel tiles, at most 4, bilinear, CLIP's mean/std.
void vtrim_mllama_pp_default(struct vtrim_mllama_pp * pp);

// What the preprocessing will do with a width x height image, without touching pixels.
struct vtrim_mllama_plan {
    int32_t tiles_h, tiles_w;       // the canvas, in tiles; n_tiles = tiles_h * tiles_w
    int32_t n_tiles;
    int32_t aspect_ratio_id;        // 1-based index into the aspect ratios (0 is HF's batch padding)
    int32_t resized_w, resized_h;   // the resized image, at the canvas's top-left corner
};

// HF's get_optimal_tiled_canvas + get_image_size_fit_to_canvas.
int32_t vtrim_mllama_plan_image(int32_t width, int32_t height, const struct vtrim_mllama_pp * pp,
                                struct vtrim_mllama_plan * plan);

// Writes pixel_values[0][0] of the HF processor: out holds max_image_tiles * 3 * S * S floats, tile-major
// ([tile][channel][y][x]); tiles past n_tiles are zeros. HF's aspect_ratio_mask is 1 for the first n_tiles
// tiles and 0 after (n_tiles >= 1). Any of the int32_t outputs may be NULL.
int32_t vtrim_mllama_preprocess(const struct vtrim_image * image, const struct vtrim_mllama_pp * pp, float * out,
                                int32_t * n_tiles, int32_t * aspect_ratio_id, int32_t * tiles_h, int32_t * tiles_w);
