// Structural checks that stb_image skips: it ignores PNG checksums and decodes a truncated JPEG or PNG into
// partly grey pixels, where PIL (and so the HF reference) raises. Walking the container before decoding
// turns those files into errors, and reads the declared size so that oversized images fail with a clear
// message before stb allocates anything. BMP, TGA and JPEG get a size check (their pixels must fit the file);
// other formats are left to stb.
#include "image/image.h"

#include "api/error.h"

#include <string.h>

static uint32_t be32(const uint8_t * p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint32_t be16(const uint8_t * p) { return ((uint32_t)p[0] << 8) | p[1]; }

// CRC-32 (zlib's polynomial), four bits at a time: a constant 16-entry table, nothing to initialise.
static uint32_t crc32_png(const uint8_t * p, size_t n) {
    static const uint32_t table[16] = {
        0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
        0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu, 0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu,
    };
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        c = table[c & 0xF] ^ (c >> 4);
        c = table[c & 0xF] ^ (c >> 4);
    }
    return c ^ 0xFFFFFFFFu;
}

static int32_t check_declared_size(const char * fmt, uint32_t w, uint32_t h) {
    if (w == 0 || h == 0) return vtrim_fail(VTRIM_ERR_IMAGE, "image: %s declares an empty image (%u x %u)", fmt, w, h);
    if (w > VTRIM_IMAGE_MAX_SIDE || h > VTRIM_IMAGE_MAX_SIDE || (int64_t)w * h > VTRIM_IMAGE_MAX_PIXELS) {
        return vtrim_fail(VTRIM_ERR_IMAGE, "image: %s of %u x %u pixels is too large (at most %d per side, %lld pixels)",
                          fmt, w, h, VTRIM_IMAGE_MAX_SIDE, VTRIM_IMAGE_MAX_PIXELS);
    }
    return 0;
}

// Every chunk complete and with its CRC right, IHDR first. Data that ends on a chunk boundary before IEND is
// left to the decoder (it fails if pixel data is missing).
static int32_t verify_png(const uint8_t * d, size_t n) {
    size_t pos = 8;
    bool first = true;
    while (pos < n) {
        if (n - pos < 12) return vtrim_fail(VTRIM_ERR_IMAGE, "image: truncated PNG (a chunk header is cut off)");
        uint32_t len = be32(d + pos);
        if (len > 0x7FFFFFFFu || (size_t)len > n - pos - 12) {
            return vtrim_fail(VTRIM_ERR_IMAGE, "image: truncated PNG (a chunk of %u bytes is cut off)", len);
        }
        const uint8_t * type = d + pos + 4;
        if (crc32_png(type, (size_t)len + 4) != be32(type + 4 + len)) {
            return vtrim_fail(VTRIM_ERR_IMAGE, "image: broken PNG (bad CRC in chunk %.4s)", (const char *)type);
        }
        if (first) {
            if (memcmp(type, "IHDR", 4) != 0 || len != 13) return vtrim_fail(VTRIM_ERR_IMAGE, "image: PNG without IHDR");
            int32_t rc = check_declared_size("PNG", be32(type + 4), be32(type + 8));
            if (rc) return rc;
            first = false;
        }
        if (memcmp(type, "IEND", 4) == 0) return 0;
        pos += 12 + (size_t)len;
    }
    return 0;
}

// The bytes a declared image needs at least, against the file's: stb reads past the end of a truncated BMP,
// TGA or JPEG scan as zeros, so a few bytes claiming 100 MP would decode (slowly) into a black image.
static int32_t check_data_size(const char * fmt, uint64_t need, size_t n, uint32_t w, uint32_t h) {
    if (need > n) {
        return vtrim_fail(VTRIM_ERR_IMAGE,
                          "image: truncated %s (%u x %u pixels need at least %llu bytes, the file has %zu)", fmt, w, h,
                          (unsigned long long)need, n);
    }
    return 0;
}

static bool jpeg_is_sof(uint8_t m) {
    return m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
}

// Segments from SOI to EOI: lengths that fit, the frame size, and entropy-coded data that ends in a marker.
static int32_t verify_jpeg(const uint8_t * d, size_t n) {
    size_t pos = 2;
    for (;;) {
        while (pos < n && d[pos] != 0xFF) pos++;          // tolerate junk between segments, as libjpeg does
        while (pos < n && d[pos] == 0xFF) pos++;          // fill bytes
        if (pos >= n) return vtrim_fail(VTRIM_ERR_IMAGE, "image: truncated JPEG (no end-of-image marker)");
        uint8_t m = d[pos++];
        if (m == 0xD9) return 0;                          // EOI
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD7)) continue;  // markers without a length
        if (n - pos < 2) return vtrim_fail(VTRIM_ERR_IMAGE, "image: truncated JPEG (a segment header is cut off)");
        uint32_t len = be16(d + pos);
        if (len < 2 || (size_t)len > n - pos) {
            return vtrim_fail(VTRIM_ERR_IMAGE, "image: truncated JPEG (a segment of %u bytes is cut off)", len);
        }
        if (jpeg_is_sof(m) && len >= 7) {
            const uint32_t w = be16(d + pos + 5), h = be16(d + pos + 3);
            int32_t rc = check_declared_size("JPEG", w, h);
            if (rc) return rc;
            // Every 8x8 block of the full-resolution component costs at least one bit of scan data (a DC
            // code is never shorter), so a file that is smaller cannot be complete: stb would decode it
            // anyway, padding the scan with zeros, and a few hundred bytes claiming 100 MP take seconds.
            const uint64_t blocks = (uint64_t)((w + 7) / 8) * ((h + 7) / 8);
            if ((rc = check_data_size("JPEG", blocks / 8, n, w, h)) != 0) return rc;
        }
        pos += len;
        if (m == 0xDA) {                                  // SOS: entropy-coded data up to the next real marker
            for (;;) {
                while (pos < n && d[pos] != 0xFF) pos++;
                if (pos + 1 >= n) return vtrim_fail(VTRIM_ERR_IMAGE, "image: truncated JPEG (the scan data is cut off)");
                uint8_t next = d[pos + 1];
                if (next == 0x00 || (next >= 0xD0 && next <= 0xD7) || next == 0xFF) {
                    pos += next == 0xFF ? 1 : 2;          // stuffed byte, restart marker, or fill byte
                    continue;
                }
                break;
            }
        }
    }
}

static uint32_t le16(const uint8_t * p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
static uint32_t le32(const uint8_t * p) { return le16(p) | (le16(p + 2) << 16); }

// Uncompressed BMP (BI_RGB, BI_BITFIELDS; Windows 3 and later headers, and OS/2's 12-byte one): the pixel rows
// must be there. The header is read as stb reads it, bytes past the end as zeros and the compression field as
// a signed int (stb decodes a negative one as uncompressed), so a file cut inside its header is covered too.
static int32_t verify_bmp(const uint8_t * data, size_t n) {
    uint8_t d[34] = { 0 };
    memcpy(d, data, n < sizeof d ? n : sizeof d);
    const uint32_t header = le32(d + 14), offset = le32(d + 10);
    uint32_t w, h, bpp;
    if (header == 12) {
        w = le16(d + 18), h = le16(d + 20), bpp = le16(d + 24);
    } else if (header >= 40) {
        const int32_t compression = (int32_t)le32(d + 30);
        if (compression < 0) {
            return vtrim_fail(VTRIM_ERR_IMAGE, "image: broken BMP (compression %d)", compression);
        }
        if (compression != 0 && compression != 3) return 0;   // RLE, JPEG, PNG: stb refuses them
        const int32_t h_signed = (int32_t)le32(d + 22);
        w = le32(d + 18), bpp = le16(d + 28);
        h = h_signed < 0 ? (uint32_t)(-(int64_t)h_signed) : (uint32_t)h_signed;
    } else {
        return 0;   // stb refuses other header sizes
    }
    if (bpp == 0 || bpp > 32) return 0;
    int32_t rc = check_declared_size("BMP", w, h);
    if (rc) return rc;
    const uint64_t row = (((uint64_t)w * bpp + 31) / 32) * 4;
    return check_data_size("BMP", (uint64_t)offset + row * h, n, w, h);
}

// TGA (stb's last guess: a file no other magic claims; a header cut short included). Uncompressed: every pixel's bytes; RLE: a packet holds
// at most 128 pixels in at least 1 + (bytes per pixel) bytes.
static int32_t verify_tga(const uint8_t * data, size_t n) {
    uint8_t d[18] = { 0 };   // the header as stb reads it: bytes past the end are zeros
    memcpy(d, data, n < sizeof d ? n : sizeof d);
    const uint32_t cmap_type = d[1], type = d[2], cmap_len = le16(d + 5), cmap_bits = d[7];
    const uint32_t w = le16(d + 12), h = le16(d + 14), bpp = d[16];
    const bool rle = type >= 9;
    const uint32_t base = rle ? type - 8 : type;
    if (cmap_type > 1 || base < 1 || base > 3 || (cmap_type == 1 && base != 1) || bpp == 0 || bpp > 32) return 0;
    int32_t rc = check_declared_size("TGA", w, h);
    if (rc) return rc;
    const uint64_t px = (uint64_t)w * h, bytes = (bpp + 7) / 8;
    const uint64_t head = 18 + (uint64_t)d[0] + (cmap_type ? (uint64_t)cmap_len * ((cmap_bits + 7) / 8) : 0);
    return check_data_size("TGA", head + (rle ? (px + 127) / 128 * (1 + bytes) : px * bytes), n, w, h);
}

// Whether stb would try the file as TGA: no signature of the formats it tests first.
static bool other_magic(const uint8_t * d, size_t n) {
    static const char * const magic[] = { "GIF8", "BM", "8BPS", "\x53\x80\xF6\x34", "#?RADIANCE", "#?RGBE" };
    for (size_t i = 0; i < sizeof magic / sizeof magic[0]; i++) {
        const size_t len = strlen(magic[i]);
        if (n >= len && memcmp(d, magic[i], len) == 0) return true;
    }
    return n >= 2 && d[0] == 'P' && d[1] >= '1' && d[1] <= '7';   // PNM
}

int32_t vtrim_image_verify(const uint8_t * data, size_t size) {
    static const uint8_t png_sig[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n' };
    if (size >= 8 && memcmp(data, png_sig, 8) == 0) return verify_png(data, size);
    if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return verify_jpeg(data, size);
    if (size >= 2 && data[0] == 'B' && data[1] == 'M') return verify_bmp(data, size);
    if (!other_magic(data, size)) return verify_tga(data, size);
    return 0;
}
