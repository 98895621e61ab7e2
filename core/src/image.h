// Images: decoding (stb_image) and the preprocessing of the HF image processors, pixel for pixel.
#pragma once

#include <stdbool.h>
#include <stdint.h>

struct vtrim_image {
    int32_t   width;
    int32_t   height;
    uint8_t * rgb;      // width*height*3, row-major, owned
};

enum vtrim_resample {    // PIL's numbering, as HF image processors store `resample`
    VTRIM_RESAMPLE_NEAREST = 0, VTRIM_RESAMPLE_BILINEAR = 2, VTRIM_RESAMPLE_BICUBIC = 3,
};

// CLIPImageProcessor / LlavaImageProcessor (PIL backend): [pad to square with the mean colour],
// resize so the shortest edge is `shortest_edge`, center-crop to crop_h x crop_w, rescale, normalize.
struct vtrim_image_pp {
    bool    do_pad;          // LlavaImageProcessor's do_pad: pad to a square filled with round(mean*255)
    bool    do_resize;
    int32_t shortest_edge;
    int32_t resample;        // enum vtrim_resample
    bool    do_center_crop;
    int32_t crop_h, crop_w;
    float   rescale_factor;  // 1/255
    bool    do_normalize;
    float   mean[3], std[3];
};

// Writes 3*crop_h*crop_w floats, channel-major (CHW), as pixel_values[0] of the HF processor.
int32_t vtrim_image_preprocess_clip(const struct vtrim_image * image, const struct vtrim_image_pp * pp,
                                    float * out);
