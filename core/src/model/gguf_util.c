#include "model/gguf_util.h"

#include "api/error.h"

#include "gguf.h"

#include <stdlib.h>
#include <string.h>

bool vtrim_gguf_has(const struct gguf_context * g, const char * key) {
    return gguf_find_key(g, key) >= 0;
}

static int32_t missing(const char * key, bool required) {
    return required ? vtrim_fail(VTRIM_ERR_FORMAT, "missing key '%s'", key) : 1;
}

// 1 when the key is absent and optional (out untouched), 0 when read.
int32_t vtrim_gguf_i32(const struct gguf_context * g, const char * key, int32_t * out, bool required) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        return missing(key, required);
    }
    int64_t v;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8:  v = gguf_get_val_u8(g, id);  break;
        case GGUF_TYPE_INT8:   v = gguf_get_val_i8(g, id);  break;
        case GGUF_TYPE_UINT16: v = gguf_get_val_u16(g, id); break;
        case GGUF_TYPE_INT16:  v = gguf_get_val_i16(g, id); break;
        case GGUF_TYPE_UINT32: v = gguf_get_val_u32(g, id); break;
        case GGUF_TYPE_INT32:  v = gguf_get_val_i32(g, id); break;
        case GGUF_TYPE_UINT64: {
            const uint64_t u = gguf_get_val_u64(g, id);
            v = u > INT32_MAX ? (int64_t) INT32_MAX + 1 : (int64_t) u;
            break;
        }
        case GGUF_TYPE_INT64:  v = gguf_get_val_i64(g, id); break;
        default:
            return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' is not an integer", key);
    }
    if (v < INT32_MIN || v > INT32_MAX) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' is out of range", key);
    }
    *out = (int32_t) v;
    return 0;
}

int32_t vtrim_gguf_f32(const struct gguf_context * g, const char * key, float * out, bool required) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        return missing(key, required);
    }
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: *out = gguf_get_val_f32(g, id); return 0;
        case GGUF_TYPE_FLOAT64: *out = (float) gguf_get_val_f64(g, id); return 0;
        default: {
            int32_t i;
            const int32_t rc = vtrim_gguf_i32(g, key, &i, true);
            if (rc < 0) {
                return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' is not a number", key);
            }
            *out = (float) i;
            return 0;
        }
    }
}

int32_t vtrim_gguf_bool(const struct gguf_context * g, const char * key, bool * out, bool required) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        return missing(key, required);
    }
    if (gguf_get_kv_type(g, id) == GGUF_TYPE_BOOL) {
        *out = gguf_get_val_bool(g, id);
        return 0;
    }
    int32_t i;
    if (vtrim_gguf_i32(g, key, &i, true) < 0) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' is not a boolean", key);
    }
    *out = i != 0;
    return 0;
}

int32_t vtrim_gguf_str(const struct gguf_context * g, const char * key, char * out, size_t n, bool required) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        return missing(key, required);
    }
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' is not a string", key);
    }
    const char * s = gguf_get_val_str(g, id);
    const size_t len = strlen(s);
    if (len + 1 > n) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' is too long (%zu bytes)", key, len);
    }
    memcpy(out, s, len + 1);
    return 0;
}

int32_t vtrim_gguf_f32_array(const struct gguf_context * g, const char * key, float * out, int32_t n, bool required) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        return missing(key, required);
    }
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != GGUF_TYPE_FLOAT32 ||
        gguf_get_arr_n(g, id) != (size_t) n) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' must be an array of %d float32", key, n);
    }
    memcpy(out, gguf_get_arr_data(g, id), sizeof(float) * (size_t) n);
    return 0;
}

int32_t vtrim_gguf_i32_array(const struct gguf_context * g, const char * key, int32_t * out, int32_t n_max,
                             int32_t * n, bool required) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        return missing(key, required);
    }
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' is not an array", key);
    }
    const enum gguf_type t = gguf_get_arr_type(g, id);
    const size_t count = gguf_get_arr_n(g, id);
    if (count > (size_t) n_max) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' has %zu values (at most %d)", key, count, n_max);
    }
    const void * data = gguf_get_arr_data(g, id);
    for (size_t i = 0; i < count; i++) {
        int64_t v;
        switch (t) {
            case GGUF_TYPE_INT32:  v = ((const int32_t *) data)[i]; break;
            case GGUF_TYPE_UINT32: v = ((const uint32_t *) data)[i]; break;
            case GGUF_TYPE_INT64:  v = ((const int64_t *) data)[i]; break;
            case GGUF_TYPE_UINT64: v = (int64_t) ((const uint64_t *) data)[i]; break;
            case GGUF_TYPE_INT16:  v = ((const int16_t *) data)[i]; break;
            case GGUF_TYPE_UINT16: v = ((const uint16_t *) data)[i]; break;
            case GGUF_TYPE_INT8:   v = ((const int8_t *) data)[i]; break;
            case GGUF_TYPE_UINT8:  v = ((const uint8_t *) data)[i]; break;
            default: return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' is not an integer array", key);
        }
        if (v < INT32_MIN || v > INT32_MAX) {
            return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' holds an out-of-range value", key);
        }
        out[i] = (int32_t) v;
    }
    *n = (int32_t) count;
    return 0;
}

int32_t vtrim_gguf_i32_array_alloc(const struct gguf_context * g, const char * key, int32_t ** out, int32_t * n,
                                   bool required) {
    *out = NULL;
    *n = 0;
    const int64_t id = gguf_find_key(g, key);
    const size_t count = id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY ? gguf_get_arr_n(g, id) : 0;
    if (count > INT32_MAX / sizeof(int32_t)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "key '%s' has %zu values", key, count);
    }
    *out = malloc(sizeof(int32_t) * (count > 0 ? count : 1));
    if (!*out) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    return vtrim_gguf_i32_array(g, key, *out, (int32_t) count, n, required);
}
