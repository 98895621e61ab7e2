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
