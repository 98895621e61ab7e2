// The reduction entry points of vtrim.h: each method's add registers its table entry (reduce/reduce.h) with
// the context's policy list (its *_default lives with the method). A new method adds its one-line add here.
#include "api/error.h"
#include "arch/arch.h"
#include "reduce/reduce.h"
#include "runtime/context.h"

#include <string.h>

static int32_t add(struct vtrim_context * c, const struct vtrim_reducer * r, const void * p, const char * fn) {
    if (!c || !p) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "%s: ctx and params are required", fn);
    }
    struct vtrim_reduce_caps caps;
    memset(&caps, 0, sizeof caps);
    caps.n_layer = c->model->text.n_layer;
    caps.first_cross_layer = -1;
    if (c->model->arch->reduce_caps) {
        c->model->arch->reduce_caps(c->model, &caps);
    }
    return vtrim_policy_list_add(&c->policies, r, p, &caps);
}

int32_t vtrim_reduce_add_fastv(struct vtrim_context * c, const struct vtrim_fastv_params * p) {
    return add(c, &vtrim_reducer_fastv, p, "vtrim_reduce_add_fastv");
}

int32_t vtrim_reduce_add_trim(struct vtrim_context * c, const struct vtrim_trim_params * p) {
    return add(c, &vtrim_reducer_trim, p, "vtrim_reduce_add_trim");
}

int32_t vtrim_reduce_add_ficoco_v(struct vtrim_context * c, const struct vtrim_ficoco_v_params * p) {
    return add(c, &vtrim_reducer_ficoco_v, p, "vtrim_reduce_add_ficoco_v");
}

int32_t vtrim_reduce_add_ficoco_l(struct vtrim_context * c, const struct vtrim_ficoco_l_params * p) {
    return add(c, &vtrim_reducer_ficoco_l, p, "vtrim_reduce_add_ficoco_l");
}

int32_t vtrim_reduce_add_vlcache(struct vtrim_context * c, const struct vtrim_vlcache_params * p) {
    return add(c, &vtrim_reducer_vlcache, p, "vtrim_reduce_add_vlcache");
}

int32_t vtrim_reduce_clear(struct vtrim_context * c) {
    if (!c) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_reduce_clear: ctx is NULL");
    }
    vtrim_policy_list_clear(&c->policies);
    return 0;
}

int32_t vtrim_get_reduce_stage(const struct vtrim_context * c, int32_t i, struct vtrim_reduce_stage * out) {
    if (!c || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_get_reduce_stage: ctx and out are required");
    }
    if (i < 0 || i >= c->n_stages) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "stage %d of %d", i, c->n_stages);
    }
    *out = c->stages[i];
    return 0;
}

int32_t vtrim_get_kept_image_rows(const struct vtrim_context * c, int32_t * rows, int32_t n_max, int32_t * n_out) {
    if (!c || !n_out || n_max < 0 || (!rows && n_max > 0)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_get_kept_image_rows: invalid arguments");
    }
    *n_out = c->n_kept_image_rows;
    if (c->n_kept_image_rows > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_get_kept_image_rows: needs %d", c->n_kept_image_rows);
    }
    if (c->n_kept_image_rows > 0) {
        memcpy(rows, c->kept_image_rows, sizeof(int32_t) * (size_t) c->n_kept_image_rows);
    }
    return 0;
}

int32_t vtrim_get_kv_positions(const struct vtrim_context * c, int32_t layer, int32_t head, int32_t * pos,
                               int32_t n_max, int32_t * n_out) {
    if (!c || !n_out || n_max < 0 || (!pos && n_max > 0)) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_get_kv_positions: invalid arguments");
    }
    if (layer < 0 || layer >= c->kv.n_layer || head < 0 || head >= c->kv.n_head_kv) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_get_kv_positions: layer %d of %d, head %d of %d", layer,
                          c->kv.n_layer, head, c->kv.n_head_kv);
    }
    *n_out = c->kv.n[layer];
    if (*n_out > n_max) {
        return vtrim_fail(VTRIM_ERR_BUFFER_TOO_SMALL, "vtrim_get_kv_positions: needs %d", *n_out);
    }
    if (*n_out > 0) {
        memcpy(pos, vtrim_kv_positions(&c->kv, layer, head), sizeof(int32_t) * (size_t) *n_out);
    }
    return 0;
}
