/* The decode step's products (tilt/fastdecode.py, _lin): y = x W^T + b for a few dozen rows x and a weight W
 * packed once per generate call, float32.
 *
 * At 64 rows a decode product is small (a [64, 256] x [256, 768] product is 25 MFLOP, ~75 us) and every
 * token reads all the model's weights again: 42 MB at 10M parameters, 115 MB at 30M, more than this VM's
 * reads see at L3 speed (benchmarks/README.md, speed work 39). MKL's packed GEMM ran these products at
 * 220-240 GFLOP/s with the layers' weights cycled as in decoding, against ~330 with one product's weight
 * hot in cache. Here each thread takes whole panels of 32 output columns, computes all the rows' blocks
 * of 8 against one panel (so the panel is read from memory once and from L1/L2 after), and asks for its
 * next panel a row (two cache lines) at a time while it computes this one.
 *
 * Layout: the packed weight is [ceil(N / 32), K, 32]: panel p holds columns 32 p .. 32 p + 31 of W^T, k-major,
 * zero past N. x [M, K], y [M, N], b [N] or NULL; row-major and contiguous (the Python side checks). Each
 * output is sum_k x[m, k] W[n, k] summed in k order in one fused multiply-add chain per output (then + b):
 * the same products as F.linear, summed in another order than MKL's. Threads: OpenMP (the runtime torch
 * loaded).
 *
 * The gated MLP's gate/up product (tilt_linear_swiglu) packs W [2I, K] (gate rows, then up rows) in panels of
 * 16 gate columns and their 16 up columns, and writes silu(gate) * up (SwiGLU, Eq. 5 of arXiv:2002.05202)
 * from the accumulators: no [M, 2I] product is written and read back.
 */
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* the build uses -std=c11, where GCC does not contract a * b + c into one fused multiply-add */
#pragma GCC optimize("fp-contract=fast")
#endif

#include "vec16.h"

#define NR 32 /* output columns per panel (two vectors) */
#define MR 8  /* rows per block: 16 accumulators */

static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* wp = W [2I, K] packed into panels of 16 gate columns and the same 16 up columns, zero past I */
void tilt_pack_linear_swiglu(const float *w, float *wp, int64_t I, int64_t K) {
    const int64_t np = (I + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < np; p++)
        for (int64_t k = 0; k < K; k++) {
            float *dst = wp + (p * K + k) * NR;
            for (int64_t j = 0; j < 16; j++) {
                const int64_t n = p * 16 + j;
                dst[j] = n < I ? w[n * K + k] : 0.0f;
                dst[16 + j] = n < I ? w[(I + n) * K + k] : 0.0f;
            }
        }
}

/* wp = W [N, K] packed into panels of 32 columns (see the header) */
void tilt_pack_linear(const float *w, float *wp, int64_t N, int64_t K) {
    const int64_t np = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < np; p++)
        for (int64_t k = 0; k < K; k++) {
            float *dst = wp + (p * K + k) * NR;
            for (int64_t j = 0; j < NR; j++) {
                const int64_t n = p * NR + j;
                dst[j] = n < N ? w[n * K + k] : 0.0f;
            }
        }
}

/* rows x[0 .. R) (R <= MR) times one panel b [K, 32] into y (ldy apart; the first `cols` columns kept), plus
 * bias (32 floats, or NULL); with `swiglu`, the panel's 16 gate and 16 up outputs give 16 of silu(gate) * up.
 * pf (or NULL): the thread's next panel, whose row (at + k >> shift) (two lines) is asked for at every
 * iteration k that is a multiple of 2^shift: the first blocks of a panel share the next panel's rows. */
static inline __attribute__((always_inline)) void block(const float *x, const float *b, int64_t K, float *y,
                                                        int64_t ldy, int64_t cols, const float *bias, const int R,
                                                        const float *pf, int shift, int64_t at, const int swiglu) {
    v16 acc[MR][2];
    for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = splat(0.0f);
    for (int64_t k = 0; k < K; k++) {
        const v16 b0 = LD(b + k * NR), b1 = LD(b + k * NR + 16);
        if (pf && (k & ((1 << shift) - 1)) == 0) {
            const float *row = pf + (at + (k >> shift)) * NR;
            __builtin_prefetch(row, 0, 3);
            __builtin_prefetch(row + 16, 0, 3);
        }
        for (int i = 0; i < R; i++) {
            const v16 a = splat(x[i * K + k]);
            acc[i][0] += a * b0;
            acc[i][1] += a * b1;
        }
    }
    for (int i = 0; i < R; i++) {
        v16 c0 = acc[i][0], c1 = acc[i][1];
        if (bias) c0 += LD(bias), c1 += LD(bias + 16);
        if (swiglu) { /* the same expression as decode.c's tilt_silu_mul, on 16 lanes */
            const v16 g = c0 * sigmoidv(c0) * c1;
            if (cols == 16) {
                ST(y + i * ldy, g);
            } else {
                float t[16];
                ST(t, g);
                memcpy(y + i * ldy, t, sizeof(float) * (size_t)cols);
            }
        } else if (cols == NR) {
            ST(y + i * ldy, c0);
            ST(y + i * ldy + 16, c1);
        } else {
            float t[NR];
            ST(t, c0);
            ST(t + 16, c1);
            memcpy(y + i * ldy, t, sizeof(float) * (size_t)cols);
        }
    }
}

/* The products of every panel: y [M, N] = x [M, K] W^T (+ b), or with `swiglu` y [M, N] = SwiGLU of the gate/up
 * product (N = I; b NULL or [2 I]). The panels are shared out over the threads of the enclosing parallel region
 * (an orphaned `omp for`, whose end waits for all of them): tilt_linear's own region, or tilt_decode_layers'. */
static inline __attribute__((always_inline)) void panels(const float *x, const float *wp, const float *b, float *y,
                                                         int64_t M, int64_t N, int64_t K, const int swiglu) {
    const int64_t width = swiglu ? 16 : NR; /* output columns per panel */
    const int64_t np = (N + width - 1) / width, full = M / MR;
    /* the next panel's K rows spread over the first 2^shift blocks (up to 4: over the first half of a panel's eight
     * blocks at 64 rows, so the last rows are asked for four blocks before they are read, not one; `generate` at
     * 10M x 64 0.97-0.99 against spreading them over all eight, speed work 53) */
    const int shift = full >= 4 ? 2 : full >= 2 ? 1 : 0;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < np; p++) {
        const float *panel = wp + p * K * NR;
        const float *next = p + 1 < np ? panel + K * NR : NULL;
        const int64_t cols = N - p * width < width ? N - p * width : width;
        float bias[NR];
        if (b) {
            memset(bias, 0, sizeof bias);
            if (swiglu) {
                memcpy(bias, b + p * 16, sizeof(float) * (size_t)cols);
                memcpy(bias + 16, b + N + p * 16, sizeof(float) * (size_t)cols);
            } else {
                memcpy(bias, b + p * NR, sizeof(float) * (size_t)cols);
            }
        }
        const float *bp = b ? bias : NULL;
        float *yp = y + p * width;
        int64_t r = 0;
        for (; r + MR <= M; r += MR) {
            const int64_t blk = r / MR;
            block(x + r * K, panel, K, yp + r * N, N, cols, bp, MR, blk < (1 << shift) ? next : NULL, shift,
                  (blk * K) >> shift, swiglu);
        }
        switch (M - r) { /* the last rows, a block of fewer than 8 */
        case 1: block(x + r * K, panel, K, yp + r * N, N, cols, bp, 1, NULL, 0, 0, swiglu); break;
        case 2: block(x + r * K, panel, K, yp + r * N, N, cols, bp, 2, NULL, 0, 0, swiglu); break;
        case 3: block(x + r * K, panel, K, yp + r * N, N, cols, bp, 3, NULL, 0, 0, swiglu); break;
        case 4: block(x + r * K, panel, K, yp + r * N, N, cols, bp, 4, NULL, 0, 0, swiglu); break;
        case 5: block(x + r * K, panel, K, yp + r * N, N, cols, bp, 5, NULL, 0, 0, swiglu); break;
        case 6: block(x + r * K, panel, K, yp + r * N, N, cols, bp, 6, NULL, 0, 0, swiglu); break;
        case 7: block(x + r * K, panel, K, yp + r * N, N, cols, bp, 7, NULL, 0, 0, swiglu); break;
        default: break;
        }
    }
}

/* y [M, N] = x [M, K] W^T (+ b), W packed by tilt_pack_linear */
void tilt_linear(const float *x, const float *wp, const float *b, float *y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel
    panels(x, wp, b, y, M, N, K, 0);
}

/* y [M, I] = silu(x W_gate^T + b_gate) * (x W_up^T + b_up), W [2I, K] packed by tilt_pack_linear_swiglu, b [2I] or
 * NULL */
void tilt_linear_swiglu(const float *x, const float *wp, const float *b, float *y, int64_t M, int64_t I, int64_t K) {
#pragma omp parallel
    panels(x, wp, b, y, M, I, K, 1);
}

/* tilt_linear (swiglu 0) or tilt_linear_swiglu (1) by the threads of a parallel region already running (every
 * thread calls it; it returns when the whole product is written): for tilt_decode_layers. */
void tilt_linear_team(const float *x, const float *wp, const float *b, float *y, int64_t M, int64_t N, int64_t K,
                      int swiglu) {
    if (swiglu)
        panels(x, wp, b, y, M, N, K, 1);
    else
        panels(x, wp, b, y, M, N, K, 0);
}
