// The one translation unit that compiles stb_image (the copy in the pinned llama.cpp archive).
// Only the formats PIL also opens; stdio is ours (image.c reads files, so a missing file is an I/O error
// and not a decode error); the user-facing failure strings ("Corrupt PNG") go into our messages.
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO
#define STBI_FAILURE_USERMSG
#define STBI_ONLY_JPEG
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STBI_ONLY_GIF
#define STBI_ONLY_TGA
#define STBI_ONLY_PNM
// image.c refuses larger images from the header; this is stb's own backstop.
#define STBI_MAX_DIMENSIONS 32768

#if defined(__GNUC__) || defined(__clang__)
#  pragma GCC diagnostic push
#  if defined(__clang__)
#    pragma GCC diagnostic ignored "-Wunknown-warning-option"
#  else
#    pragma GCC diagnostic ignored "-Wpragmas"
#  endif
#  pragma GCC diagnostic ignored "-Wunused-function"
#  pragma GCC diagnostic ignored "-Wunused-parameter"
#  pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#  pragma GCC diagnostic ignored "-Wsign-compare"
#  pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#  pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#  pragma GCC diagnostic ignored "-Wtype-limits"
#  pragma GCC diagnostic ignored "-Wshadow"
#  pragma GCC diagnostic ignored "-Wdouble-promotion"
#  pragma GCC diagnostic ignored "-Wconversion"
#  pragma GCC diagnostic ignored "-Wcast-qual"
#elif defined(_MSC_VER)
#  pragma warning(push, 0)
#endif

#include "stb_image.h"

#if defined(__GNUC__) || defined(__clang__)
#  pragma GCC diagnostic pop
#elif defined(_MSC_VER)
#  pragma warning(pop)
#endif
