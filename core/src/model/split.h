// Where tensors live when a model is split across devices: the local device, and the decoder layers that
// ggml's RPC backend sends to rpc-server processes on other hosts (model/rpc.c).
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <stdint.h>

#define VTRIM_MAX_RPC   16                   // GGML_RPC_MAX_SERVERS: devices of all servers together
#define VTRIM_MAX_SPLIT (VTRIM_MAX_RPC + 1)  // the RPC devices and the local one

// Allocates tensors[0..n) (none allocated yet) in one new buffer of buft; what names them in an error.
int32_t vtrim_alloc_tensors(ggml_backend_buffer_type_t buft, struct ggml_tensor ** tensors, int64_t n,
                            const char * what, ggml_backend_buffer_t * out);

// The decoder layer a weight belongs to ("blk.<il>.*"), or -1 (embeddings, output, vision tower, projector).
int32_t vtrim_tensor_layer(const char * name);
