/* Teacher-forced attention of tilt's shared-prompt pass (tilt/fastforward.py, shared_completion_states),
 * forward and backward, float32.
 *
 * Each completion row b attends to the keys of its prompt u = pidx[b] (shared by the G rows of that
 * prompt and read in place: no per-row copy, no concatenation) and, causally, to its own completion
 * keys: query i (0 <= i < T) sees prompt key j where valid_p[u, j] and completion key j <= i where
 * valid_c[b, j]. That is the boolean mask the torch path builds for scaled_dot_product_attention, whose
 * flash kernel computes every masked score and, at T = 64, gets 45-60 GFLOP/s on this work
 * (benchmarks/README.md, "Fourteenth session"); here the scores past the causal limit are skipped and
 * the products are register-blocked.
 *
 * Forward (Eq. 1 of arXiv:1706.03762): o_i = sum_j p_ij v_j with p_ij = exp(scale q_i.k_j - lse_i),
 * lse_i = log sum_j exp(scale q_i.k_j) over the keys query i sees; lse is kept for the backward,
 * which recomputes p from it (Algorithm 2 of FlashAttention-2, arXiv:2307.08691):
 *     D_i = do_i . o_i,   ds_ij = p_ij (do_i . v_j - D_i),
 *     dq_i = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i,   dv_j = sum_i p_ij do_i.
 * A query that sees no key gets o = 0, lse = -inf and no gradient.
 *
 * Layouts. q and the key/value views are read through strides (the last dimension contiguous), so
 * the pass hands over its projections as they are: st[0..2] are q's strides for (row, head, position),
 * st[3..5] the prompt keys' (prompt, head, position), st[6..8] the prompt values', st[9..11] the
 * completion keys' (row, head, position), st[12..14] the completion values'. o and dout are
 * [B, T, nq, d] contiguous (what the output projection reads), lse [B, nq, T]. The backward writes
 * through strides too (so the caller can hand it slices of one gradient buffer): ost[0..2] are dq's
 * strides for (row, head, position), ost[3..5] those of the per-row prompt part of dk (dkp: the
 * caller sums it over each prompt's rows), ost[6..8] the completion part of dk (dkc), ost[9..11] and
 * ost[12..14] the same for dv (dvp, dvc); the last dimension contiguous everywhere.
 * Grouped-query attention: query head h reads key head h / (nq / nkv). One task per (row, key head),
 * threads by OpenMP (the runtime torch loaded). Head size a multiple of 16 (the caller checks). Both
 * return the number of tasks left undone for want of memory (0: all done).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
/* the build uses -std=c11, where GCC does not contract a * b + c into one fused multiply-add */
#pragma GCC optimize("fp-contract=fast")
#endif

/* Ask for `count` rows of D floats, `stride` floats apart, to be brought into cache: the rows a block reads
 * (a query, key or output row per position) lie a projection's width apart, in different pages every row
 * or two, where the hardware prefetcher does not follow; issued a block ahead of use. */
static inline void prefetch_rows(const float *x, int64_t stride, int64_t count, int64_t D) {
    for (int64_t r = 0; r < count; r++)
        for (int64_t e = 0; e < D; e += 16) __builtin_prefetch(x + r * stride + e, 0, 3);
}

/* 16 floats as one vector (GCC/clang vector extension: AVX-512 where the host has it, else split) */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
#define LD(p) (*(const v16u *)(p))
#define ST(p, x) (*(v16u *)(p) = (x))
#define RB 8 /* query rows per block */

static inline int64_t up32(int64_t n) { return (n + 31) & ~(int64_t)31; }
static inline int64_t up16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* s[r * ld + j] = x_r . kt[:, j] for the block's RB = 8 rows x_r (D floats each, consecutive) and j < lim (a
 * multiple of 16): kt is [D, ld] (keys transposed). Eight rows by 32 keys in sixteen accumulators (each key
 * vector loaded once for the eight rows), then by 16. */
static inline void scores8(const float *x, const float *kt, int64_t ld, int64_t lim, float *s, const int64_t D) {
    int64_t j0 = 0;
    for (; j0 + 32 <= lim; j0 += 32) {
        v16 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
        v16 a4 = {0}, b4 = {0}, a5 = {0}, b5 = {0}, a6 = {0}, b6 = {0}, a7 = {0}, b7 = {0};
        const float *k = kt + j0;
        for (int64_t c = 0; c < D; c++, k += ld) {
            const v16 ka = LD(k), kb = LD(k + 16);
            float z = x[c];
            a0 += z * ka, b0 += z * kb;
            z = x[D + c], a1 += z * ka, b1 += z * kb;
            z = x[2 * D + c], a2 += z * ka, b2 += z * kb;
            z = x[3 * D + c], a3 += z * ka, b3 += z * kb;
            z = x[4 * D + c], a4 += z * ka, b4 += z * kb;
            z = x[5 * D + c], a5 += z * ka, b5 += z * kb;
            z = x[6 * D + c], a6 += z * ka, b6 += z * kb;
            z = x[7 * D + c], a7 += z * ka, b7 += z * kb;
        }
        ST(s + j0, a0), ST(s + j0 + 16, b0);
        ST(s + ld + j0, a1), ST(s + ld + j0 + 16, b1);
        ST(s + 2 * ld + j0, a2), ST(s + 2 * ld + j0 + 16, b2);
        ST(s + 3 * ld + j0, a3), ST(s + 3 * ld + j0 + 16, b3);
        ST(s + 4 * ld + j0, a4), ST(s + 4 * ld + j0 + 16, b4);
        ST(s + 5 * ld + j0, a5), ST(s + 5 * ld + j0 + 16, b5);
        ST(s + 6 * ld + j0, a6), ST(s + 6 * ld + j0 + 16, b6);
        ST(s + 7 * ld + j0, a7), ST(s + 7 * ld + j0 + 16, b7);
    }
    if (j0 < lim) {
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        const float *k = kt + j0;
        for (int64_t c = 0; c < D; c++, k += ld) {
            const v16 ka = LD(k);
            a0 += x[c] * ka, a1 += x[D + c] * ka, a2 += x[2 * D + c] * ka, a3 += x[3 * D + c] * ka;
            a4 += x[4 * D + c] * ka, a5 += x[5 * D + c] * ka, a6 += x[6 * D + c] * ka, a7 += x[7 * D + c] * ka;
        }
        ST(s + j0, a0), ST(s + ld + j0, a1), ST(s + 2 * ld + j0, a2), ST(s + 3 * ld + j0, a3);
        ST(s + 4 * ld + j0, a4), ST(s + 5 * ld + j0, a5), ST(s + 6 * ld + j0, a6), ST(s + 7 * ld + j0, a7);
    }
}

/* out_r = sum_{j < lim} w[r * ld + j] rows_j for the block's RB = 8 rows (rows_j: D floats at rows + j D):
 * 32 columns at a time in sixteen accumulators (each weight broadcast once for two column vectors), then 16. */
static inline void wsum(const float *w, int64_t ld, const float *rows, int64_t lim, float *out, const int64_t D) {
    int64_t e = 0;
    for (; e + 32 <= D; e += 32) {
        v16 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
        v16 a4 = {0}, b4 = {0}, a5 = {0}, b5 = {0}, a6 = {0}, b6 = {0}, a7 = {0}, b7 = {0};
        for (int64_t j = 0; j < lim; j++) {
            const v16 ra = LD(rows + j * D + e), rb = LD(rows + j * D + e + 16);
            float z = w[j];
            a0 += z * ra, b0 += z * rb;
            z = w[ld + j], a1 += z * ra, b1 += z * rb;
            z = w[2 * ld + j], a2 += z * ra, b2 += z * rb;
            z = w[3 * ld + j], a3 += z * ra, b3 += z * rb;
            z = w[4 * ld + j], a4 += z * ra, b4 += z * rb;
            z = w[5 * ld + j], a5 += z * ra, b5 += z * rb;
            z = w[6 * ld + j], a6 += z * ra, b6 += z * rb;
            z = w[7 * ld + j], a7 += z * ra, b7 += z * rb;
        }
        ST(out + e, a0), ST(out + e + 16, b0), ST(out + D + e, a1), ST(out + D + e + 16, b1);
        ST(out + 2 * D + e, a2), ST(out + 2 * D + e + 16, b2), ST(out + 3 * D + e, a3), ST(out + 3 * D + e + 16, b3);
        ST(out + 4 * D + e, a4), ST(out + 4 * D + e + 16, b4), ST(out + 5 * D + e, a5), ST(out + 5 * D + e + 16, b5);
        ST(out + 6 * D + e, a6), ST(out + 6 * D + e + 16, b6), ST(out + 7 * D + e, a7), ST(out + 7 * D + e + 16, b7);
    }
    for (; e < D; e += 16) {
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        for (int64_t j = 0; j < lim; j++) {
            const v16 r = LD(rows + j * D + e);
            a0 += w[j] * r, a1 += w[ld + j] * r, a2 += w[2 * ld + j] * r, a3 += w[3 * ld + j] * r;
            a4 += w[4 * ld + j] * r, a5 += w[5 * ld + j] * r, a6 += w[6 * ld + j] * r, a7 += w[7 * ld + j] * r;
        }
        ST(out + e, a0), ST(out + D + e, a1), ST(out + 2 * D + e, a2), ST(out + 3 * D + e, a3);
        ST(out + 4 * D + e, a4), ST(out + 5 * D + e, a5), ST(out + 6 * D + e, a6), ST(out + 7 * D + e, a7);
    }
}

/* acc_j += sum_r w[r * ld + j] x_r for j < lim (acc_j: D floats at acc + j D; x_r: the block's RB = 8 rows),
 * 32 columns at a time (the block's rows held in sixteen registers, each weight broadcast once for both
 * vectors, two chains of four products per vector so the fused adds overlap), then 16. */
static inline void wsum_t(const float *w, int64_t ld, const float *x, int64_t lim, float *acc, const int64_t D) {
    int64_t e = 0;
    for (; e + 32 <= D; e += 32) {
        const v16 x0 = LD(x + e), x1 = LD(x + D + e), x2 = LD(x + 2 * D + e), x3 = LD(x + 3 * D + e);
        const v16 x4 = LD(x + 4 * D + e), x5 = LD(x + 5 * D + e), x6 = LD(x + 6 * D + e), x7 = LD(x + 7 * D + e);
        const v16 y0 = LD(x + e + 16), y1 = LD(x + D + e + 16), y2 = LD(x + 2 * D + e + 16), y3 = LD(x + 3 * D + e + 16);
        const v16 y4 = LD(x + 4 * D + e + 16), y5 = LD(x + 5 * D + e + 16), y6 = LD(x + 6 * D + e + 16),
                  y7 = LD(x + 7 * D + e + 16);
        for (int64_t j = 0; j < lim; j++) {
            const float w0 = w[j], w1 = w[ld + j], w2 = w[2 * ld + j], w3 = w[3 * ld + j];
            const float w4 = w[4 * ld + j], w5 = w[5 * ld + j], w6 = w[6 * ld + j], w7 = w[7 * ld + j];
            v16 a = LD(acc + j * D + e), b = LD(acc + j * D + e + 16), c = w4 * x4, f = w4 * y4;
            a += w0 * x0, b += w0 * y0, c += w5 * x5, f += w5 * y5;
            a += w1 * x1, b += w1 * y1, c += w6 * x6, f += w6 * y6;
            a += w2 * x2, b += w2 * y2, c += w7 * x7, f += w7 * y7;
            a += w3 * x3, b += w3 * y3;
            ST(acc + j * D + e, a + c), ST(acc + j * D + e + 16, b + f);
        }
    }
    for (; e < D; e += 16) {
        const v16 x0 = LD(x + e), x1 = LD(x + D + e), x2 = LD(x + 2 * D + e), x3 = LD(x + 3 * D + e);
        const v16 x4 = LD(x + 4 * D + e), x5 = LD(x + 5 * D + e), x6 = LD(x + 6 * D + e), x7 = LD(x + 7 * D + e);
        for (int64_t j = 0; j < lim; j++) {
            v16 a = LD(acc + j * D + e), c = w[4 * ld + j] * x4;
            a += w[j] * x0, c += w[5 * ld + j] * x5, a += w[ld + j] * x1, c += w[6 * ld + j] * x6;
            a += w[2 * ld + j] * x2, c += w[7 * ld + j] * x7, a += w[3 * ld + j] * x3;
            ST(acc + j * D + e, a + c);
        }
    }
}

/* Key (or value) j of row b, key head g: the prompt's P (prompt u), then the row's own T. */
static inline const float *key_row(const float *p, const int64_t *sp, int64_t u, const float *c, const int64_t *sc,
                                   int64_t b, int64_t g, int64_t P, int64_t j) {
    return j < P ? p + u * sp[0] + g * sp[1] + j * sp[2] : c + b * sc[0] + g * sc[1] + (j - P) * sc[2];
}

/* The S = P + T keys (or values) as rows [ld, D], zero past S. */
static void gather_rows(const float *p, const int64_t *sp, int64_t u, const float *c, const int64_t *sc, int64_t b,
                        int64_t g, int64_t P, int64_t T, int64_t ld, float *rows, const int64_t D) {
    for (int64_t j = 0; j < P + T; j++) {
        if (j + 8 < P + T) prefetch_rows(key_row(p, sp, u, c, sc, b, g, P, j + 8), 0, 1, D);
        memcpy(rows + j * D, key_row(p, sp, u, c, sc, b, g, P, j), sizeof(float) * D);
    }
    memset(rows + (P + T) * D, 0, sizeof(float) * (size_t)((ld - P - T) * D));
}

/* The same transposed, [D, ld], zero past S. */
static void gather_cols(const float *p, const int64_t *sp, int64_t u, const float *c, const int64_t *sc, int64_t b,
                        int64_t g, int64_t P, int64_t T, int64_t ld, float *cols, const int64_t D) {
    for (int64_t j = 0; j < P + T; j++) {
        if (j + 8 < P + T) prefetch_rows(key_row(p, sp, u, c, sc, b, g, P, j + 8), 0, 1, D);
        const float *src = key_row(p, sp, u, c, sc, b, g, P, j);
        for (int64_t e = 0; e < D; e++) cols[e * ld + j] = src[e];
    }
    for (int64_t e = 0; e < D; e++)
        for (int64_t j = P + T; j < ld; j++) cols[e * ld + j] = 0.0f;
}

/* 1 where the rows' queries may see key j at all (prompt validity, then completion validity), else 0; [ld]. */
static void key_valid(const uint8_t *valid_p, const uint8_t *valid_c, int64_t u, int64_t b, int64_t P, int64_t T,
                      int64_t ld, float *kf) {
    for (int64_t j = 0; j < ld; j++)
        kf[j] = (j < P ? valid_p[u * P + j] : (j < P + T ? valid_c[b * T + j - P] : 0)) ? 1.0f : 0.0f;
}

/* A block's rows i0.. (count of them, the rest zero) of head h: [RB, D] contiguous. */
static void load_rows(const float *x, int64_t sb, int64_t sh, int64_t si, int64_t b, int64_t h, int64_t i0,
                      int64_t count, float *out, const int64_t D) {
    for (int64_t r = 0; r < count; r++) memcpy(out + r * D, x + b * sb + h * sh + (i0 + r) * si, sizeof(float) * D);
    memset(out + count * D, 0, sizeof(float) * (size_t)((RB - count) * D));
}

static inline __attribute__((always_inline)) void forward_task(
    const float *q, const float *kp, const float *vp, const float *kc, const float *vc, const int64_t *st,
    const int64_t *pidx, const uint8_t *valid_p, const uint8_t *valid_c, float *o, float *lse, int64_t b,
    int64_t g, int64_t nq, int64_t nkv, int64_t T, int64_t P, float scale, float *buf, const int64_t D) {
    const int64_t ld = up32(P + T), rep = nq / nkv, u = pidx[b];
    float *kt = buf, *vr = kt + D * ld, *s = vr + ld * D, *x = s + RB * ld, *out = x + RB * D, *kf = out + RB * D;
    gather_cols(kp, st + 3, u, kc, st + 9, b, g, P, T, ld, kt, D);
    gather_rows(vp, st + 6, u, vc, st + 12, b, g, P, T, ld, vr, D);
    key_valid(valid_p, valid_c, u, b, P, T, ld, kf);
    float inv[RB];
    for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
        for (int64_t i0 = 0; i0 < T; i0 += RB) {
            const int64_t count = T - i0 < RB ? T - i0 : RB, lim = P + i0 + count, lim16 = up16(lim);
            load_rows(q, st[0], st[1], st[2], b, h, i0, count, x, D);
            if (i0 + RB < T) prefetch_rows(q + b * st[0] + h * st[1] + (i0 + RB) * st[2], st[2], T - i0 - RB < RB ? T - i0 - RB : RB, D);
            scores8(x, kt, ld, lim16, s, D);
            for (int64_t r = 0; r < RB; r++) {
                float *sr = s + r * ld;
                int64_t see = r < count ? P + i0 + r + 1 : 0; /* keys 0..see-1: within the causal limit */
                float m = -INFINITY, total = 0.0f;
                /* whole vectors up to lim16, the causal limit and the padding as a select */
#pragma omp simd reduction(max : m)
                for (int64_t j = 0; j < lim16; j++) {
                    const float z = sr[j] * scale, zm = (j < see && kf[j] > 0.0f) ? z : -INFINITY;
                    sr[j] = z;
                    m = zm > m ? zm : m;
                }
                if (m == -INFINITY) see = 0; /* no key to see: o = 0, lse = -inf */
#pragma omp simd reduction(+ : total)
                for (int64_t j = 0; j < lim16; j++) { /* a masked key's weight is exactly 0 */
                    const float e = j < see ? kf[j] * fast_expf(sr[j] - m) : 0.0f;
                    sr[j] = e;
                    total += e;
                }
                inv[r] = see ? 1.0f / total : 0.0f;
                if (r < count && lse) lse[(b * nq + h) * T + i0 + r] = see ? m + logf(total) : -INFINITY;
            }
            wsum(s, ld, vr, lim, out, D); /* sum_j e_ij v_j, then divided by the row's total */
            for (int64_t r = 0; r < count; r++) {
                float *dst = o + ((b * T + i0 + r) * nq + h) * D;
                for (int64_t e = 0; e < D; e++) dst[e] = out[r * D + e] * inv[r];
            }
        }
    }
}

static inline __attribute__((always_inline)) void backward_task(
    const float *q, const float *kp, const float *vp, const float *kc, const float *vc, const int64_t *st,
    const int64_t *pidx, const uint8_t *valid_p, const uint8_t *valid_c, const float *o, const float *lse,
    const float *dout, float *dq, float *dkp, float *dkc, float *dvp, float *dvc, const int64_t *ost, int64_t b,
    int64_t g, int64_t nq, int64_t nkv, int64_t T, int64_t P, float scale, float *buf, const int64_t D) {
    const int64_t S = P + T, ld = up32(S), rep = nq / nkv, u = pidx[b];
    float *kt = buf, *vt = kt + D * ld, *kr = vt + D * ld, *dka = kr + ld * D, *dva = dka + ld * D;
    float *p = dva + ld * D, *ds = p + RB * ld, *x = ds + RB * ld, *dx = x + RB * D, *ox = dx + RB * D;
    float *kf = ox + RB * D;
    gather_cols(kp, st + 3, u, kc, st + 9, b, g, P, T, ld, kt, D);
    gather_rows(kp, st + 3, u, kc, st + 9, b, g, P, T, ld, kr, D);
    gather_cols(vp, st + 6, u, vc, st + 12, b, g, P, T, ld, vt, D);
    key_valid(valid_p, valid_c, u, b, P, T, ld, kf);
    memset(dka, 0, sizeof(float) * (size_t)(2 * ld * D));
    float rowd[RB], rowl[RB];
    for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
        for (int64_t i0 = 0; i0 < T; i0 += RB) {
            const int64_t count = T - i0 < RB ? T - i0 : RB, lim = P + i0 + count, lim16 = up16(lim);
            load_rows(q, st[0], st[1], st[2], b, h, i0, count, x, D);
            load_rows(dout, T * nq * D, D, nq * D, b, h, i0, count, dx, D);
            load_rows(o, T * nq * D, D, nq * D, b, h, i0, count, ox, D);
            if (i0 + RB < T) {
                const int64_t next = T - i0 - RB < RB ? T - i0 - RB : RB, at = (b * T + i0 + RB) * nq + h;
                prefetch_rows(q + b * st[0] + h * st[1] + (i0 + RB) * st[2], st[2], next, D);
                prefetch_rows(dout + at * D, nq * D, next, D);
                prefetch_rows(o + at * D, nq * D, next, D);
            }
            for (int64_t r = 0; r < RB; r++) {
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t e = 0; e < D; e++) acc += dx[r * D + e] * ox[r * D + e];
                rowd[r] = acc;
                rowl[r] = r < count ? lse[(b * nq + h) * T + i0 + r] : -INFINITY;
            }
            scores8(x, kt, ld, lim16, p, D);
            scores8(dx, vt, ld, lim16, ds, D);
            for (int64_t r = 0; r < RB; r++) {
                float *pr = p + r * ld, *dr = ds + r * ld;
                const int64_t see = (r < count && rowl[r] != -INFINITY) ? P + i0 + r + 1 : 0;
                const float l = rowl[r], dd = rowd[r];
#pragma omp simd
                for (int64_t j = 0; j < lim16; j++) {
                    const float e = j < see ? kf[j] * fast_expf(pr[j] * scale - l) : 0.0f;
                    pr[j] = e;
                    dr[j] = e * (dr[j] - dd) * scale;
                }
            }
            wsum(ds, ld, kr, lim, ox, D); /* dq rows (ox is free now) */
            for (int64_t r = 0; r < count; r++)
                memcpy(dq + b * ost[0] + h * ost[1] + (i0 + r) * ost[2], ox + r * D, sizeof(float) * D);
            wsum_t(ds, ld, x, lim, dka, D);
            wsum_t(p, ld, dx, lim, dva, D);
        }
    }
    for (int64_t j = 0; j < S; j++) { /* key j's gradients: the prompt's part, then the completion's */
        float *k = j < P ? dkp + b * ost[3] + g * ost[4] + j * ost[5] : dkc + b * ost[6] + g * ost[7] + (j - P) * ost[8];
        float *v = j < P ? dvp + b * ost[9] + g * ost[10] + j * ost[11] : dvc + b * ost[12] + g * ost[13] + (j - P) * ost[14];
        memcpy(k, dka + j * D, sizeof(float) * D);
        memcpy(v, dva + j * D, sizeof(float) * D);
    }
}

/* Everything a task reads and writes (the backward's inputs o and lse are the forward's outputs). */
struct tf_args {
    const float *q, *kp, *vp, *kc, *vc, *dout;
    const int64_t *st, *pidx, *ost;
    const uint8_t *valid_p, *valid_c;
    float *o, *lse, *dq, *dkp, *dkc, *dvp, *dvc;
    int64_t B, nq, nkv, T, P, d;
    float scale;
};

static void forward_any(const struct tf_args *a, int64_t b, int64_t g, float *buf) {
#define TF_FORWARD(D) forward_task(a->q, a->kp, a->vp, a->kc, a->vc, a->st, a->pidx, a->valid_p, a->valid_c, a->o, \
                                   a->lse, b, g, a->nq, a->nkv, a->T, a->P, a->scale, buf, D)
    switch (a->d) { /* fixed head sizes get loops of fixed length */
    case 32: TF_FORWARD(32); break;
    case 64: TF_FORWARD(64); break;
    default: TF_FORWARD(a->d);
    }
#undef TF_FORWARD
}

static void backward_any(const struct tf_args *a, int64_t b, int64_t g, float *buf) {
#define TF_BACKWARD(D) backward_task(a->q, a->kp, a->vp, a->kc, a->vc, a->st, a->pidx, a->valid_p, a->valid_c, a->o, \
                                     a->lse, a->dout, a->dq, a->dkp, a->dkc, a->dvp, a->dvc, a->ost, b, g, a->nq, \
                                     a->nkv, a->T, a->P, a->scale, buf, D)
    switch (a->d) {
    case 32: TF_BACKWARD(32); break;
    case 64: TF_BACKWARD(64); break;
    default: TF_BACKWARD(a->d);
    }
#undef TF_BACKWARD
}

/* One task per (row, key head) over the threads, each thread with its own scratch of `floats`. Returns the
 * number of tasks left undone for want of memory. */
static int run_tasks(const struct tf_args *a, int backward) {
    const int64_t ld = up32(a->P + a->T), d = a->d;
    const size_t floats = backward ? (size_t)(5 * d * ld + 2 * RB * ld + 3 * RB * d + ld)
                                   : (size_t)(2 * d * ld + RB * ld + 2 * RB * d + ld);
    int bad = 0;
#pragma omp parallel reduction(+ : bad)
    {
        float *buf = malloc(sizeof(float) * floats);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < a->B * a->nkv; task++) {
            if (!buf) {
                bad++;
                continue;
            }
            (backward ? backward_any : forward_any)(a, task / a->nkv, task % a->nkv, buf);
        }
        free(buf);
    }
    return bad;
}

int tilt_tf_attention_forward(const float *q, const float *kp, const float *vp, const float *kc, const float *vc,
                              const int64_t *st, const int64_t *pidx, const uint8_t *valid_p, const uint8_t *valid_c,
                              float *o, float *lse, int64_t B, int64_t nq, int64_t nkv, int64_t T, int64_t P,
                              int64_t d, float scale) {
    const struct tf_args a = {q, kp, vp, kc, vc, NULL, st, pidx, NULL, valid_p, valid_c, o, lse, NULL, NULL, NULL,
                              NULL, NULL, B, nq, nkv, T, P, d, scale};
    return run_tasks(&a, 0);
}

int tilt_tf_attention_backward(const float *q, const float *kp, const float *vp, const float *kc, const float *vc,
                               const int64_t *st, const int64_t *pidx, const uint8_t *valid_p, const uint8_t *valid_c,
                               const float *o, const float *lse, const float *dout, float *dq, float *dkp,
                               float *dkc, float *dvp, float *dvc, const int64_t *ost, int64_t B, int64_t nq,
                               int64_t nkv, int64_t T, int64_t P, int64_t d, float scale) {
    const struct tf_args a = {q, kp, vp, kc, vc, dout, st, pidx, ost, valid_p, valid_c, (float *)o, (float *)lse, dq,
                              dkp, dkc, dvp, dvc, B, nq, nkv, T, P, d, scale};
    return run_tasks(&a, 1);
}
