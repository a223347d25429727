/* 16-float vectors for tilt's C kernels (attention.c, decode.c): GCC/clang vector extensions, which
 * compile to AVX-512 where the host has it and to narrower registers elsewhere. Included after a file
 * sets its floating-point contraction (GCC: fp-contract=fast), so these functions are compiled with it. */
#ifndef TILT_KERNELS_VEC16_H
#define TILT_KERNELS_VEC16_H
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* 16 floats as one vector (GCC/clang vector extension: AVX-512 where the host has it, else split) */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t v16i __attribute__((vector_size(64)));
#define LD(p) (*(const v16u *)(p))
#define ST(p, x) (*(v16u *)(p) = (x))

static const v16 IOTA = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* Inlining. The helpers here that only select, add or shuffle are always inlined (VINLINE): GCC otherwise kept them
 * as calls inside decode.c's attention, which is compiled without contraction while they were compiled with it (a
 * mismatch of optimize options, so GCC would not inline them), and every call spilled the caller's vector registers
 * (speed work 51). Their values cannot depend on contraction. expv multiplies and adds, so with AVX-512 it is written
 * with explicit fused multiply-adds, where the compiler contracted them before: the same values in any caller. */
#define VINLINE static inline __attribute__((always_inline))

/* a line asked for with the intent to write, by PREFETCHW written out: GCC 12.2 built attention.c's
 * __builtin_prefetch(x, 1, 2) as a plain PREFETCHT1 (no PREFETCHW anywhere in the library, though it emits one for
 * the same call in a small file); a CPU without the instruction decodes it as a no-op */
VINLINE void prefetch_write(const void *x) {
#if defined(__x86_64__) && defined(__GNUC__)
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)x));
#else
    __builtin_prefetch(x, 1, 2);
#endif
}

/* How far ahead SwiGLU's forward (decode.c's silu_mul_rows) and backward (forward.c) ask for rows, alongside each
 * row's own lines (speed work 55): in the learner's pass the [N, 2I] tensors come from memory, and a row of gu
 * (8 KB at I = 1024) spans two pages, where the hardware prefetcher stops; the rows written are asked for with
 * prefetch_write. At 10M x 64, alternating with the previous library over 8 updates: the forward 18.7 -> 14.8 ms
 * an update, the backward 23.5 -> 18.8 ms. Prefetches only: the same values. */
#define ROWS_AHEAD 2

/* a where m is set, else b (m: a comparison's all-ones / all-zeros lanes) */
VINLINE v16 sel(v16i m, v16 a, v16 b) { return (v16)((m & (v16i)a) | (~m & (v16i)b)); }

VINLINE float hsum(v16 v) {
    float t = 0.0f;
    for (int i = 0; i < 16; i++) t += v[i];
    return t;
}

/* common.h's fast_expf on 16 lanes (the same steps; NaN in, NaN out). With AVX-512 the clamp is a max and a min
 * (NaN as the second operand comes through) instead of two compare-and-blend selects, and 2^n is applied by
 * vscalefps instead of being built in the exponent bits: the same values (n stays within [-126, 127], where both
 * scalings are exact; checked bit for bit over 64M inputs) in fewer instructions (speed work 43). With AVX-512 the
 * steps are the portable code's below as GCC contracts them (fmadd(a, b, c) = a b + c rounded once; x - n c1 as
 * fmadd(n, -c1, x)), written out so that no caller's contraction setting changes them (see VINLINE). */
#if defined(__AVX512F__)
VINLINE v16 expv(v16 x) {
    const __m512 c = _mm512_set1_ps(12582912.0f);
    const __m512 v = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), (__m512)x));
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(1.44269504088896341f), c), c);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), v));
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.9875691500e-4f), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return (v16)_mm512_scalef_ps(e, n);
}
#else
static inline v16 expv(v16 x) {
    const v16 lo = IOTA * 0.0f - 87.0f, hi = IOTA * 0.0f + 88.0f;
    x = sel(x < lo, lo, x);
    x = sel(x > hi, hi, x);
    const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const v16 e = p * r * r + r + 1.0f;
    return e * (v16)((__builtin_convertvector(n, v16i) + 127) << 23);
}
#endif

/* The logistic sigmoid 1 / (1 + e^-x) on 16 lanes, exp by expv. With AVX-512 the reciprocal is the 14-bit
 * estimate (vrcp14ps) refined by one Newton step, r (2 - d r) as r + r (1 - d r): relative error below 2^-28
 * before rounding, in three instructions instead of a division (speed work 42); elsewhere a division. NaN in,
 * NaN out. */
static inline v16 sigmoidv(v16 x) {
    const v16 d = 1.0f + expv(-x);
#if defined(__AVX512F__)
    const v16 r = (v16)_mm512_rcp14_ps((__m512)d);
    return r + r * (1.0f - d * r);
#else
    return 1.0f / d;
#endif
}

/* Lanes of a and b picked by constant indices (0-15 from a, 16-31 from b): __builtin_shufflevector where the
 * compiler has it (clang, GCC 12 on), GCC's __builtin_shuffle with a mask vector before that. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif
#define LO1 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29
#define HI1 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31
#define LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LANES(a, b, c, d) 4 * (a), 4 * (a) + 1, 4 * (a) + 2, 4 * (a) + 3, 4 * (b), 4 * (b) + 1, 4 * (b) + 2, \
                          4 * (b) + 3, 4 * (c), 4 * (c) + 1, 4 * (c) + 2, 4 * (c) + 3, 4 * (d), 4 * (d) + 1,   \
                          4 * (d) + 2, 4 * (d) + 3

/* a > b ? a : b per lane (b where either is NaN): one vmaxps with AVX-512, whose rule is exactly this, instead of
 * a compare and a blend */
VINLINE v16 vmax2(v16 a, v16 b) {
#if defined(__AVX512F__)
    return (v16)_mm512_max_ps((__m512)a, (__m512)b);
#else
    return sel(a > b, a, b);
#endif
}
/* The maximum (vmax_all) and the sum (vsum_all) of v's 16 lanes, in every lane: a tree of four shuffles instead of
 * chains of fifteen dependent scalar steps (attention.c's softmax rows: its forward 5-10 % faster, speed work 45;
 * decode.c's row maximum, speed work 46). The sum adds in the tree's order, not hsum's. */
VINLINE v16 vmax_all(v16 v) {
    v = vmax2(v, SHUF(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = vmax2(v, SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = vmax2(v, SHUF(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    return vmax2(v, SHUF(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
}
VINLINE v16 vsum_all(v16 v) {
    v += SHUF(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SHUF(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    return v + SHUF(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
}

#endif
