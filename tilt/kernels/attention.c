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
 * Rotary embedding (Eq. 34 of arXiv:2104.09864, pairs adjacent, in complex form): with rot (row b's position i at
 * rot + (b T + i) d, d / 2 (cos, sin) pairs), q and the completion keys are read unrotated and multiplied by
 * their position's e^{ia} as they are gathered (the prompt keys come rotated), and the backward writes dq and
 * the completion part of dk for the unrotated inputs (times e^{-ia}); rot NULL: everything is taken as given.
 * Grouped-query attention: query head h reads key head h / (nq / nkv). One task per (row, key head),
 * threads by OpenMP (the runtime torch loaded). Head size a multiple of 16 (the caller checks). Both
 * return the number of tasks left undone for want of memory (0: all done).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* the build uses -std=c11, where GCC does not contract a * b + c into one fused multiply-add */
#pragma GCC optimize("fp-contract=fast")
#endif

#include "vec16.h"

/* Ask for a row of D floats to be brought into cache: the rows the gathers read (a query, key or output row
 * per position) lie a projection's width apart, in different pages every row or two, where the hardware
 * prefetcher does not follow; each gather asks for its rows a few ahead of use. */
static inline void prefetch_row(const float *x, int64_t D) {
    for (int64_t e = 0; e < D; e += 16) __builtin_prefetch(x + e, 0, 3);
}

#define RB 8 /* query rows per block */
#define CQ 128 /* query rows per chunk of the backward (a multiple of RB) */

/* 16 rows of 16 floats transposed in registers: r[c] becomes column c (four rounds of two-input shuffles) */
static inline void transpose16(v16 *r) {
    v16 t[16], u[16];
    for (int k = 0; k < 8; k++) { /* pairs of rows interleaved by element */
        t[2 * k] = SHUF(r[2 * k], r[2 * k + 1], LO1);
        t[2 * k + 1] = SHUF(r[2 * k], r[2 * k + 1], HI1);
    }
    for (int g = 0; g < 4; g++) { /* u[4 g + c], 128-bit lane L: column 4 L + c of rows 4 g .. 4 g + 3 */
        u[4 * g] = SHUF(t[4 * g], t[4 * g + 2], LO2);
        u[4 * g + 1] = SHUF(t[4 * g], t[4 * g + 2], HI2);
        u[4 * g + 2] = SHUF(t[4 * g + 1], t[4 * g + 3], LO2);
        u[4 * g + 3] = SHUF(t[4 * g + 1], t[4 * g + 3], HI2);
    }
    for (int c = 0; c < 4; c++) { /* the 4 x 4 lanes of u[c], u[4 + c], u[8 + c], u[12 + c] transposed */
        const v16 a = SHUF(u[c], u[4 + c], LANES(0, 4, 2, 6)), b = SHUF(u[c], u[4 + c], LANES(1, 5, 3, 7));
        const v16 e = SHUF(u[8 + c], u[12 + c], LANES(0, 4, 2, 6)), f = SHUF(u[8 + c], u[12 + c], LANES(1, 5, 3, 7));
        r[c] = SHUF(a, e, LANES(0, 1, 4, 5)), r[8 + c] = SHUF(a, e, LANES(2, 3, 6, 7));
        r[4 + c] = SHUF(b, f, LANES(0, 1, 4, 5)), r[12 + c] = SHUF(b, f, LANES(2, 3, 6, 7));
    }
}

/* x e^{i a} (conj: x e^{-i a}) for 8 complex numbers in adjacent (re, im) pairs, e^{i a} as the 8 pairs of c */
static inline v16 rotate(v16 x, v16 c, const int conj) {
    const v16 sign = {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1};
    const v16 cre = SHUF(c, c, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
    const v16 cim = SHUF(c, c, 1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
    const v16 t = SHUF(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14) * cim * sign;
    return conj ? x * cre - t : x * cre + t;
}

/* dst = src e^{i a} (conj: e^{-i a}), D floats, e^{i a} as D / 2 pairs at c */
static inline void rotate_row(float *dst, const float *src, const float *c, const int conj, const int64_t D) {
    for (int64_t e = 0; e < D; e += 16) ST(dst + e, rotate(LD(src + e), LD(c + e), conj));
}

static inline int64_t up32(int64_t n) { return (n + 31) & ~(int64_t)31; }
static inline int64_t up16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* What a score tile does with its products before storing them (the softmax's elementwise part, fused):
 * SC_LOGIT: z = scale s + mask, -inf past row r's causal limit see[r] or at a padding key (mask = -inf there);
 *           stored, and its running maximum kept in mv[r] (the forward);
 * SC_PROB:  p = exp(scale s + mask - l[r]), 0 where not seen (the backward's probabilities, from the forward's lse);
 * SC_DPROB: ds = p (s - dd[r]) scale with p read back from `p` (the backward's score gradient). */
enum { SC_LOGIT, SC_PROB, SC_DPROB };
struct epilogue {
    float scale, see[RB], l[RB], dd[RB];
    const float *mask, *p;
    v16 mv[RB];
};

static inline __attribute__((always_inline)) void tile_out(struct epilogue *ep, const int mode, const int r, int64_t j,
                                                          v16 acc, float *s, int64_t ld) {
    float *dst = s + r * ld + j;
    if (mode == SC_DPROB) {
        ST(dst, LD(ep->p + r * ld + j) * (acc - ep->dd[r]) * ep->scale);
        return;
    }
    v16 z = acc * ep->scale + LD(ep->mask + j);
    if ((float)j + 16.0f > ep->see[r]) z = sel(IOTA + (float)j < ep->see[r], z, IOTA * 0.0f - INFINITY);
    if (mode == SC_LOGIT) {
        ST(dst, z);
        ep->mv[r] = vmax2(z, ep->mv[r]);
    } else {
        ST(dst, (v16)((v16i)expv(z - ep->l[r]) & (z > -INFINITY)));
    }
}

/* s[r * ld + j] = the epilogue of x_r . k_j for the block's RB = 8 rows x_r (D floats each, consecutive) and
 * j < lim (a multiple of 16): kt holds the keys transposed in panels of 32, [ld / 32, D, 32] (gather_cols), so a
 * panel is read in order. Eight rows by 32 keys in sixteen accumulators (each key vector loaded once for the
 * eight rows), then by 16. */
static inline __attribute__((always_inline)) void scores8(const float *x, const float *kt, int64_t ld, int64_t lim,
                                                         float *s, const int64_t D, struct epilogue *ep,
                                                         const int mode) {
    int64_t j0 = 0;
    for (; j0 + 32 <= lim; j0 += 32) {
        v16 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
        v16 a4 = {0}, b4 = {0}, a5 = {0}, b5 = {0}, a6 = {0}, b6 = {0}, a7 = {0}, b7 = {0};
        const float *k = kt + j0 * D;
        for (int64_t c = 0; c < D; c++, k += 32) {
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
        tile_out(ep, mode, 0, j0, a0, s, ld), tile_out(ep, mode, 0, j0 + 16, b0, s, ld);
        tile_out(ep, mode, 1, j0, a1, s, ld), tile_out(ep, mode, 1, j0 + 16, b1, s, ld);
        tile_out(ep, mode, 2, j0, a2, s, ld), tile_out(ep, mode, 2, j0 + 16, b2, s, ld);
        tile_out(ep, mode, 3, j0, a3, s, ld), tile_out(ep, mode, 3, j0 + 16, b3, s, ld);
        tile_out(ep, mode, 4, j0, a4, s, ld), tile_out(ep, mode, 4, j0 + 16, b4, s, ld);
        tile_out(ep, mode, 5, j0, a5, s, ld), tile_out(ep, mode, 5, j0 + 16, b5, s, ld);
        tile_out(ep, mode, 6, j0, a6, s, ld), tile_out(ep, mode, 6, j0 + 16, b6, s, ld);
        tile_out(ep, mode, 7, j0, a7, s, ld), tile_out(ep, mode, 7, j0 + 16, b7, s, ld);
    }
    if (j0 < lim) {
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        const float *k = kt + j0 * D;
        for (int64_t c = 0; c < D; c++, k += 32) {
            const v16 ka = LD(k);
            a0 += x[c] * ka, a1 += x[D + c] * ka, a2 += x[2 * D + c] * ka, a3 += x[3 * D + c] * ka;
            a4 += x[4 * D + c] * ka, a5 += x[5 * D + c] * ka, a6 += x[6 * D + c] * ka, a7 += x[7 * D + c] * ka;
        }
        tile_out(ep, mode, 0, j0, a0, s, ld), tile_out(ep, mode, 1, j0, a1, s, ld);
        tile_out(ep, mode, 2, j0, a2, s, ld), tile_out(ep, mode, 3, j0, a3, s, ld);
        tile_out(ep, mode, 4, j0, a4, s, ld), tile_out(ep, mode, 5, j0, a5, s, ld);
        tile_out(ep, mode, 6, j0, a6, s, ld), tile_out(ep, mode, 7, j0, a7, s, ld);
    }
}

/* out_r (+)= sum_{j < lim} w[r * wr + j * wj] rows_j for RB = 8 outputs r (rows_j: D floats at rows + j D; out_r:
 * D floats at out + r D; add: accumulate into out instead of overwriting it), 32 columns at a time in sixteen
 * accumulators (each weight broadcast once for two column vectors), then 16. The forward's and dq's weighted
 * sums run it over a block's eight query rows (wr = ld, wj = 1); dk's and dv's over eight keys (wr = 1, wj = ld),
 * so their accumulators stay in registers over the queries. */
static inline __attribute__((always_inline)) void wsum(const float *w, int64_t wr, int64_t wj, const float *rows,
                                                       int64_t lim, float *out, const int64_t D, const int add) {
    int64_t e = 0;
    for (; e + 32 <= D; e += 32) {
        v16 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
        v16 a4 = {0}, b4 = {0}, a5 = {0}, b5 = {0}, a6 = {0}, b6 = {0}, a7 = {0}, b7 = {0};
        if (add) {
            a0 = LD(out + e), b0 = LD(out + e + 16), a1 = LD(out + D + e), b1 = LD(out + D + e + 16);
            a2 = LD(out + 2 * D + e), b2 = LD(out + 2 * D + e + 16), a3 = LD(out + 3 * D + e), b3 = LD(out + 3 * D + e + 16);
            a4 = LD(out + 4 * D + e), b4 = LD(out + 4 * D + e + 16), a5 = LD(out + 5 * D + e), b5 = LD(out + 5 * D + e + 16);
            a6 = LD(out + 6 * D + e), b6 = LD(out + 6 * D + e + 16), a7 = LD(out + 7 * D + e), b7 = LD(out + 7 * D + e + 16);
        }
        for (int64_t j = 0; j < lim; j++) {
            const v16 ra = LD(rows + j * D + e), rb = LD(rows + j * D + e + 16);
            const float *wj_ = w + j * wj;
            float z = wj_[0];
            a0 += z * ra, b0 += z * rb;
            z = wj_[wr], a1 += z * ra, b1 += z * rb;
            z = wj_[2 * wr], a2 += z * ra, b2 += z * rb;
            z = wj_[3 * wr], a3 += z * ra, b3 += z * rb;
            z = wj_[4 * wr], a4 += z * ra, b4 += z * rb;
            z = wj_[5 * wr], a5 += z * ra, b5 += z * rb;
            z = wj_[6 * wr], a6 += z * ra, b6 += z * rb;
            z = wj_[7 * wr], a7 += z * ra, b7 += z * rb;
        }
        ST(out + e, a0), ST(out + e + 16, b0), ST(out + D + e, a1), ST(out + D + e + 16, b1);
        ST(out + 2 * D + e, a2), ST(out + 2 * D + e + 16, b2), ST(out + 3 * D + e, a3), ST(out + 3 * D + e + 16, b3);
        ST(out + 4 * D + e, a4), ST(out + 4 * D + e + 16, b4), ST(out + 5 * D + e, a5), ST(out + 5 * D + e + 16, b5);
        ST(out + 6 * D + e, a6), ST(out + 6 * D + e + 16, b6), ST(out + 7 * D + e, a7), ST(out + 7 * D + e + 16, b7);
    }
    for (; e < D; e += 16) {
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        if (add) {
            a0 = LD(out + e), a1 = LD(out + D + e), a2 = LD(out + 2 * D + e), a3 = LD(out + 3 * D + e);
            a4 = LD(out + 4 * D + e), a5 = LD(out + 5 * D + e), a6 = LD(out + 6 * D + e), a7 = LD(out + 7 * D + e);
        }
        for (int64_t j = 0; j < lim; j++) {
            const v16 r = LD(rows + j * D + e);
            const float *wj_ = w + j * wj;
            a0 += wj_[0] * r, a1 += wj_[wr] * r, a2 += wj_[2 * wr] * r, a3 += wj_[3 * wr] * r;
            a4 += wj_[4 * wr] * r, a5 += wj_[5 * wr] * r, a6 += wj_[6 * wr] * r, a7 += wj_[7 * wr] * r;
        }
        ST(out + e, a0), ST(out + D + e, a1), ST(out + 2 * D + e, a2), ST(out + 3 * D + e, a3);
        ST(out + 4 * D + e, a4), ST(out + 5 * D + e, a5), ST(out + 6 * D + e, a6), ST(out + 7 * D + e, a7);
    }
}

/* Key (or value) j of row b, key head g: the prompt's P (prompt u), then the row's own T. */
static inline const float *key_row(const float *p, const int64_t *sp, int64_t u, const float *c, const int64_t *sc,
                                   int64_t b, int64_t g, int64_t P, int64_t j) {
    return j < P ? p + u * sp[0] + g * sp[1] + j * sp[2] : c + b * sc[0] + g * sc[1] + (j - P) * sc[2];
}

/* The S = P + T keys (or values) as rows [ld, D], zero past S; with rot (the row's T rotations, [T, D]) the
 * completion keys rotated by them on the way (the prompt's come rotated). */
static void gather_rows(const float *p, const int64_t *sp, int64_t u, const float *c, const int64_t *sc, int64_t b,
                        int64_t g, int64_t P, int64_t T, int64_t ld, float *rows, const float *rot, const int64_t D) {
    for (int64_t j = 0; j < P + T; j++) {
        if (j + 8 < P + T) prefetch_row(key_row(p, sp, u, c, sc, b, g, P, j + 8), D);
        if (rot && j >= P)
            rotate_row(rows + j * D, key_row(p, sp, u, c, sc, b, g, P, j), rot + (j - P) * D, 0, D);
        else
            memcpy(rows + j * D, key_row(p, sp, u, c, sc, b, g, P, j), sizeof(float) * D);
    }
    memset(rows + (P + T) * D, 0, sizeof(float) * (size_t)((ld - P - T) * D));
}

/* The same transposed in panels of 32 keys, [ld / 32, D, 32] (key j, column e at (j / 32) 32 D + 32 e + j % 32),
 * zero past S: blocks of 16 keys x 16 columns transposed in registers (rotated first, as gather_rows). */
static void gather_cols(const float *p, const int64_t *sp, int64_t u, const float *c, const int64_t *sc, int64_t b,
                        int64_t g, int64_t P, int64_t T, int64_t ld, float *cols, const float *rot, const int64_t D) {
    const v16 zero = {0};
    for (int64_t j0 = 0; j0 < ld; j0 += 16) {
        const float *src[16];
        for (int i = 0; i < 16; i++) src[i] = j0 + i < P + T ? key_row(p, sp, u, c, sc, b, g, P, j0 + i) : NULL;
        for (int64_t j = j0 + 16; j < j0 + 32 && j < P + T; j++) prefetch_row(key_row(p, sp, u, c, sc, b, g, P, j), D);
        for (int64_t e0 = 0; e0 < D; e0 += 16) {
            v16 r[16];
            for (int i = 0; i < 16; i++) {
                r[i] = src[i] ? (v16)LD(src[i] + e0) : zero;
                if (rot && src[i] && j0 + i >= P) r[i] = rotate(r[i], LD(rot + (j0 + i - P) * D + e0), 0);
            }
            transpose16(r);
            float *panel = cols + (j0 / 32) * 32 * D + j0 % 32;
            for (int i = 0; i < 16; i++) ST(panel + (e0 + i) * 32, r[i]);
        }
    }
}

/* 0 where the rows' queries may see key j at all (prompt validity, then completion validity), else -inf; [ld]. */
static void key_mask(const uint8_t *valid_p, const uint8_t *valid_c, int64_t u, int64_t b, int64_t P, int64_t T,
                     int64_t ld, float *mask) {
    for (int64_t j = 0; j < ld; j++)
        mask[j] = (j < P ? valid_p[u * P + j] : (j < P + T ? valid_c[b * T + j - P] : 0)) ? 0.0f : -INFINITY;
}

/* Head h's T rows of x (row b; strides sb, sh, si) copied to out [Tp, D] (rotated by rot [T, D] where given), zero
 * from T to Tp, each row fetched
 * eight ahead: the rows lie a projection's width apart, in a new page every row or two, where neither the
 * hardware prefetcher nor a prefetch issued one block of RB rows ahead kept up (at T = 256 the loads of the
 * blocks' rows took a sixth of the forward). */
static void gather_head(const float *x, int64_t sb, int64_t sh, int64_t si, int64_t b, int64_t h, int64_t T,
                        int64_t Tp, float *out, const float *rot, const int64_t D) {
    const float *row = x + b * sb + h * sh;
    for (int64_t i = 0; i < T; i++) {
        if (i + 8 < T) prefetch_row(row + (i + 8) * si, D);
        if (rot)
            rotate_row(out + i * D, row + i * si, rot + i * D, 0, D);
        else
            memcpy(out + i * D, row + i * si, sizeof(float) * D);
    }
    memset(out + T * D, 0, sizeof(float) * (size_t)((Tp - T) * D));
}

/* dd[i] = dx_i . y_i for head h's T rows: dx [Tp, D] gathered, y read in place (row b; strides sb, sh, si). */
static void row_dots(const float *dx, const float *y, int64_t sb, int64_t sh, int64_t si, int64_t b, int64_t h,
                     int64_t T, float *dd, const int64_t D) {
    const float *row = y + b * sb + h * sh;
    for (int64_t i = 0; i < T; i++) {
        if (i + 8 < T) prefetch_row(row + (i + 8) * si, D);
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t e = 0; e < D; e++) acc += dx[i * D + e] * row[i * si + e];
        dd[i] = acc;
    }
}

/* Everything a task reads and writes (the backward's inputs o and lse are the forward's outputs). */
struct tf_args {
    const float *q, *kp, *vp, *kc, *vc, *dout, *rot;
    const int64_t *st, *pidx, *ost;
    const uint8_t *valid_p, *valid_c;
    float *o, *lse, *dq, *dkp, *dkc, *dvp, *dvc;
    int64_t B, nq, nkv, T, P, d;
    float scale;
};

/* The next row's rows, asked for a slice at a time while this row's tasks compute (speed work 54). In the learner's
 * pass the ten layers' projections, outputs and gradients do not fit in the cache together, so a task's rows come
 * from memory, a projection's width apart (for one head, 128 bytes of a 3 KB row at 10M), where the hardware
 * prefetcher does not follow and the gathers' own prefetch, eight rows ahead, does not cover the latency; and
 * every row it writes (o, dq, dk, dv) is first read in. At 10M x 64, replaying the ten layers' calls of one pass in
 * turn, the forward took 2.6 ms a layer and the backward 5.4, against 1.65 and 3.3 for one layer's call repeated
 * (its rows in cache). Task (b, g) asks for positions [g T / nkv, (g + 1) T / nkv) of row b + 1 with every head, so a
 * row's nkv tasks (consecutive in a thread's share) ask for all of the next row, in address order within a
 * position: its queries, keys and values; then (forward) its output row, or (backward) its output gradient and
 * output rows; then, with the intent to write, the rows the task writes (the output; dq and the completion part of
 * dk and dv). Prefetches only: the values are the same. */
struct ahead {
    const struct tf_args *a;
    int64_t b, i, i1, item, items, total, backward;
};

static struct ahead ahead_of(const struct tf_args *a, int64_t b, int64_t g, int backward) {
    struct ahead p = {.a = a, .b = b + 1, .backward = backward};
    if (b + 1 >= a->B) return p; /* i == i1: nothing */
    p.i = g * a->T / a->nkv, p.i1 = (g + 1) * a->T / a->nkv;
    p.items = a->nq + 2 * a->nkv + (backward ? 2 + a->nq + 2 * a->nkv : 1);
    p.total = (p.i1 - p.i) * p.items;
    return p;
}

static inline void pf_lines(const float *x, int64_t floats, int write) {
    if (write)
        for (int64_t e = 0; e < floats; e += 16) prefetch_write(x + e);
    else
        for (int64_t e = 0; e < floats; e += 16) __builtin_prefetch(x + e, 0, 2);
}

/* ask for the next `count` items: per position, the queries of every head, the keys and values of every key head,
 * then (forward) the output row, or (backward) the output gradient and output rows, dq of every head and the
 * completion part of dk and dv of every key head */
static inline void ahead_some(struct ahead *p, int64_t count) {
    const struct tf_args *a = p->a;
    const int64_t *st = a->st, *os = a->ost, nq = a->nq, nkv = a->nkv, D = a->d, b = p->b;
    for (; count > 0 && p->i < p->i1; count--) {
        const int64_t i = p->i;
        int64_t n = p->item;
        if (n < nq)
            pf_lines(a->q + b * st[0] + n * st[1] + i * st[2], D, 0);
        else if ((n -= nq) < nkv)
            pf_lines(a->kc + b * st[9] + n * st[10] + i * st[11], D, 0);
        else if ((n -= nkv) < nkv)
            pf_lines(a->vc + b * st[12] + n * st[13] + i * st[14], D, 0);
        else if ((n -= nkv), !p->backward)
            pf_lines(a->o + (b * a->T + i) * nq * D, nq * D, 1);
        else if (n < 2)
            pf_lines((n ? a->o : a->dout) + (b * a->T + i) * nq * D, nq * D, 0);
        else if ((n -= 2) < nq)
            pf_lines(a->dq + b * os[0] + n * os[1] + i * os[2], D, 1);
        else if ((n -= nq) < nkv)
            pf_lines(a->dkc + b * os[6] + n * os[7] + i * os[8], D, 1);
        else
            pf_lines(a->dvc + b * os[12] + (n - nkv) * os[13] + i * os[14], D, 1);
        if (++p->item == p->items) p->item = 0, p->i++;
    }
}

static inline __attribute__((always_inline)) void forward_task(
    const float *q, const float *kp, const float *vp, const float *kc, const float *vc, const int64_t *st,
    const int64_t *pidx, const uint8_t *valid_p, const uint8_t *valid_c, const float *rot, float *o, float *lse,
    int64_t b, int64_t g, int64_t nq, int64_t nkv, int64_t T, int64_t P, float scale, float *buf, const int64_t D,
    struct ahead *pf) {
    const int64_t ld = up32(P + T), rep = nq / nkv, u = pidx[b];
    const float *rb = rot ? rot + b * T * D : NULL; /* row b's rotations, [T, D] */
    const int64_t Tp = (T + RB - 1) / RB * RB;
    float *kt = buf, *vr = kt + D * ld, *s = vr + ld * D, *xq = s + RB * ld, *out = xq + Tp * D, *mask = out + RB * D;
    gather_cols(kp, st + 3, u, kc, st + 9, b, g, P, T, ld, kt, rb, D);
    gather_rows(vp, st + 6, u, vc, st + 12, b, g, P, T, ld, vr, NULL, D);
    key_mask(valid_p, valid_c, u, b, P, T, ld, mask);
    struct epilogue ep = {.scale = scale, .mask = mask};
    float inv[RB];
    const int64_t blocks = rep * ((T + RB - 1) / RB); /* the next row's slice is asked for over these */
    for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
        gather_head(q, st[0], st[1], st[2], b, h, T, Tp, xq, rb, D);
        for (int64_t i0 = 0; i0 < T; i0 += RB) {
            const int64_t count = T - i0 < RB ? T - i0 : RB, lim = P + i0 + count, lim16 = up16(lim);
            ahead_some(pf, (pf->total + blocks - 1) / blocks);
            for (int r = 0; r < RB; r++) ep.see[r] = (float)(P + i0 + r + 1), ep.mv[r] = IOTA * 0.0f - INFINITY;
            scores8(xq + i0 * D, kt, ld, lim16, s, D, &ep, SC_LOGIT);
            for (int64_t r = 0; r < RB; r++) {
                float *sr = s + r * ld;
                const v16 mvec = vmax_all(ep.mv[r]);
                v16 tv = {0};
                for (int64_t j = 0; j < lim16; j += 16) { /* a key not seen weighs exactly 0 (and all do when m = -inf) */
                    const v16 z = LD(sr + j), e = (v16)((v16i)expv(z - mvec) & (z > -INFINITY));
                    ST(sr + j, e);
                    tv += e;
                }
                const float m = mvec[0], total = vsum_all(tv)[0];
                inv[r] = m > -INFINITY ? 1.0f / total : 0.0f; /* no key to see: o = 0, lse = -inf */
                if (r < count && lse) lse[(b * nq + h) * T + i0 + r] = m > -INFINITY ? m + logf(total) : -INFINITY;
            }
            wsum(s, ld, 1, vr, lim, out, D, 0); /* sum_j e_ij v_j, then divided by the row's total */
            for (int64_t r = 0; r < count; r++) {
                float *dst = o + ((b * T + i0 + r) * nq + h) * D;
                for (int64_t e = 0; e < D; e += 16) ST(dst + e, LD(out + r * D + e) * inv[r]);
            }
        }
    }
}

static inline __attribute__((always_inline)) void backward_task(
    const float *q, const float *kp, const float *vp, const float *kc, const float *vc, const int64_t *st,
    const int64_t *pidx, const uint8_t *valid_p, const uint8_t *valid_c, const float *rot, const float *o,
    const float *lse, const float *dout, float *dq, float *dkp, float *dkc, float *dvp, float *dvc,
    const int64_t *ost, int64_t b, int64_t g, int64_t nq, int64_t nkv, int64_t T, int64_t P, float scale, float *buf,
    const int64_t D, struct ahead *pf) {
    const int64_t S = P + T, ld = up32(S), rep = nq / nkv, u = pidx[b];
    const float *rb = rot ? rot + b * T * D : NULL; /* row b's rotations, [T, D] */
    float *kt = buf, *vt = kt + D * ld, *kr = vt + D * ld, *dka = kr + ld * D, *dva = dka + ld * D;
    const int64_t Tp = (T + RB - 1) / RB * RB;
    float *p = dva + ld * D, *ds = p + CQ * ld, *xq = ds + CQ * ld, *dxq = xq + Tp * D, *ox = dxq + Tp * D;
    float *dot = ox + RB * D, *mask = dot + Tp;
    gather_cols(kp, st + 3, u, kc, st + 9, b, g, P, T, ld, kt, rb, D);
    gather_rows(kp, st + 3, u, kc, st + 9, b, g, P, T, ld, kr, rb, D);
    gather_cols(vp, st + 6, u, vc, st + 12, b, g, P, T, ld, vt, NULL, D);
    key_mask(valid_p, valid_c, u, b, P, T, ld, mask);
    memset(dka, 0, sizeof(float) * (size_t)(2 * ld * D));
    struct epilogue ep = {.scale = scale, .mask = mask};
    const int64_t blocks = rep * ((T + RB - 1) / RB); /* the next row's slice is asked for over these */
    for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
        gather_head(q, st[0], st[1], st[2], b, h, T, Tp, xq, rb, D);
        gather_head(dout, T * nq * D, D, nq * D, b, h, T, Tp, dxq, NULL, D);
        row_dots(dxq, o, T * nq * D, D, nq * D, b, h, T, dot, D);
        for (int64_t c0 = 0; c0 < T; c0 += CQ) { /* a chunk of queries: p and ds for its rows, then dk, dv */
            const int64_t c1 = T - c0 < CQ ? T : c0 + CQ;
            for (int64_t i0 = c0; i0 < c1; i0 += RB) {
                const int64_t count = c1 - i0 < RB ? c1 - i0 : RB, lim = P + i0 + count, lim16 = up16(lim);
                /* written through at least key P + i + 8 of each row i, zero past what it sees, for dk's and dv's
                 * blocks of eight keys below */
                const int64_t wide = up16(lim + RB) < ld ? up16(lim + RB) : ld;
                ahead_some(pf, (pf->total + blocks - 1) / blocks);
                float *pb = p + (i0 - c0) * ld, *db = ds + (i0 - c0) * ld;
                for (int r = 0; r < RB; r++) {
                    ep.l[r] = r < count ? lse[(b * nq + h) * T + i0 + r] : -INFINITY;
                    ep.see[r] = ep.l[r] != -INFINITY ? (float)(P + i0 + r + 1) : 0.0f;
                    ep.dd[r] = r < count ? dot[i0 + r] : 0.0f;
                }
                ep.p = pb;
                scores8(xq + i0 * D, kt, ld, lim16, pb, D, &ep, SC_PROB);
                scores8(dxq + i0 * D, vt, ld, lim16, db, D, &ep, SC_DPROB);
                for (int64_t r = 0; r < RB; r++) /* zero past the tiles, for dk's and dv's blocks of eight keys */
                    memset(pb + r * ld + lim16, 0, sizeof(float) * (size_t)(wide - lim16)),
                    memset(db + r * ld + lim16, 0, sizeof(float) * (size_t)(wide - lim16));
                wsum(db, ld, 1, kr, lim, ox, D, 0); /* dq rows */
                for (int64_t r = 0; r < count; r++) { /* with rot: the gradient of q = x e^{ia} for x is dq e^{-ia} */
                    float *dst = dq + b * ost[0] + h * ost[1] + (i0 + r) * ost[2];
                    if (rb)
                        rotate_row(dst, ox + r * D, rb + (i0 + r) * D, 1, D);
                    else
                        memcpy(dst, ox + r * D, sizeof(float) * D);
                }
            }
            /* dk_j += sum_i ds_ij q_i, dv_j += sum_i p_ij do_i over the chunk's queries i that see key j (all of
             * them for a prompt key; i >= j - P for a completion key), eight keys at a time */
            for (int64_t j0 = 0; j0 < P + c1; j0 += RB) {
                const int64_t i1 = j0 - P > c0 ? j0 - P : c0;
                if (i1 >= c1) break;
                wsum(ds + (i1 - c0) * ld + j0, 1, ld, xq + i1 * D, c1 - i1, dka + j0 * D, D, 1);
                wsum(p + (i1 - c0) * ld + j0, 1, ld, dxq + i1 * D, c1 - i1, dva + j0 * D, D, 1);
            }
        }
    }
    for (int64_t j = 0; j < S; j++) { /* key j's gradients: the prompt's part, then the completion's */
        float *k = j < P ? dkp + b * ost[3] + g * ost[4] + j * ost[5] : dkc + b * ost[6] + g * ost[7] + (j - P) * ost[8];
        float *v = j < P ? dvp + b * ost[9] + g * ost[10] + j * ost[11] : dvc + b * ost[12] + g * ost[13] + (j - P) * ost[14];
        if (rb && j >= P)
            rotate_row(k, dka + j * D, rb + (j - P) * D, 1, D);
        else
            memcpy(k, dka + j * D, sizeof(float) * D);
        memcpy(v, dva + j * D, sizeof(float) * D);
    }
}

static void forward_any(const struct tf_args *a, int64_t b, int64_t g, float *buf, struct ahead *pf) {
#define TF_FORWARD(D) forward_task(a->q, a->kp, a->vp, a->kc, a->vc, a->st, a->pidx, a->valid_p, a->valid_c, a->rot, \
                                   a->o, a->lse, b, g, a->nq, a->nkv, a->T, a->P, a->scale, buf, D, pf)
    switch (a->d) { /* fixed head sizes get loops of fixed length */
    case 32: TF_FORWARD(32); break;
    case 64: TF_FORWARD(64); break;
    default: TF_FORWARD(a->d);
    }
#undef TF_FORWARD
}

static void backward_any(const struct tf_args *a, int64_t b, int64_t g, float *buf, struct ahead *pf) {
#define TF_BACKWARD(D) backward_task(a->q, a->kp, a->vp, a->kc, a->vc, a->st, a->pidx, a->valid_p, a->valid_c, a->rot, \
                                     a->o, a->lse, a->dout, a->dq, a->dkp, a->dkc, a->dvp, a->dvc, a->ost, b, g, a->nq, \
                                     a->nkv, a->T, a->P, a->scale, buf, D, pf)
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
    const int64_t Tp = (a->T + RB - 1) / RB * RB;
    const size_t floats = backward ? (size_t)(5 * d * ld + 2 * CQ * ld + 2 * Tp * d + RB * d + Tp + ld)
                                   : (size_t)(2 * d * ld + RB * ld + Tp * d + RB * d + ld);
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
            struct ahead pf = ahead_of(a, task / a->nkv, task % a->nkv, backward);
            (backward ? backward_any : forward_any)(a, task / a->nkv, task % a->nkv, buf, &pf);
        }
        free(buf);
    }
    return bad;
}

int tilt_tf_attention_forward(const float *q, const float *kp, const float *vp, const float *kc, const float *vc,
                              const int64_t *st, const int64_t *pidx, const uint8_t *valid_p, const uint8_t *valid_c,
                              const float *rot, float *o, float *lse, int64_t B, int64_t nq, int64_t nkv, int64_t T,
                              int64_t P, int64_t d, float scale) {
    const struct tf_args a = {q, kp, vp, kc, vc, NULL, rot, st, pidx, NULL, valid_p, valid_c, o, lse, NULL, NULL,
                              NULL, NULL, NULL, B, nq, nkv, T, P, d, scale};
    return run_tasks(&a, 0);
}

int tilt_tf_attention_backward(const float *q, const float *kp, const float *vp, const float *kc, const float *vc,
                               const int64_t *st, const int64_t *pidx, const uint8_t *valid_p, const uint8_t *valid_c,
                               const float *rot, const float *o, const float *lse, const float *dout, float *dq,
                               float *dkp, float *dkc, float *dvp, float *dvc, const int64_t *ost, int64_t B,
                               int64_t nq, int64_t nkv, int64_t T, int64_t P, int64_t d, float scale) {
    const struct tf_args a = {q, kp, vp, kc, vc, dout, rot, st, pidx, ost, valid_p, valid_c, (float *)o, (float *)lse,
                              dq, dkp, dkc, dvp, dvc, B, nq, nkv, T, P, d, scale};
    return run_tasks(&a, 1);
}
