// GGUF quantization (vtrim_quantize in vtrim.h): the rules are in quantize.c's header comment.
#pragma once

#include "vtrim.h"
