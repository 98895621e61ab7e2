#include "runtime/image_cache.h"

#include "api/error.h"

#include <stdlib.h>
#include <string.h>
#if !defined(_WIN32)
#include <pthread.h>
#endif

struct entry {
    uint64_t  key;
    uint64_t  used;      // the tick of its last use: the smallest goes first
    int32_t   n_embd, n_rows;
    float *   embd;
    int32_t * src;
    int64_t   bytes;
};

struct vtrim_image_cache {
#if !defined(_WIN32)
    pthread_mutex_t lock;
#endif
    int64_t         cap, bytes;
    uint64_t        tick;
    struct entry *  items;
    int32_t         n, n_cap;
};

struct vtrim_image_cache * vtrim_image_cache_new(int64_t cap_bytes, int32_t * rc) {
    *rc = 0;
#if defined(_WIN32)
    (void) cap_bytes;
    return NULL;
#else
    if (cap_bytes <= 0) {
        return NULL;
    }
    struct vtrim_image_cache * c = calloc(1, sizeof *c);
    if (!c || pthread_mutex_init(&c->lock, NULL) != 0) {
        free(c);
        *rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "cannot create the image cache");
        return NULL;
    }
    c->cap = cap_bytes;
    return c;
#endif
}

static void drop(struct vtrim_image_cache * c, int32_t i) {
    c->bytes -= c->items[i].bytes;
    free(c->items[i].embd);
    free(c->items[i].src);
    c->items[i] = c->items[--c->n];
}

void vtrim_image_cache_free(struct vtrim_image_cache * c) {
    if (!c) {
        return;
    }
    while (c->n > 0) {
        drop(c, c->n - 1);
    }
    free(c->items);
#if !defined(_WIN32)
    pthread_mutex_destroy(&c->lock);
#endif
    free(c);
}

// FNV-1a over the bytes, then a final mix: pixels differ in their low bits between similar images.
uint64_t vtrim_image_cache_key(const float * pixels, int64_t n) {
    const unsigned char * p = (const unsigned char *) pixels;
    uint64_t h = 1469598103934665603ull ^ (uint64_t) n;
    for (int64_t i = 0; i < n * (int64_t) sizeof(float); i++) {
        h = (h ^ p[i]) * 1099511628211ull;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    return h ^ (h >> 33);
}

static int32_t find(const struct vtrim_image_cache * c, uint64_t key, int32_t n_embd) {
    for (int32_t i = 0; i < c->n; i++) {
        if (c->items[i].key == key && c->items[i].n_embd == n_embd) {
            return i;
        }
    }
    return -1;
}

bool vtrim_image_cache_get(struct vtrim_image_cache * c, uint64_t key, int32_t n_embd, int32_t max_rows,
                           float * embd, int32_t * src, int32_t * n_rows) {
    if (!c) {
        return false;
    }
    bool hit = false;
#if !defined(_WIN32)
    pthread_mutex_lock(&c->lock);
    const int32_t i = find(c, key, n_embd);
    if (i >= 0 && c->items[i].n_rows <= max_rows) {
        const struct entry * e = &c->items[i];
        memcpy(embd, e->embd, sizeof(float) * (size_t) e->n_rows * (size_t) n_embd);
        memcpy(src, e->src, sizeof(int32_t) * (size_t) e->n_rows);
        *n_rows = e->n_rows;
        c->items[i].used = ++c->tick;
        hit = true;
    }
    pthread_mutex_unlock(&c->lock);
#endif
    return hit;
}

void vtrim_image_cache_put(struct vtrim_image_cache * c, uint64_t key, int32_t n_embd, int32_t n_rows,
                           const float * embd, const int32_t * src) {
    const int64_t bytes = (int64_t) n_rows * ((int64_t) n_embd * (int64_t) sizeof(float) + (int64_t) sizeof(int32_t));
    if (!c || bytes > c->cap) {
        return;
    }
    struct entry e = { .key = key, .n_embd = n_embd, .n_rows = n_rows, .bytes = bytes,
                       .embd = malloc(sizeof(float) * (size_t) n_rows * (size_t) n_embd),
                       .src = malloc(sizeof(int32_t) * (size_t) n_rows) };
    if (!e.embd || !e.src) {   // a cache that cannot grow only misses
        free(e.embd);
        free(e.src);
        return;
    }
    memcpy(e.embd, embd, sizeof(float) * (size_t) n_rows * (size_t) n_embd);
    memcpy(e.src, src, sizeof(int32_t) * (size_t) n_rows);
#if !defined(_WIN32)
    pthread_mutex_lock(&c->lock);
    const int32_t have = find(c, key, n_embd);
    if (have >= 0) {
        drop(c, have);   // another context encoded the same image meanwhile: the newer copy stays
    }
    while (c->n > 0 && c->bytes + bytes > c->cap) {
        int32_t oldest = 0;
        for (int32_t i = 1; i < c->n; i++) {
            oldest = c->items[i].used < c->items[oldest].used ? i : oldest;
        }
        drop(c, oldest);
    }
    if (c->n == c->n_cap) {
        const int32_t cap = c->n_cap ? 2 * c->n_cap : 8;
        struct entry * grown = realloc(c->items, sizeof *grown * (size_t) cap);
        if (grown) {
            c->items = grown;
            c->n_cap = cap;
        }
    }
    if (c->n < c->n_cap) {
        e.used = ++c->tick;
        c->items[c->n++] = e;
        c->bytes += bytes;
        e.embd = NULL;
        e.src = NULL;
    }
    pthread_mutex_unlock(&c->lock);
#endif
    free(e.embd);
    free(e.src);
}

int64_t vtrim_image_cache_bytes(const struct vtrim_image_cache * c) {
    if (!c) {
        return 0;
    }
#if !defined(_WIN32)
    pthread_mutex_lock((pthread_mutex_t *) &c->lock);
    const int64_t b = c->bytes;
    pthread_mutex_unlock((pthread_mutex_t *) &c->lock);
    return b;
#else
    return 0;
#endif
}
