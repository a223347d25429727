/* fast_expf: the scalar exp of tilt/kernels/decode.c (its 16-lane code uses vec16.h's expv). */
#ifndef TILT_KERNELS_COMMON_H
#define TILT_KERNELS_COMMON_H
#include <stdint.h>
#include <string.h>

/* exp(x) in a form the compiler vectorises (libm's expf is one scalar call per element): x = n ln2 + r
 * with |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite), exp(r) = 1 + r + r^2 p(r) with Cephes' expf
 * coefficients for p, times 2^n built in the exponent bits. At most 0.99 float ulps from the correctly
 * rounded exp over 2e7 points of [-87, 88] (benchmarks/README.md, speed work 30); arguments are
 * clamped to that range, so exp of a very negative number is about 1e-38 instead of 0 (its weight in
 * a softmax sum is nil). */
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* n = round(x / ln2) by the float-add trick (1.5 * 2^23 pushes the fraction out; |x / ln2| < 2^22
     * here); floorf would keep the loop from vectorising */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two;
    memcpy(&two, &bits, sizeof two);
    return e * two;
}

#endif
