// The policy list and what every method shares (ranking). Which hook runs a method is the method's table
// entry; the hooks themselves live where their scores are (runtime/stages.c, the architectures).
#include "reduce/reduce.h"

#include "api/error.h"

#include <stdlib.h>
#include <string.h>

static int by_score_then_row(const void * a, const void * b) {
    const struct vtrim_ranked * x = a, * y = b;
    if (x->score != y->score) {
        return x->score > y->score ? -1 : 1;
    }
    return (x->row > y->row) - (x->row < y->row);
}

void vtrim_rank_sort(struct vtrim_ranked * r, int32_t n) {
    qsort(r, (size_t) n, sizeof *r, by_score_then_row);
}

int32_t vtrim_mask_to_rows(const bool * keep, int32_t n, int32_t * out) {
    int32_t k = 0;
    for (int32_t i = 0; i < n; i++) {
        if (keep[i]) {
            out[k++] = i;
        }
    }
    return k;
}

int32_t vtrim_rows_after_last_image(const bool * is_image, int32_t n, int32_t * out) {
    int32_t last_image = -1;
    for (int32_t i = 0; i < n; i++) {
        last_image = is_image[i] ? i : last_image;
    }
    int32_t k = 0;
    for (int32_t i = last_image + 1; i < n; i++) {
        out[k++] = i;
    }
    if (k == 0 && n > 0) {   // only the last row can look at an image that ends the prompt
        out[k++] = n - 1;
    }
    return k;
}

int32_t vtrim_policy_list_add(struct vtrim_policy_list * l, const struct vtrim_reducer * r, const void * params,
                              const struct vtrim_reduce_caps * caps) {
    int32_t rc = r->validate(params, caps);
    if (rc < 0) {
        return rc;
    }
    const int32_t layer = r->layer(params, caps);
    const int32_t n_steps = r->n_steps ? r->n_steps(params, caps) : 1;
    if (n_steps < 1) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "%s has no step to run on this model", r->name);
    }
    int32_t * step_layers = malloc(sizeof(int32_t) * (size_t) n_steps);
    if (!step_layers) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    step_layers[0] = layer;
    for (int32_t i = 1; i < n_steps; i++) {
        step_layers[i] = r->step_layer(params, caps, i);
        if (step_layers[i] <= step_layers[i - 1]) {
            free(step_layers);
            return vtrim_fail(VTRIM_ERR_STATE, "%s: step layers not increasing", r->name);
        }
    }
    for (int32_t i = 0; i < l->n; i++) {
        const struct vtrim_policy * q = &l->items[i];
        if (r->one_per_context && q->r == r) {
            rc = vtrim_fail(VTRIM_ERR_INVALID_ARG, "one %s per context", r->name);
        } else if (q->r->hook == r->hook && q->step_layers[q->n_steps - 1] >= layer) {
            rc = vtrim_fail(VTRIM_ERR_INVALID_ARG, "policies of one hook must come in increasing layer order "
                            "(%s at layer %d after %s up to layer %d)", r->name, layer, q->r->name,
                            q->step_layers[q->n_steps - 1]);
        }
        if (rc < 0) {
            free(step_layers);
            return rc;
        }
    }
    if (l->n == l->cap) {
        const int32_t cap = l->cap ? 2 * l->cap : 4;
        struct vtrim_policy * items = realloc(l->items, sizeof *items * (size_t) cap);
        if (!items) {
            free(step_layers);
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        }
        l->items = items;
        l->cap = cap;
    }
    void * copy = malloc(r->params_size);
    if (!copy) {
        free(step_layers);
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    memcpy(copy, params, r->params_size);
    l->items[l->n++] = (struct vtrim_policy) { r, copy, layer, n_steps, step_layers };
    return 0;
}

void vtrim_policy_list_clear(struct vtrim_policy_list * l) {
    for (int32_t i = 0; i < l->n; i++) {
        free(l->items[i].params);
        free(l->items[i].step_layers);
    }
    l->n = 0;
}

void vtrim_policy_list_free(struct vtrim_policy_list * l) {
    vtrim_policy_list_clear(l);
    free(l->items);
    memset(l, 0, sizeof *l);
}

bool vtrim_policy_list_has_hook(const struct vtrim_policy_list * l, int32_t hook) {
    for (int32_t i = 0; i < l->n; i++) {
        if (l->items[i].r->hook == hook) {
            return true;
        }
    }
    return false;
}

int32_t vtrim_policy_list_order(const struct vtrim_policy_list * l, int32_t except, int32_t * order) {
    int32_t n = 0;
    for (int32_t i = 0; i < l->n; i++) {
        if (l->items[i].r->hook == except) {
            continue;
        }
        // insertion by layer, stable: a policy goes after every earlier one at its layer or before
        int32_t j = n++;
        while (j > 0 && l->items[order[j - 1]].layer > l->items[i].layer) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    return n;
}
