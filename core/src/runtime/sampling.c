// Token sampling: greedy argmax, or top-k, then top-p (nucleus), then a draw from the softmax at the
// temperature. The random generator is xoshiro256** seeded through splitmix64, so a seed gives the same
// draws on every platform.
#include "runtime/sampling.h"

#include "api/error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct candidate {
    float   logit;
    int32_t id;
};

struct vtrim_sampler {
    struct vtrim_sampler_params params;
    uint64_t rng[4];              // xoshiro256** state
    float *  logits;              // vtrim_sampler_sample's copy of the context's logits
    int32_t  logits_cap;
    struct candidate * cand;      // the tokens still in the running
    int32_t  cand_cap;
};

// ---- random numbers ---------------------------------------------------------------------------

static uint64_t splitmix64(uint64_t * x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

// Uniform in [0, 1) with 53 random bits.
static double next_uniform(struct vtrim_sampler * s) {
    return (double) (xoshiro_next(s->rng) >> 11) * (1.0 / 9007199254740992.0);
}

// ---- params, init, free -----------------------------------------------------------------------

void vtrim_sampler_params_default(struct vtrim_sampler_params * p) {
    if (!p) {
        return;
    }
    memset(p, 0, sizeof *p);
    p->temperature = 0.0f;   // greedy: the same answer every run unless asked otherwise
    p->top_k = 40;
    p->top_p = 0.95f;
    p->seed = 0;
}

int32_t vtrim_sampler_init(const struct vtrim_sampler_params * p, struct vtrim_sampler ** out) {
    if (!p || !out) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_sampler_init: NULL argument");
    }
    *out = NULL;
    if (!isfinite(p->temperature) || p->temperature < 0.0f) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "temperature must be finite and >= 0, got %g",
                          (double) p->temperature);
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {   // also rejects NaN
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "top_p must be in (0, 1], got %g", (double) p->top_p);
    }
    if (p->top_k < 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "top_k must be >= 0 (0: no top-k), got %d", p->top_k);
    }
    struct vtrim_sampler * s = calloc(1, sizeof *s);
    if (!s) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for the sampler");
    }
    s->params = *p;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) {
        s->rng[i] = splitmix64(&x);
    }
    *out = s;
    return VTRIM_OK;
}

void vtrim_sampler_free(struct vtrim_sampler * s) {
    if (!s) {
        return;
    }
    free(s->logits);
    free(s->cand);
    free(s);
}

// ---- sampling ---------------------------------------------------------------------------------

// Whether a ranks before b: higher logit first, the lower id on ties.
static bool ranks_before(const struct candidate * a, const struct candidate * b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int by_rank(const void * a, const void * b) {
    return ranks_before(a, b) ? -1 : ranks_before(b, a) ? 1 : 0;
}

// Keeps the k best of c[0, n) in c[0, k), via a heap whose root is the worst kept: O(n log k).
static void keep_top_k(struct candidate * c, int32_t n, int32_t k) {
    for (int32_t i = 0; i < n; i++) {
        if (i >= k && !ranks_before(&c[i], &c[0])) {
            continue;
        }
        int32_t pos;
        if (i < k) {          // grow the heap: sift the new element up
            pos = i;
            const struct candidate x = c[i];
            while (pos > 0 && ranks_before(&c[(pos - 1) / 2], &x)) {
                c[pos] = c[(pos - 1) / 2];
                pos = (pos - 1) / 2;
            }
            c[pos] = x;
        } else {              // replace the worst kept: sift down from the root
            const struct candidate x = c[i];
            pos = 0;
            for (;;) {
                int32_t child = 2 * pos + 1;
                if (child >= k) {
                    break;
                }
                if (child + 1 < k && ranks_before(&c[child], &c[child + 1])) {
                    child++;
                }
                if (!ranks_before(&x, &c[child])) {
                    break;
                }
                c[pos] = c[child];
                pos = child;
            }
            c[pos] = x;
        }
    }
}

static int32_t greedy(const float * logits, int32_t n_vocab, int32_t * token) {
    int32_t best = -1;
    for (int32_t i = 0; i < n_vocab; i++) {
        if (!isnan(logits[i]) && (best < 0 || logits[i] > logits[best])) {
            best = i;
        }
    }
    if (best < 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "every logit is NaN");
    }
    *token = best;
    return VTRIM_OK;
}

int32_t vtrim_sample_logits(struct vtrim_sampler * s, const float * logits, int32_t n_vocab, int32_t * token) {
    if (!s || !logits || !token || n_vocab <= 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_sample_logits: NULL argument or n_vocab <= 0");
    }
    const struct vtrim_sampler_params * p = &s->params;
    if (p->temperature <= 0.0f) {
        return greedy(logits, n_vocab, token);
    }
    if (n_vocab > s->cand_cap) {
        struct candidate * cand = realloc(s->cand, (size_t) n_vocab * sizeof *cand);
        if (!cand) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for %d sampling candidates", n_vocab);
        }
        s->cand = cand;
        s->cand_cap = n_vocab;
    }
    struct candidate * c = s->cand;
    int32_t n = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        if (!isnan(logits[i])) {
            c[n++] = (struct candidate) { logits[i], i };
        }
    }
    if (n == 0) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "every logit is NaN");
    }
    const bool use_top_k = p->top_k > 0 && p->top_k < n;
    const bool nucleus = p->top_p < 1.0f;
    if (use_top_k) {
        keep_top_k(c, n, p->top_k);
        n = p->top_k;
    }
    if (use_top_k || nucleus) {   // best first: the nucleus is a prefix, and the draw walks a canonical order
        qsort(c, (size_t) n, sizeof *c, by_rank);
    }
    float max = c[0].logit;
    for (int32_t i = 1; i < n; i++) {
        max = c[i].logit > max ? c[i].logit : max;
    }
    if (isinf(max)) {   // +inf wins outright; all -inf leaves nothing to weigh: take the best ranked
        const struct candidate * best = &c[0];
        for (int32_t i = 1; i < n; i++) {
            best = ranks_before(&c[i], best) ? &c[i] : best;
        }
        *token = best->id;
        return VTRIM_OK;
    }
    // Unnormalized softmax weights at the temperature, in (0, 1], kept in the logit slots.
    double total = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].logit = (float) exp(((double) c[i].logit - (double) max) / (double) p->temperature);
        total += c[i].logit;
    }
    if (nucleus) {   // the smallest prefix (best first) whose probability reaches top_p
        double cum = 0.0;
        int32_t keep = n;
        for (int32_t i = 0; i < n; i++) {
            cum += c[i].logit;
            if (cum >= (double) p->top_p * total) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
        total = cum;
    }
    const double u = next_uniform(s) * total;
    double cum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        cum += c[i].logit;
        if (u < cum) {
            *token = c[i].id;
            return VTRIM_OK;
        }
    }
    *token = c[n - 1].id;   // rounding left u at the very top
    return VTRIM_OK;
}

int32_t vtrim_sampler_sample(struct vtrim_sampler * s, const struct vtrim_context * ctx, int32_t * token) {
    if (!s || !ctx || !token) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_sampler_sample: NULL argument");
    }
    const int32_t n_vocab = vtrim_context_vocab_size(ctx);
    if (n_vocab <= 0) {
        return vtrim_fail(VTRIM_ERR_STATE, "the context's model has no vocabulary to sample from");
    }
    if (n_vocab > s->logits_cap) {
        float * logits = realloc(s->logits, (size_t) n_vocab * sizeof *logits);
        if (!logits) {
            return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory for %d logits", n_vocab);
        }
        s->logits = logits;
        s->logits_cap = n_vocab;
    }
    const int32_t rc = vtrim_logits(ctx, s->logits, n_vocab);
    if (rc) {
        return rc;
    }
    return vtrim_sample_logits(s, s->logits, n_vocab, token);
}
