/* Fused CPU kernels for tilt's decode step (tilt/fastdecode.py, GroupedDecoder) and its sampler
 * (tilt_sample_rows, for tilt.rollout._pick).
 *
 * At 64 rows and 10M-30M parameters a decode step's attention is about 15 small torch operations
 * per layer (rotary embedding, two cache writes, two score products, a mask, a concatenation, a
 * softmax, two value products and the reshapes between them), each costing more in dispatch and
 * memory traffic than in arithmetic. Here each of them is one call that walks the rows once.
 * The arithmetic is the same as the torch path's (the same products, summed in another order), so
 * the results agree to float rounding (tests/test_kernels.py).
 *
 * Built by tilt/kernels/__init__.py with the system C compiler, loaded through ctypes; float32,
 * contiguous row-major tensors only (the Python side checks). Threads: OpenMP, sharing the
 * runtime torch already loaded (libgomp.so.1).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#if defined(__F16C__) || defined(__FMA__)
#include <immintrin.h>
#endif

/* Ask for the first `count` floats of two blocks (one head's cached keys and values) to be brought
 * into cache: each head's block is a few KB in its own pages, where the hardware prefetcher starts
 * late, so the next head's loads are issued while this head is computed. */
static inline void prefetch_block(const float *a, const float *b, int64_t count) {
    for (int64_t i = 0; i < count; i += 16) {
        __builtin_prefetch(a + i, 0, 3);
        __builtin_prefetch(b + i, 0, 3);
    }
}

/* s[j] = q . k_j for `count` keys stored as rows of D floats. Four keys per pass, each with its own
 * accumulator, so the horizontal sums overlap. */
static inline __attribute__((always_inline)) void dots(const float *q, const float *k, int64_t count,
                                                       float *s, const int64_t D) {
    int64_t j = 0;
    for (; j + 4 <= count; j += 4) {
        const float *k0 = k + j * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t e = 0; e < D; e++) {
            a0 += q[e] * k0[e];
            a1 += q[e] * k1[e];
            a2 += q[e] * k2[e];
            a3 += q[e] * k3[e];
        }
        s[j] = a0, s[j + 1] = a1, s[j + 2] = a2, s[j + 3] = a3;
    }
    for (; j < count; j++) {
        const float *kj = k + j * D;
        float a = 0.0f;
#pragma omp simd reduction(+ : a)
        for (int64_t e = 0; e < D; e++) a += q[e] * kj[e];
        s[j] = a;
    }
}

/* acc += sum_j w[j] v_j over `count` value rows of D floats. */
static inline __attribute__((always_inline)) void weighted_sum(const float *w, const float *v, int64_t count,
                                                               float *acc, const int64_t D) {
    for (int64_t j = 0; j < count; j++) {
        const float p = w[j];
        const float *vj = v + j * D;
#pragma omp simd
        for (int64_t e = 0; e < D; e++) acc[e] += p * vj[e];
    }
}

/* One query head of one row: softmax over the prompt's P keys (padding masked) and the row's t + 1
 * completion keys, times their values. q is already rotated and scaled; s has room for P + t + 1. */
static inline __attribute__((always_inline)) void head(const float *q, const float *kp, const float *vp,
                                                       const uint8_t *pad, const float *kr, const float *vr,
                                                       int64_t P, int64_t t, float *s, float *out,
                                                       const int64_t D) {
    const int64_t keys = P + t + 1;
    dots(q, kp, P, s, D);
    dots(q, kr, t + 1, s + P, D);
    float mx = -INFINITY;
    for (int64_t j = 0; j < keys; j++) {
        const float x = (j < P && pad[j]) ? -INFINITY : s[j];
        s[j] = x;
        mx = x > mx ? x : mx;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < keys; j++) {
        const float p = s[j] == -INFINITY ? 0.0f : fast_expf(s[j] - mx);
        s[j] = p;
        total += p;
    }
    float acc[D];
    for (int64_t e = 0; e < D; e++) acc[e] = 0.0f;
    weighted_sum(s, vp, P, acc, D);
    weighted_sum(s + P, vr, t + 1, acc, D);
    const float inv = 1.0f / total;
    for (int64_t e = 0; e < D; e++) out[e] = acc[e] * inv;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
/* the build uses -std=c11, where GCC does not contract a * b + c into one fused multiply-add */
#pragma GCC optimize("fp-contract=fast")
#endif

#include "vec16.h"

/* Lane i of the result = the sum of the 16 lanes of a[i]: the 16 dot products of a block of keys from
 * their lane-wise partial sums, in 30 two-input shuffles and 15 adds (pairs of vectors interleaved, then
 * pairs of pairs, then the 128-bit lanes) instead of 16 separate horizontal sums. */
VINLINE v16 sum16(const v16 *a) {
    v16 b[8], c[4];
    for (int k = 0; k < 8; k++) /* lanes 0, 2 of each 4: part of a[2k]; 1, 3: of a[2k + 1] */
        b[k] = SHUF(a[2 * k], a[2 * k + 1], LO1) + SHUF(a[2 * k], a[2 * k + 1], HI1);
    for (int m = 0; m < 4; m++) /* lane 4 L + i: a[4 m + i] summed over its 128-bit lane L */
        c[m] = SHUF(b[2 * m], b[2 * m + 1], LO2) + SHUF(b[2 * m], b[2 * m + 1], HI2);
    const v16 d0 = SHUF(c[0], c[1], LANES(0, 2, 4, 6)) + SHUF(c[0], c[1], LANES(1, 3, 5, 7));
    const v16 d1 = SHUF(c[2], c[3], LANES(0, 2, 4, 6)) + SHUF(c[2], c[3], LANES(1, 3, 5, 7));
    return SHUF(d0, d1, LANES(0, 2, 4, 6)) + SHUF(d0, d1, LANES(1, 3, 5, 7));
}

/* The completion cache holds floats, or (H = 1, rollout.kv_cache_dtype) IEEE half-precision values converted on
 * load, or (H = 2) 8-bit integers with one float scale per key or value vector: the decode attention reads every
 * cached key and value once per new token and is bound by the memory's read rate (benchmarks/README.md, speed
 * work 44 and 47), so fewer bytes read take less time. kv_at: element i of such a cache; ldkv: 16 of its values
 * from there as floats (for H = 2 the integers, before their scale). */
static inline __attribute__((always_inline)) const void *kv_at(const void *base, const int H, int64_t i) {
    return H == 2 ? (const void *)((const int8_t *)base + i)
                  : H ? (const void *)((const uint16_t *)base + i) : (const void *)((const float *)base + i);
}

static inline __attribute__((always_inline)) v16 ldkv(const void *p, const int H) {
    if (!H) return LD(p);
    if (H == 2) {
#if defined(__AVX512F__)
        return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
        v16 x;
        for (int i = 0; i < 16; i++) x[i] = (float)((const int8_t *)p)[i];
        return x;
#endif
    }
#if defined(__AVX512F__)
    return (v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__)
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p + 1));
    v16 x;
    memcpy(&x, &a, sizeof a), memcpy((char *)&x + sizeof a, &b, sizeof b);
    return x;
#else
    return IOTA * 0.0f; /* not reached: tilt_kv_half reports 0 and the caller keeps a float cache */
#endif
}

/* s[j] = q . k_j for `count` keys stored as rows of D = 16 W values (floats, or halves when H), sixteen keys
 * per block: each key's products summed lane-wise (independent chains), the block's 16 sums by sum16. s has
 * room for count rounded up to 16. pf (or NULL): another block of rows laid out as k's, asked into L2 a row
 * per row of k read (the next head's keys: the hardware prefetcher does not cross into its pages in time). */
static inline __attribute__((always_inline)) void dots16(const v16 *q, const void *k, int64_t count, float *s,
                                                         const int64_t W, const void *pf, const int H,
                                                         const float *sc) {
    const int64_t line = H == 2 ? 4 : H ? 2 : 1; /* vectors of 16 per 64-byte line */
    for (int64_t j = 0; j < count; j += 16) {
        v16 a[16];
        const int64_t n = count - j < 16 ? count - j : 16;
        for (int64_t i = 0; i < 16; i++) {
            if (i < n) {
                const int64_t row = (j + i) * W * 16;
                if (pf)
                    for (int64_t e = 0; e < W; e += line) __builtin_prefetch(kv_at(pf, H, row + 16 * e), 0, 2);
                v16 x = q[0] * ldkv(kv_at(k, H, row), H);
                for (int64_t e = 1; e < W; e++) x += q[e] * ldkv(kv_at(k, H, row + 16 * e), H);
                a[i] = x;
            } else {
                a[i] = IOTA * 0.0f;
            }
        }
        if (H == 2) { /* each key's products times its scale */
            if (n == 16) {
                ST(s + j, sum16(a) * LD(sc + j));
            } else {
                float c[16] = {0};
                memcpy(c, sc + j, sizeof(float) * (size_t)n);
                ST(s + j, sum16(a) * LD(c));
            }
        } else {
            ST(s + j, sum16(a));
        }
    }
}

/* acc[e] += sum_j w[j] v_j over `count` value rows of D = 16 W values (floats, halves when H = 1, 8-bit integers
 * when H = 2, whose weights w then come multiplied by their scales), with S sets of accumulators (keys j, j + 1,
 * ... in turn) so consecutive keys' multiply-adds do not wait on each other; pf as in dots16. */
static inline __attribute__((always_inline)) void wsum16(const float *w, const void *v, int64_t count, v16 *acc,
                                                         const int64_t W, const int S, const void *pf, const int H) {
    const int64_t line = H == 2 ? 4 : H ? 2 : 1;
    v16 a[4][8];
    for (int r = 0; r < S; r++)
        for (int64_t e = 0; e < W; e++) a[r][e] = IOTA * 0.0f;
    int64_t j = 0;
    for (; j + S <= count; j += S)
        for (int r = 0; r < S; r++) {
            const float p = w[j + r];
            const int64_t row = (j + r) * W * 16;
            if (pf)
                for (int64_t e = 0; e < W; e += line) __builtin_prefetch(kv_at(pf, H, row + 16 * e), 0, 2);
            for (int64_t e = 0; e < W; e++) a[r][e] += p * ldkv(kv_at(v, H, row + 16 * e), H);
        }
    for (; j < count; j++) {
        const float p = w[j];
        for (int64_t e = 0; e < W; e++) a[0][e] += p * ldkv(kv_at(v, H, j * W * 16 + 16 * e), H);
    }
    for (int64_t e = 0; e < W; e++) {
        v16 x = a[0][e];
        for (int r = 1; r < S; r++) x += a[r][e];
        acc[e] += x;
    }
}

/* head() for D = 16 W (W <= 8) in 16-float vectors: the scores sixteen keys at a time, the softmax on
 * whole vectors, the weighted sum with independent accumulators. Same function as head(), summed in
 * another order. s has room for P + t + 33 floats; pk, pv: the next head's completion keys and values
 * (or NULL), asked for in step with this head's. H: the completion keys and values kr, vr (and pk, pv)
 * are halves (1) or 8-bit integers (2) with scales ks, vs (one per key or value); the prompt's kp, vp are floats
 * either way. pm: the prompt's key mask in whole vectors, -1 (all bits) where key j < P16 is padding or past P.
 * The masks and the row maximum are vector operations (the maximum by vmax_all, exact in any order: the same
 * values as the scalar loops they replaced). */
static inline __attribute__((always_inline)) void head16(const float *qf, const float *kp, const float *vp,
                                                         const int32_t *pm, const void *kr, const void *vr,
                                                         int64_t P, int64_t t, float *s, float *out,
                                                         const int64_t W, const void *pk, const void *pv,
                                                         const int H, const float *ks, const float *vs) {
    const int64_t P16 = (P + 15) / 16 * 16;
    const v16 ninf = IOTA * 0.0f - INFINITY;
    v16 q[8];
    for (int64_t e = 0; e < W; e++) q[e] = LD(qf + 16 * e);
    /* prompt scores in s[0, P), completion scores from s[P16] on (both blocks start on a whole vector) */
    dots16(q, kp, P, s, W, 0, 0, 0);
    dots16(q, kr, t + 1, s + P16, W, pk, H, ks);
    for (int64_t j = 0; j < P16; j += 16) ST(s + j, sel(*(const v16i *)(pm + j), ninf, LD(s + j)));
    const int64_t end = P16 + (t + 1 + 15) / 16 * 16;
    if ((t + 1) % 16) /* the last block's lanes past position t */
        ST(s + end - 16, sel(IOTA >= (float)((t + 1) % 16), ninf, LD(s + end - 16)));
    v16 mv = ninf;
    for (int64_t j = 0; j < end; j += 16) {
        const v16 x = LD(s + j);
        mv = sel(x > mv, x, mv);
    }
    const v16 mx = vmax_all(mv);
    v16 tv = IOTA * 0.0f;
    for (int64_t j = 0; j < end; j += 16) {
        const v16 x = LD(s + j), p = sel(x == ninf, IOTA * 0.0f, expv(x - mx));
        tv += p;
        if (H == 2 && j >= P16) { /* an int8 value's weight times its scale here, 16 at a time, not in wsum16 */
            const int64_t c = j - P16, left = t + 1 - c; /* the scales of positions c .. t (0 past t) */
            v16 sc = IOTA * 0.0f;
            if (left >= 16)
                sc = LD(vs + c);
            else
                memcpy(&sc, vs + c, sizeof(float) * (size_t)left);
            ST(s + j, p * sc);
        } else {
            ST(s + j, p);
        }
    }
    v16 acc[8];
    for (int64_t e = 0; e < W; e++) acc[e] = IOTA * 0.0f;
    const int S = W <= 4 ? 4 : 2;
    wsum16(s, vp, P, acc, W, S, 0, 0);
    wsum16(s + P16, vr, t + 1, acc, W, S, pv, H); /* with H = 2 the weights carry their scales */
    const float inv = 1.0f / hsum(tv);
    for (int64_t e = 0; e < W; e++) ST(out + 16 * e, acc[e] * inv);
}

/* out[n, i] = silu(gu[n, i]) * gu[n, I + i] = gu[n, i] sigma(gu[n, i]) gu[n, I + i] (SwiGLU, Eq. 5 of
 * arXiv:2002.05202) on 16 lanes (sigmoidv); a row's last I % 16 through a padded vector. gu [N, 2I], out [N, I]
 * with rows ldo floats apart (I; or out = gu and ldo = 2I: into gu's gate half, each value read before its place
 * is written). */
static inline __attribute__((always_inline)) void silu_mul_rows(const float *gu, float *out, int64_t ldo, int64_t N,
                                                                int64_t I) {
#pragma omp parallel for schedule(static) if (N * I >= 16384)
    for (int64_t n = 0; n < N; n++) {
        const float *g = gu + n * 2 * I, *u = g + I;
        float *o = out + n * ldo;
        int64_t i = 0;
        const int ahead = n + ROWS_AHEAD < N;
        for (; i + 16 <= I; i += 16) {
            if (ahead) {
                __builtin_prefetch(g + ROWS_AHEAD * 2 * I + i, 0, 2), __builtin_prefetch(u + ROWS_AHEAD * 2 * I + i, 0, 2);
                prefetch_write(o + ROWS_AHEAD * ldo + i);
            }
            const v16 x = LD(g + i);
            ST(o + i, x * sigmoidv(x) * LD(u + i));
        }
        if (i < I) {
            float a[16] = {0}, b[16] = {0}, c[16];
            memcpy(a, g + i, sizeof(float) * (size_t)(I - i)), memcpy(b, u + i, sizeof(float) * (size_t)(I - i));
            const v16 x = LD(a);
            ST(c, x * sigmoidv(x) * LD(b));
            memcpy(o + i, c, sizeof(float) * (size_t)(I - i));
        }
    }
}

void tilt_silu_mul(const float *gu, float *out, int64_t N, int64_t I) { silu_mul_rows(gu, out, I, N, I); }

/* The same into gu's gate half (gu [N, 2I]; its up half unchanged): for a pass that keeps nothing for a backward. */
void tilt_silu_mul_gate(float *gu, int64_t N, int64_t I) { silu_mul_rows(gu, gu, 2 * I, N, I); }

/* y = vec16.h's expv of x, 16 floats at a time (n a multiple of 16): the exp the kernels' softmaxes and SiLUs use,
 * called on its own so that tests can hold it to its steps. tilt_expv_explicit: whether those steps are the
 * explicit fused multiply-adds of the AVX-512 build (1) or the portable code as this build contracts it (0). */
void tilt_expv(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i + 16 <= n; i += 16) ST(y + i, expv(LD(x + i)));
}
int tilt_expv_explicit(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* Attention of one new token per row over its prompt's keys (shared by the G rows of a prompt)
 * and its own completion keys (Eq. 1 of arXiv:1706.03762), after rotary embedding of the new
 * query and key (Eq. 34 of arXiv:2104.09864 in complex form, pairs adjacent) and after writing the
 * new key and value into the completion cache at position t.
 *
 * y     [N, (nq + 2 nkv) d]  the fused q/k/v product (q, k in pair layout; q carries 1/sqrt(d))
 * rot   [N, d/2, 2]          e^{i p theta} as (cos, sin)
 * kc,vc [N, nkv, cap, d]     completion keys / values (position t is written here): floats, or with
 *                            half = 1 IEEE half-precision values (rounded to nearest even on the way in), or
 *                            with half = 2 8-bit integers: a vector x of d values kept as round(x 127 / max|x|)
 *                            (ties to even) with its scale max|x| / 127 in ks / vs [N, nkv, cap] (NULL otherwise)
 * kp,vp [U, nkv, P, d]       prompt keys (pair layout) / values, floats
 * pad   [U, P]               1 where the prompt position is padding
 * out   [N, nq d]
 * Rows are in prompt order: row n belongs to prompt n / (N / U). Head sizes that are multiples of 16 up
 * to 128 run head16 (32, 64 and 128 with loops of fixed length), others head() (float caches only).
 * Returns 0 when done; the number of rows left undone because a thread could not allocate its scratch
 * (neither their cache nor their output written; the caller raises); TILT_KV_RANGE when a new key or value
 * lies outside half precision's range (|x| >= 65520 rounds to infinity; the row's other work is done); or
 * TILT_KV_UNSUPPORTED when half = 1 where this build or head size has no half-precision path (tilt_kv_half), or
 * half = 2 at a head size head16 does not take.
 */
#define TILT_KV_RANGE (-1)
#define TILT_KV_UNSUPPORTED (-2)
#define TILT_DECODE_BAD_OP (-3) /* tilt_decode_layers: a record of unknown kind */

/* Whether this build reads and writes half-precision caches (F16C conversions). */
int tilt_kv_half(void) {
#if defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

/* x rounded to the nearest half-precision value (ties to even), as bits; *over set when a finite x rounds to
 * infinity. */
static inline uint16_t to_half(float x, int *over) {
#if defined(__F16C__)
    const uint16_t h = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff) == 0 && isfinite(x)) *over = 1;
    return h;
#else
    (void)x, *over = 1;
    return 0;
#endif
}

/* x rotated as pairs (x[2j], x[2j + 1]) by r's (cos, sin) pairs on 16 lanes: x[2j] c - x[2j + 1] s and
 * x[2j] s + x[2j + 1] c. The same values as the scalar loops they replace as GCC compiles those: with F = 1 the
 * products x[2j] r fused into the add (GCC's vectoriser makes the float cache's and the query's loops one
 * vfmaddsub each), with F = 0 each product rounded on its own (the half cache's loop, which stays scalar). */
static inline __attribute__((always_inline)) v16 rotate16(v16 x, v16 r, const int F) {
    const v16 a = SHUF(x, x, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
    const v16 b = SHUF(x, x, 1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
    const v16 rs = SHUF(r, r, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    const v16 sign = {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1};
#if defined(__AVX512F__)
    if (F) return (v16)_mm512_fmaddsub_ps((__m512)a, (__m512)r, (__m512)(b * rs));
#elif defined(__FMA__)
    if (F) {
        const v16 p = b * rs;
        __m256 a2[2], r2[2], p2[2], o2[2];
        memcpy(a2, &a, sizeof a), memcpy(r2, &r, sizeof r), memcpy(p2, &p, sizeof p);
        for (int i = 0; i < 2; i++) o2[i] = _mm256_fmaddsub_ps(a2[i], r2[i], p2[i]);
        v16 o;
        memcpy(&o, o2, sizeof o);
        return o;
    }
#endif
    const v16 ar = a * r;
    return ar + b * rs * sign;
}

/* 16 floats stored as half-precision values (rounded to nearest even, as to_half); *over set when a finite value
 * rounds to infinity (65520 <= |x| < inf). Only called where tilt_kv_half() holds (F16C). */
static inline __attribute__((always_inline)) void store_half16(uint16_t *dst, v16 x, int *over) {
    const v16 ax = (v16)((v16i)x & 0x7fffffff);
    const v16i big = (ax >= 65520.0f) & (ax < INFINITY);
    for (int i = 0; i < 16; i++) *over |= big[i] != 0;
#if defined(__AVX512F__)
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
    __m256 lo, hi;
    memcpy(&lo, &x, sizeof lo), memcpy(&hi, (char *)&x + sizeof lo, sizeof hi);
    _mm_storeu_si128((__m128i *)dst, _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128((__m128i *)dst + 1, _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
#else
    (void)dst, *over = 1;
#endif
}

/* The W vectors x[0 .. W) (one key or value, d = 16 W) as 8-bit integers at dst: round(x 127 / m), m = max |x|
 * (ties to even; 0 for every value where m = 0), and m / 127 returned as its scale. The same values as
 * tilt.kernels.quantize_int8 (whose float32 steps these are). */
static inline __attribute__((always_inline)) float store_int8(int8_t *dst, const v16 *x, const int64_t W) {
    v16 m = IOTA * 0.0f;
    for (int64_t e = 0; e < W; e++) m = vmax2(m, (v16)((v16i)x[e] & 0x7fffffff));
    const float amax = vmax_all(m)[0], inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int64_t e = 0; e < W; e++) {
        const v16 y = x[e] * inv;
#if defined(__AVX512F__)
        _mm_storeu_si128((__m128i *)(dst + 16 * e),
                         _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32((__m512)y, _MM_FROUND_TO_NEAREST_INT |
                                                                                      _MM_FROUND_NO_EXC)));
#else
        for (int i = 0; i < 16; i++) dst[16 * e + i] = isfinite(y[i]) ? (int8_t)nearbyintf(y[i]) : 0;
#endif
    }
    return amax / 127.0f;
}

/* tilt_attend's rows for a float (H = 0), a half (H = 1) or an int8 (H = 2, scales ks, vs) cache, each compiled on
 * its own (the float one is the code it was before half caches), shared out over the threads of the enclosing
 * parallel region (every thread calls it). Adds the rows left undone to *bad_out and ORs a value beyond half's range
 * into *over_out; both are complete once the threads have passed a barrier after it. */
static inline __attribute__((always_inline)) void attend_rows(
    const float *y, const float *rot, void *kc, void *vc, const float *kp, const float *vp, const uint8_t *pad,
    float *out, int64_t N, int64_t U, int64_t nq, int64_t nkv, int64_t d, int64_t P, int64_t cap, int64_t t,
    const int H, float *ks, float *vs, int *bad_out, int *over_out) {
    const int64_t G = N / U, rep = nq / nkv, hd = d / 2, width = (nq + 2 * nkv) * d;
    const int vec = d % 16 == 0 && d <= 128; /* head16; else head() */
    int bad = 0, over = 0;
    {
        /* q, then the scores: room for the prompt's and the completion's keys, each rounded up to 16 */
        const int64_t P16 = (P + 15) / 16 * 16;
        float *q = (float *)malloc(sizeof(float) * (size_t)(d + P + t + 1 + 48 + P16 + 16));
        float *s = q + d;
        /* the prompt's key mask for head16, all ones (-1) where a key is padding or past P: a whole vector per 16 keys
         * (for the prompt the thread's rows last came from; 64-byte aligned) */
        int32_t *pm = q ? (int32_t *)(((uintptr_t)(s + P + t + 1 + 48) + 63) & ~(uintptr_t)63) : NULL;
        int64_t pm_u = -1;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!q) { /* no scratch: the row is left undone (neither its cache nor its output written) */
                bad++;
                continue;
            }
            const float *yr = y + n * width, *r = rot + n * d;
            const int64_t u = n / G;
            if (u != pm_u) {
                for (int64_t j = 0; j < P16; j++) pm[j] = j >= P || pad[u * P + j] ? -1 : 0;
                pm_u = u;
            }
            for (int64_t h = 0; h < nkv; h++) { /* the new key (rotated) and value into the cache */
                const float *k = yr + (nq + h) * d, *v = yr + (nq + nkv + h) * d;
                const int64_t at = ((n * nkv + h) * cap + t) * d;
                if (H == 2) { /* the rotated key as the float cache would hold it, then both to 8 bits */
                    v16 kv[8], vv[8];
                    for (int64_t e = 0; e < d / 16; e++)
                        kv[e] = rotate16(LD(k + 16 * e), LD(r + 16 * e), 1), vv[e] = LD(v + 16 * e);
                    ks[at / d] = store_int8((int8_t *)kc + at, kv, d / 16);
                    vs[at / d] = store_int8((int8_t *)vc + at, vv, d / 16);
                } else if (vec) { /* 16 values at a time, the same values as the scalar loops below */
                    for (int64_t j = 0; j < d; j += 16) {
                        const v16 kr16 = rotate16(LD(k + j), LD(r + j), !H), v16v = LD(v + j);
                        if (H) {
                            store_half16((uint16_t *)kc + at + j, kr16, &over);
                            store_half16((uint16_t *)vc + at + j, v16v, &over);
                        } else {
                            ST((float *)kc + at + j, kr16);
                            ST((float *)vc + at + j, v16v);
                        }
                    }
                } else if (H) {
                    uint16_t *kd = (uint16_t *)kc + at, *vd = (uint16_t *)vc + at;
                    for (int64_t j = 0; j < hd; j++) {
                        const float a = k[2 * j], b = k[2 * j + 1], c = r[2 * j], sn = r[2 * j + 1];
                        kd[2 * j] = to_half(a * c - b * sn, &over);
                        kd[2 * j + 1] = to_half(a * sn + b * c, &over);
                    }
                    for (int64_t j = 0; j < d; j++) vd[j] = to_half(v[j], &over);
                } else {
                    float *kd = (float *)kc + at, *vd = (float *)vc + at;
                    for (int64_t j = 0; j < hd; j++) {
                        const float a = k[2 * j], b = k[2 * j + 1], c = r[2 * j], sn = r[2 * j + 1];
                        kd[2 * j] = a * c - b * sn;
                        kd[2 * j + 1] = a * sn + b * c;
                    }
                    memcpy(vd, v, sizeof(float) * (size_t)d);
                }
            }
            for (int64_t qh = 0; qh < nq; qh++) {
                const int64_t h = qh / rep, nh = n * nkv + h;
                const float *qs = yr + qh * d;
                /* the next key head's cache is asked for while this one is computed: by head16 a row of it
                 * with each row of this head's (on the group's last query head, so once per key head); for
                 * other head sizes as one block up front. With an int8 cache the head after next (its head is
                 * read in about half the time: the attention 0.95-0.97 at 10M x 256 against one ahead) */
                const int64_t dist = H == 2 ? 2 : 1;
                const int ahead = qh % rep == rep - 1 && nh + dist < N * nkv;
                const void *pk = ahead ? kv_at(kc, H, (nh + dist) * cap * d) : 0;
                const void *pv = ahead ? kv_at(vc, H, (nh + dist) * cap * d) : 0;
                if (!vec && qh % rep == 0 && nh + 1 < N * nkv)
                    prefetch_block((const float *)kc + (nh + 1) * cap * d, (const float *)vc + (nh + 1) * cap * d,
                                   (t + 1) * d);
                if (vec)
                    for (int64_t j = 0; j < d; j += 16) ST(q + j, rotate16(LD(qs + j), LD(r + j), 1));
                else
                    for (int64_t j = 0; j < hd; j++) {
                        const float a = qs[2 * j], b = qs[2 * j + 1], c = r[2 * j], sn = r[2 * j + 1];
                        q[2 * j] = a * c - b * sn;
                        q[2 * j + 1] = a * sn + b * c;
                    }
                const float *kpu = kp + (u * nkv + h) * P * d, *vpu = vp + (u * nkv + h) * P * d;
                const void *kr = kv_at(kc, H, nh * cap * d), *vr = kv_at(vc, H, nh * cap * d);
                const float *ksr = H == 2 ? ks + nh * cap : 0, *vsr = H == 2 ? vs + nh * cap : 0;
                float *o = out + (n * nq + qh) * d;
                const uint8_t *pu = pad + u * P;
                switch (d) { /* fixed head sizes get loops of fixed length */
                case 32: head16(q, kpu, vpu, pm, kr, vr, P, t, s, o, 2, pk, pv, H, ksr, vsr); break;
                case 64: head16(q, kpu, vpu, pm, kr, vr, P, t, s, o, 4, pk, pv, H, ksr, vsr); break;
                case 128: head16(q, kpu, vpu, pm, kr, vr, P, t, s, o, 8, pk, pv, H, ksr, vsr); break;
                default:
                    if (vec) head16(q, kpu, vpu, pm, kr, vr, P, t, s, o, d / 16, pk, pv, H, ksr, vsr);
                    else head(q, kpu, vpu, pu, (const float *)kr, (const float *)vr, P, t, s, o, d);
                }
            }
        }
        free(q);
    }
    if (bad) {
#pragma omp atomic
        *bad_out += bad;
    }
    if (over) {
#pragma omp atomic
        *over_out |= over;
    }
}

/* Whether tilt_attend runs this cache kind (half) at head size d: TILT_KV_UNSUPPORTED if not, else 0. */
static int attend_supported(int64_t d, int64_t half, const float *ks, const float *vs) {
    if ((half == 1 && (d % 16 != 0 || d > 128 || !tilt_kv_half())) ||
        (half == 2 && (d % 16 != 0 || d > 128 || !ks || !vs)) || half < 0 || half > 2)
        return TILT_KV_UNSUPPORTED;
    return 0;
}

/* tilt_attend's work by the threads of the enclosing parallel region (see attend_rows). */
static void attend_team(const float *y, const float *rot, void *kc, void *vc, const float *kp, const float *vp,
                        const uint8_t *pad, float *out, int64_t N, int64_t U, int64_t nq, int64_t nkv, int64_t d,
                        int64_t P, int64_t cap, int64_t t, int64_t half, float *ks, float *vs, int *bad, int *over) {
    if (half == 2)
        attend_rows(y, rot, kc, vc, kp, vp, pad, out, N, U, nq, nkv, d, P, cap, t, 2, ks, vs, bad, over);
    else if (half)
        attend_rows(y, rot, kc, vc, kp, vp, pad, out, N, U, nq, nkv, d, P, cap, t, 1, 0, 0, bad, over);
    else
        attend_rows(y, rot, kc, vc, kp, vp, pad, out, N, U, nq, nkv, d, P, cap, t, 0, 0, 0, bad, over);
}

int tilt_attend(const float *y, const float *rot, void *kc, void *vc, const float *kp,
                const float *vp, const uint8_t *pad, float *out, int64_t N, int64_t U,
                int64_t nq, int64_t nkv, int64_t d, int64_t P, int64_t cap, int64_t t, int64_t half, float *ks,
                float *vs) {
    if (attend_supported(d, half, ks, vs))
        return TILT_KV_UNSUPPORTED;
    int bad = 0, over = 0;
#pragma omp parallel
    attend_team(y, rot, kc, vc, kp, vp, pad, out, N, U, nq, nkv, d, P, cap, t, half, ks, vs, &bad, &over);
    return bad ? bad : (over ? TILT_KV_RANGE : 0);
}

/* tilt_add_rms_norm's rows over the threads of the enclosing parallel region. */
static void add_rms_norm_team(float *h, const float *x, float *out, int64_t N, int64_t H, float eps) {
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float *hr = h + n * H, *o = out + n * H;
        if (x) {
            const float *xr = x + n * H;
#pragma omp simd
            for (int64_t e = 0; e < H; e++) hr[e] += xr[e];
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t e = 0; e < H; e++) ss += hr[e] * hr[e];
        const float r = 1.0f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t e = 0; e < H; e++) o[e] = hr[e] * r;
    }
}

/* h += x (when x is not NULL), then out = h / sqrt(mean(h^2) + eps): RMS norm without its weight
 * (Eq. 4 of arXiv:1910.07467; tilt folds the weight into the next product). h, x, out [N, H]. */
void tilt_add_rms_norm(float *h, const float *x, float *out, int64_t N, int64_t H, float eps) {
#pragma omp parallel if (N * H >= 16384)
    add_rms_norm_team(h, x, out, N, H, eps);
}

/* One token of the lean decoder (tilt/fastdecode.py, GroupedDecoder._fused_step) through every layer in one
 * parallel region: the calls the step otherwise makes one by one from Python (per layer four products, the
 * attention and two residual adds + RMS norms), in order, each shared out over the threads and finished before
 * the next starts (the end of each `omp for` waits for all threads). The same kernels on the same data in the same
 * order, so the same values bit for bit; what goes is a Python call, an argument conversion and a thread team's
 * start and end per call (71 a token at 10 layers).
 *
 * ops: n_ops records of DECODE_OP int64s, [kind, arguments...], pointers as integers:
 *   DECODE_NORM   (x or 0, out, N, H, eps as float bits): tilt_add_rms_norm(h, x, out, N, H, eps)
 *   DECODE_LINEAR (x, wp, b or 0, y, M, N, K) and DECODE_SWIGLU (the same): tilt_linear, tilt_linear_swiglu
 *   DECODE_ATTEND (y, kc, vc, kp, vp, pad, out, N, U, nq, nkv, d, P, cap, half, ks or 0, vs or 0):
 *                 tilt_attend(y, rot, ..., t, half, ks, vs)
 * h [N, H]: the residual stream, updated in place; rot: this token's rotations; t: its position in the cache.
 * Returns what tilt_attend would: 0, rows left undone, TILT_KV_RANGE or TILT_KV_UNSUPPORTED, stopping after the
 * first attention that reports one; TILT_DECODE_BAD_OP for an unknown kind. */
void tilt_linear_team(const float *x, const float *wp, const float *b, float *y, int64_t M, int64_t N, int64_t K,
                      int swiglu); /* linear.c */
enum { DECODE_NORM = 0, DECODE_LINEAR = 1, DECODE_SWIGLU = 2, DECODE_ATTEND = 3, DECODE_OP = 18 };
int tilt_decode_layers(const int64_t *ops, int64_t n_ops, float *h, const float *rot, int64_t t) {
    for (int64_t i = 0; i < n_ops; i++) { /* checked before any thread starts */
        const int64_t *a = ops + i * DECODE_OP;
        if (a[0] < DECODE_NORM || a[0] > DECODE_ATTEND) return TILT_DECODE_BAD_OP;
        if (a[0] == DECODE_ATTEND && attend_supported(a[12], a[15], (const float *)a[16], (const float *)a[17]))
            return TILT_KV_UNSUPPORTED;
    }
    int bad = 0, over = 0;
#pragma omp parallel
    for (int64_t i = 0; i < n_ops; i++) {
        const int64_t *a = ops + i * DECODE_OP;
        switch (a[0]) {
        case DECODE_NORM: {
            float eps;
            const int32_t bits = (int32_t)a[5];
            memcpy(&eps, &bits, sizeof eps);
            add_rms_norm_team(h, (const float *)a[1], (float *)a[2], a[3], a[4], eps);
            break;
        }
        case DECODE_LINEAR:
        case DECODE_SWIGLU:
            tilt_linear_team((const float *)a[1], (const float *)a[2], (const float *)a[3], (float *)a[4], a[5], a[6],
                             a[7], a[0] == DECODE_SWIGLU);
            break;
        default:
            attend_team((const float *)a[1], rot, (void *)a[2], (void *)a[3], (const float *)a[4],
                        (const float *)a[5], (const uint8_t *)a[6], (float *)a[7], a[8], a[9], a[10], a[11], a[12],
                        a[13], a[14], t, a[15], (float *)a[16], (float *)a[17], &bad, &over);
#pragma omp barrier
            const int stop = bad || over; /* every thread reads the same counts between the two barriers */
#pragma omp barrier
            if (stop) i = n_ops;
        }
    }
    return bad ? bad : (over ? TILT_KV_RANGE : 0);
}

/* exp(x) for sampling weights: exactly 0 where fast_expf would clamp (x < -87), so a token whose
 * weight underflows is never drawn, as with torch's exp. */
static inline float weight_expf(float x) { return x < -87.0f ? 0.0f : fast_expf(x); }

static inline float scaled_logit(const float *l, int64_t j, float temperature, int scaled) {
    return scaled ? l[j] / temperature : l[j];
}

/* One token per row drawn from softmax(logits / temperature) by inverse transform sampling, and its
 * log-probability: tilt.rollout._pick's large-vocabulary path (log_softmax, exp, cumsum, searchsorted:
 * several walks of every row and three [N, V] tensors) in two and a fraction walks of each row and no
 * [N, V] tensor.
 *
 * x = logits / temperature; m = the largest x other than the banned token `ban` (-1: none; the banned
 * token is EOS before the minimum length, which the model may favour by far, so the weights are taken
 * relative to the tokens that can be drawn); w_j = exp(x_j - m), 0 for `ban`; S = sum of w. The token
 * is the first j whose running sum of w exceeds u[n] * S: the torch path's rule over exp(log-softmax),
 * so the two draw the same token except where u * S falls within rounding of a running sum. Sums run
 * over blocks of B elements and each block's sum is kept, so the walk that finds the token adds the
 * same block sums that made S; where rounding leaves no running sum above u * S, the last token with
 * weight (of the block, or of the row). logp[n] = x_tok - m - log(S + exp(x_ban - m)): the banned
 * token keeps its mass in the log-prob, as in the torch path (the two terms added as logarithms, so a
 * banned token far above the rest neither overflows nor cancels). Returns the number of rows with no
 * finite, positive weight (tok = -1 there; the caller takes the torch path). */
int tilt_sample_rows(const float *logits, const float *u, int64_t N, int64_t V, float temperature, int64_t ban,
                     int64_t *tok, float *logp) {
    const int64_t B = 512, nb = (V + B - 1) / B;
    const int scaled = temperature != 1.0f;
    int bad = 0;
#pragma omp parallel reduction(+ : bad)
    {
        float *bs = malloc((size_t)nb * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const float *l = logits + n * V;
            tok[n] = -1;
            if (!bs) { bad++; continue; }
            float m = -INFINITY; /* a compare and select: fmaxf's NaN rule keeps this loop from vectorising */
            if (scaled) {
#pragma omp simd reduction(max : m)
                for (int64_t j = 0; j < V; j++) {
                    const float x = j == ban ? -INFINITY : l[j] / temperature;
                    m = x > m ? x : m;
                }
            } else {
#pragma omp simd reduction(max : m)
                for (int64_t j = 0; j < V; j++) {
                    const float x = j == ban ? -INFINITY : l[j];
                    m = x > m ? x : m;
                }
            }
            double total = 0.0; /* block sums in float (vectorised), added up in double, as torch's CPU cumsum */
            for (int64_t b = 0; b < nb; b++) {
                const int64_t lo = b * B, hi = lo + B < V ? lo + B : V;
                float s = 0.0f;
                if (scaled) {
#pragma omp simd reduction(+ : s)
                    for (int64_t j = lo; j < hi; j++) s += j == ban ? 0.0f : weight_expf(l[j] / temperature - m);
                } else {
#pragma omp simd reduction(+ : s)
                    for (int64_t j = lo; j < hi; j++) s += j == ban ? 0.0f : weight_expf(l[j] - m);
                }
                bs[b] = s;
                total += s;
            }
            if (!isfinite(m) || !(total > 0.0) || !isfinite(total)) { bad++; continue; }
            const double target = (double)u[n] * total;
            int64_t pick = -1;
            double run = 0.0;
            for (int64_t b = 0; b < nb; b++) {
                if (!(run + bs[b] > target)) { run += bs[b]; continue; }
                const int64_t lo = b * B, hi = lo + B < V ? lo + B : V;
                int64_t last = -1;
                for (int64_t j = lo; j < hi; j++) {
                    const float w = j == ban ? 0.0f : weight_expf(scaled_logit(l, j, temperature, scaled) - m);
                    if (w > 0.0f) {
                        last = j;
                        run += w;
                        if (run > target) { pick = j; break; }
                    }
                }
                if (pick < 0) pick = last;
                break;
            }
            for (int64_t j = V - 1; pick < 0 && j >= 0; j--)
                if (j != ban && weight_expf(scaled_logit(l, j, temperature, scaled) - m) > 0.0f) pick = j;
            float lz = (float)log(total);
            if (ban >= 0 && ban < V) {
                const float d = scaled_logit(l, ban, temperature, scaled) - m;
                const float top = fmaxf(lz, d), low = fminf(lz, d);
                if (isnan(d)) lz = d;
                else if (isfinite(low)) lz = top + log1pf(expf(low - top));
                else lz = top;
            }
            tok[n] = pick;
            logp[n] = (scaled_logit(l, pick, temperature, scaled) - m) - lz;
        }
        free(bs);
    }
    return bad;
}
