/* Fused CPU kernels for tilt's teacher-forced pass (tilt/fastforward.py): the learner's forward and
 * backward and the reference's forward.
 *
 * In that pass every position of a batch (prompts once, then the completions: 4,232 positions at
 * 8 prompts x 8 completions x 64 tokens) goes through each layer's RMS norms and SwiGLU. In torch
 * ops each is several passes over a [positions, width] tensor, and SwiGLU's operands are strided
 * halves of the gate/up product, which torch's elementwise kernels walk slowly (10M x 64 tokens:
 * silu_backward 11.9 ms per layer for 4.3M elements; benchmarks/README.md, speed work 31). Here each
 * is one walk over the rows, forward and backward, with SwiGLU on 16-float vectors (vec16.h: expv, sigmoidv).
 *
 * Sums that cross rows (a norm weight's gradient) are accumulated in double per thread over a fixed
 * split of the rows and added in thread order, so results do not depend on scheduling. float32, contiguous
 * row-major tensors only (the Python side checks).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
/* the build uses -std=c11, where GCC does not contract a * b + c into one fused multiply-add */
#pragma GCC optimize("fp-contract=fast")
#endif

#include "vec16.h"

/* SwiGLU's backward (Eq. 6 of arXiv:2002.05202 with Swish_1 = SiLU): for out = silu(g) u with g, u
 * the two halves of gu [N, 2I] and dy [N, I],
 *     d g = dy u sigma(g) (1 + g (1 - sigma(g))),      d u = dy silu(g) = dy g sigma(g),
 * written side by side into dgu [N, 2I] (the gradient of the fused gate/up product). */
static inline __attribute__((always_inline)) void swiglu_grad16(const float *g, const float *u, const float *d, float *dg,
                                                                 float *du) {
    const v16 x = LD(g), sg = sigmoidv(x), dd = LD(d), uu = LD(u); /* all read first: dgu may be gu itself */
    ST(du, dd * x * sg);
    ST(dg, dd * uu * sg * (1.0f + x * (1.0f - sg)));
}

void tilt_swiglu_backward(const float *gu, const float *dy, float *dgu, int64_t N, int64_t I) {
#pragma omp parallel for schedule(static) if (N * I >= 16384)
    for (int64_t n = 0; n < N; n++) {
        const float *g = gu + n * 2 * I, *u = g + I, *d = dy + n * I;
        float *dg = dgu + n * 2 * I, *du = dg + I;
        int64_t i = 0;
        const int ahead = n + ROWS_AHEAD < N;
        for (; i + 16 <= I; i += 16) {
            if (ahead) {
                __builtin_prefetch(g + ROWS_AHEAD * 2 * I + i, 0, 2), __builtin_prefetch(u + ROWS_AHEAD * 2 * I + i, 0, 2);
                __builtin_prefetch(d + ROWS_AHEAD * I + i, 0, 2);
                prefetch_write(dg + ROWS_AHEAD * 2 * I + i), prefetch_write(du + ROWS_AHEAD * 2 * I + i);
            }
            swiglu_grad16(g + i, u + i, d + i, dg + i, du + i);
        }
        if (i < I) { /* the last I % 16 through padded vectors */
            const size_t rest = sizeof(float) * (size_t)(I - i);
            float a[16] = {0}, b[16] = {0}, c[16] = {0}, e[16], f[16];
            memcpy(a, g + i, rest), memcpy(b, u + i, rest), memcpy(c, d + i, rest);
            swiglu_grad16(a, b, c, e, f);
            memcpy(dg + i, e, rest), memcpy(du + i, f, rest);
        }
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* RMS norm forward (Eq. 4 of arXiv:1910.07467): r = (mean_e x_e^2 + eps)^(-1/2) per row, y = x r w
 * (w may be NULL: no weight). x, y [N, H]; r [N] is kept for the backward. */
void tilt_rms_norm_forward(const float *x, const float *w, float *y, float *r, int64_t N, int64_t H, float eps) {
#pragma omp parallel for schedule(static) if (N * H >= 16384)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * H;
        float *yr = y + n * H;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t e = 0; e < H; e++) ss += xr[e] * xr[e];
        const float rn = 1.0f / sqrtf(ss / (float)H + eps);
        r[n] = rn;
        if (w) {
#pragma omp simd
            for (int64_t e = 0; e < H; e++) yr[e] = xr[e] * rn * w[e];
        } else {
#pragma omp simd
            for (int64_t e = 0; e < H; e++) yr[e] = xr[e] * rn;
        }
    }
}

/* RMS norm backward: with g = dy w (dy without a weight),
 *     dx = r g - x r^3 (g . x) / H,       dw = sum over rows of dy x r.
 * dx or dw may be NULL (not needed). dw: each thread sums a fixed block of rows into its own buffer
 * (double), and the buffers are added in thread order. */
void tilt_rms_norm_backward(const float *x, const float *w, const float *r, const float *dy, float *dx,
                            float *dw, int64_t N, int64_t H) {
    const int threads = (N * H >= 16384) ? omp_get_max_threads() : 1;
    /* dw's partial sums in double (thousands of rows: a float sum would drift by ~sqrt(N) ulps) */
    double *part = dw ? (double *)calloc((size_t)threads * (size_t)H, sizeof(double)) : NULL;
    if (dw && !part) { /* out of memory for a few KB: no dw rather than a wrong one */
        for (int64_t e = 0; e < H; e++) dw[e] = NAN;
        dw = NULL;
    }
#pragma omp parallel num_threads(threads)
    {
        const int id = omp_get_thread_num(), k = omp_get_num_threads();
        const int64_t lo = N * id / k, hi = N * (id + 1) / k;
        double *acc = part ? part + (int64_t)id * H : NULL;
        for (int64_t n = lo; n < hi; n++) {
            const float *xr = x + n * H, *d = dy + n * H;
            const float rn = r[n];
            if (dx) {
                float dot = 0.0f;
                if (w) {
#pragma omp simd reduction(+ : dot)
                    for (int64_t e = 0; e < H; e++) dot += d[e] * w[e] * xr[e];
                } else {
#pragma omp simd reduction(+ : dot)
                    for (int64_t e = 0; e < H; e++) dot += d[e] * xr[e];
                }
                const float c = rn * rn * rn * dot / (float)H;
                float *o = dx + n * H;
                if (w) {
#pragma omp simd
                    for (int64_t e = 0; e < H; e++) o[e] = rn * d[e] * w[e] - xr[e] * c;
                } else {
#pragma omp simd
                    for (int64_t e = 0; e < H; e++) o[e] = rn * d[e] - xr[e] * c;
                }
            }
            if (acc) {
#pragma omp simd
                for (int64_t e = 0; e < H; e++) acc[e] += (double)(d[e] * xr[e] * rn);
            }
        }
    }
    if (part) {
        for (int64_t e = 0; e < H; e++) {
            double t = 0.0;
            for (int i = 0; i < threads; i++) t += part[(int64_t)i * H + e];
            dw[e] = (float)t;
        }
        free(part);
    }
}
