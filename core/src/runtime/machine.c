// What the CPU backend sustains here (vtrim_measure_machine): ggml's own matrix product and a large copy,
// timed with the threads the caller gives, so that a benchmark can state how far from the limit it runs.
#include "vtrim.h"

#include "api/error.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// Seconds on a clock: the wall clock, or this thread's CPU time. With one thread ggml computes on the calling
// thread, so its CPU time is the work's own time, whatever else the machine runs; on a shared machine that is
// the steadier denominator for a one-thread benchmark that also counts CPU time.
static double now_seconds(bool thread_cpu) {
#if defined(CLOCK_THREAD_CPUTIME_ID)
    if (thread_cpu) {
        struct timespec ts;
        if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) {
            return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
        }
    }
#else
    (void) thread_cpu;
#endif
    return (double) ggml_time_us() * 1e-6;
}

// The fastest of `reps` computes of gf, in seconds (the first run warms caches and pages and is not timed).
static double best_seconds(ggml_backend_t cpu, bool thread_cpu, struct ggml_cgraph * gf, int reps, int32_t * rc) {
    double best = 1e30;
    for (int r = 0; r <= reps && *rc == 0; r++) {
        const double t0 = now_seconds(thread_cpu);
        if (ggml_backend_graph_compute(cpu, gf) != GGML_STATUS_SUCCESS) {
            *rc = vtrim_fail(VTRIM_ERR_BACKEND, "vtrim_measure_machine: a graph failed");
        }
        const double s = now_seconds(thread_cpu) - t0;
        best = r > 0 && s < best ? s : best;
    }
    return best;
}

// FLOP/s of an n x n by n x n product, weights of `type`, f32 activations (ggml converts them as needed).
static double matmul_rate(ggml_backend_t cpu, bool thread_cpu, enum ggml_type type, int64_t n, int32_t * rc) {
    struct ggml_init_params ip = { 8 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true };
    struct ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        *rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        return 0.0;
    }
    struct ggml_tensor * a = ggml_new_tensor_2d(ctx, type, n, n);
    struct ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, n);
    struct ggml_tensor * c = ggml_mul_mat(ctx, a, b);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, c);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, cpu);
    double rate = 0.0;
    if (!buf) {
        *rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "vtrim_measure_machine: no memory for a %lld^2 product",
                         (long long) n);
    } else {
        ggml_backend_buffer_clear(buf, 0);   // zeros: the speed of a product does not depend on its values
        rate = 2.0 * (double) n * n * n / best_seconds(cpu, thread_cpu, gf, 3, rc);
        ggml_backend_buffer_free(buf);
    }
    ggml_free(ctx);
    return rate;
}

// Bytes read + written per second by a copy of 256 MiB of f32 (ggml_cpy), far beyond the caches.
static double copy_rate(ggml_backend_t cpu, bool thread_cpu, int32_t * rc) {
    const int64_t n = (int64_t) 64 << 20;
    struct ggml_init_params ip = { 4 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true };
    struct ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        *rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
        return 0.0;
    }
    struct ggml_tensor * src = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
    struct ggml_tensor * dst = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, src, dst));
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, cpu);
    double rate = 0.0;
    if (!buf) {
        *rc = vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "vtrim_measure_machine: no memory for the copy");
    } else {
        ggml_backend_buffer_clear(buf, 0);
        rate = 2.0 * (double) ggml_nbytes(src) / best_seconds(cpu, thread_cpu, gf, 3, rc);
        ggml_backend_buffer_free(buf);
    }
    ggml_free(ctx);
    return rate;
}

int32_t vtrim_measure_machine(int32_t n_threads, int32_t n, struct vtrim_machine_rates * out) {
    if (!out || n < 64 || n > 16384) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "vtrim_measure_machine: need out and 64 <= n <= 16384 (got %d)", n);
    }
    memset(out, 0, sizeof *out);
    ggml_backend_t cpu = ggml_backend_cpu_init();
    if (!cpu) {
        return vtrim_fail(VTRIM_ERR_BACKEND, "vtrim_measure_machine: no CPU backend");
    }
    if (n_threads > 0) {
        ggml_backend_cpu_set_n_threads(cpu, n_threads);
    }
    const bool thread_cpu = n_threads == 1;
    int32_t rc = 0;
    out->f32_flops = matmul_rate(cpu, thread_cpu, GGML_TYPE_F32, n, &rc);
    if (rc == 0) {
        out->f16_flops = matmul_rate(cpu, thread_cpu, GGML_TYPE_F16, n, &rc);
    }
    if (rc == 0) {
        out->bf16_flops = matmul_rate(cpu, thread_cpu, GGML_TYPE_BF16, n, &rc);
    }
    if (rc == 0) {
        out->copy_bytes_per_s = copy_rate(cpu, thread_cpu, &rc);
    }
    ggml_backend_free(cpu);
    return rc;
}
