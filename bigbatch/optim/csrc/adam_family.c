/* CPU float32 update kernels of bigbatch's AdaBound/AMSBound and RAdam.
 *
 * One call updates every tensor of a parameter group in a single pass over memory: the tensors
 * are cut into chunks and one OpenMP region shares all chunks between the threads, so a group of
 * many small tensors costs one parallel region, not one per tensor.
 *
 * Each update repeats, operation for operation and in float32, the `_body` of its Python class.
 * Built with -ffp-contract=off (no multiply-add fused behind our back) and IEEE sqrt and division,
 * the results equal the torch.compile kernel's bit for bit (tested). Eager torch can differ by
 * one ulp: its CPU sqrt is not always correctly rounded (measured with torch 2.13).
 *
 * Scalars `s` (float32, same order as the Python `_scalars`):
 *   AdaBound: b1, 1-b1, b2, 1-b2, eps, coupled L2, decay factor, step size, lower, upper
 *   RAdam:    b1, 1-b1, b2, 1-b2, eps, coupled L2, decay factor, lr/bc1, r_t*sqrt(bc2), rectified
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef CHUNK
#define CHUNK 65536   /* floats per work item: 256 KiB per stream */
#endif
#define LINE 16        /* floats per 64-byte cache line */
#ifndef AHEAD
/* Software prefetch distance in floats (2 KiB), or 0 for none. Whether it helps depends on the
 * CPU (measured: 7-12% faster steps on one 2-core EPYC, 10-20% slower on another): the library is
 * built both ways and the faster one chosen once per machine (bigbatch/optim/_native.py). */
#define AHEAD 512
#endif

/* STREAM7 / STREAM9 are no updates: the same memory traffic as AdaBound/RAdam (read p, g, m, v;
 * write p, m, v) and AMSBound (plus vmax read and write) with one add per element, run through the
 * same chunks, threads and prefetch. Their time is each update's roofline on this machine. */
enum { ADABOUND = 0, AMSBOUND = 1, RADAM = 2, STREAM7 = 3, STREAM9 = 4 };

/* The vector instruction set this build targets (-march=native / -mcpu=native). */
const char *bigbatch_isa(void) {
#if defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2+fma";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__AVX__)
    return "avx";
#elif defined(__ARM_FEATURE_SVE)
    return "sve";
#elif defined(__ARM_NEON)
    return "neon";
#elif defined(__SSE2__)
    return "sse2";
#else
    return "scalar";
#endif
}

/* torch.clamp propagates NaN; fmaxf/fminf would drop it. */
static inline float clamp_nan(float x, float lo, float hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

/* One chunk of one tensor. `kind` is a constant at each call site, so each kind gets its own
 * loop, vectorised. */
static inline __attribute__((always_inline)) void
update_chunk(const int kind, float *restrict p, const float *restrict g, float *restrict m,
             float *restrict v, float *restrict vmax, int64_t n, const float *restrict s) {
    const float b1 = s[0], c1 = s[1], b2 = s[2], c2 = s[3], eps = s[4], l2 = s[5], decay = s[6];
    /* AdaBound: step size and bounds. RAdam: lr/bc1, r_t*sqrt(bc2), whether rectified. */
    const float s7 = s[7], s8 = s[8], s9 = s[9];
    /* torch.lerp's formula (RAdam's EMA), as Inductor compiles it: exact at both ends. */
    const int small = fabsf(c1) < 0.5f;
    const float w1 = 1.0f - c1;
    for (int64_t j0 = 0; j0 < n; j0 += LINE) {
        if (AHEAD > 0 && j0 + AHEAD < n) {
            __builtin_prefetch(p + j0 + AHEAD, 1);
            __builtin_prefetch(g + j0 + AHEAD, 0);
            __builtin_prefetch(m + j0 + AHEAD, 1);
            __builtin_prefetch(v + j0 + AHEAD, 1);
            if (kind == AMSBOUND) __builtin_prefetch(vmax + j0 + AHEAD, 0); /* mostly read */
            if (kind == STREAM9) __builtin_prefetch(vmax + j0 + AHEAD, 1);
        }
        const int64_t j1 = j0 + LINE < n ? j0 + LINE : n;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            if (kind == STREAM7 || kind == STREAM9) {
                const float a = p[j], b = g[j], c = m[j], d = v[j];
                const float e = kind == STREAM9 ? vmax[j] : 0.0f;
                p[j] = b + e;
                m[j] = a;
                v[j] = c + d;
                if (kind == STREAM9) vmax[j] = d;
                continue;
            }
            float gj = g[j] + l2 * p[j];
            float vj = v[j] * b2 + gj * gj * c2;
            float mj;
            if (kind == RADAM) {
                mj = small ? m[j] + c1 * (gj - m[j]) : gj - (gj - m[j]) * w1;
                float adaptive = s9 > 0.0f ? s8 / (sqrtf(vj) + eps) : 1.0f;
                p[j] = p[j] * decay - mj * s7 * adaptive;
            } else {
                mj = m[j] * b1 + gj * c1;
                float denom_v = vj;
                if (kind == AMSBOUND) {
                    /* torch.maximum(vmax, v) with NaN propagated, stored only where it differs from
                     * vmax (a masked store): once training settles v rarely passes its running max,
                     * and lines where none moved are never dirtied nor written back. The result is
                     * exactly what an unconditional store would leave (v >= +0: no signed zeros). */
                    const float vm = vmax[j];
                    const int up = vj > vm || (vj != vj && vm == vm);
                    denom_v = up ? vj : vm;
                    if (up) vmax[j] = vj;
                }
                float rate = clamp_nan(s7 / (sqrtf(denom_v) + eps), s8, s9);
                p[j] = p[j] * decay - rate * mj;
            }
            m[j] = mj;
            v[j] = vj;
        }
    }
}

/* Update `count` tensors (numel[i] floats each). vmax is NULL unless kind == AMSBOUND.
 * Returns 0, or -1 when out of memory (nothing was updated). */
int bigbatch_adam_family_step(int kind, int64_t count, float *const *p, const float *const *g,
                              float *const *m, float *const *v, float *const *vmax,
                              const int64_t *numel, const float *s, int threads) {
    int64_t *first = malloc((size_t)(count + 1) * sizeof(int64_t)); /* first chunk of tensor i */
    if (!first) return -1;
    first[0] = 0;
    for (int64_t i = 0; i < count; i++) first[i + 1] = first[i] + (numel[i] + CHUNK - 1) / CHUNK;
    const int64_t chunks = first[count];
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t lo = 0, hi = count - 1; /* the tensor holding chunk c: first[i] <= c < first[i+1] */
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (first[mid] <= c) lo = mid; else hi = mid - 1;
        }
        const int64_t i = lo, start = (c - first[i]) * CHUNK;
        const int64_t n = numel[i] - start < CHUNK ? numel[i] - start : CHUNK;
        float *pi = p[i] + start, *mi = m[i] + start, *vi = v[i] + start;
        const float *gi = g[i] + start;
        if (kind == AMSBOUND)
            update_chunk(AMSBOUND, pi, gi, mi, vi, vmax[i] + start, n, s);
        else if (kind == ADABOUND)
            update_chunk(ADABOUND, pi, gi, mi, vi, NULL, n, s);
        else if (kind == RADAM)
            update_chunk(RADAM, pi, gi, mi, vi, NULL, n, s);
        else if (kind == STREAM7)
            update_chunk(STREAM7, pi, gi, mi, vi, NULL, n, s);
        else
            update_chunk(STREAM9, pi, gi, mi, vi, vmax[i] + start, n, s);
    }
    free(first);
    return 0;
}
