/* float32 exp, sigmoid, tanh and the normal CDF without a libm call (see _act_math.pxd),
 * in a header so that the C of other kernels (the recurrent cells, _rnn_cells.h) can call
 * them as well as the Cython that cimports _act_math. */
#ifndef MICROTILE_ACT_MATH_H
#define MICROTILE_ACT_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x for x in [-104, 88] (clamped outside: 0 below, as e^-104 rounds to 0 in float32;
   above, enough for tanh, which saturates long before), within about 2 ulp, with
   subnormal results; NaN stays NaN.  e^x = 2^n e^r with n = round(x / ln 2) and
   |r| <= ln(2) / 2; e^r by its Taylor series to r^7 (remainder under 6e-9, below one
   float32 ulp); ln 2 split in two so that r is exact; 2^n applied as two normal powers
   of two so that n may go below -126. */
static inline float mt_pow2i(int32_t n) {
    float f;
    int32_t bits = (n + 127) << 23;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline float mt_expf_fast(float x) {
    float c, n, r, p;
    int32_t n1, n2;
    /* Clamped the way minps and maxps compute it (a NaN x gives the bound), so n is
       always finite and the loop vectorises to min, max and a single blend that puts a
       NaN back at the end: with NaN kept through the clamps GCC evaluated the
       polynomial twice and blended (sigmoid 1.32 ns per element on one core). */
    c = x < 88.0f ? x : 88.0f;
    c = c > -104.0f ? c : -104.0f;
    /* round(c / ln 2) by adding and subtracting 1.5 * 2^23: plain float arithmetic
       that vectorises on SSE2, where floorf is a call (no roundps before SSE4.1). */
    n = (c * 1.44269504f + 12582912.0f) - 12582912.0f;
    r = (c - n * 0.693145751953125f) - n * 1.4286068202862268e-06f;
    p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-01f + r * (4.1666668e-02f
        + r * (8.3333338e-03f + r * (1.3888889e-03f + r * 1.9841270e-04f))))));
    n1 = (int32_t) n >> 1;              /* n in [-150, 127]: both halves normal */
    n2 = (int32_t) n - n1;
    p = p * mt_pow2i(n1) * mt_pow2i(n2);
    return x != x ? x : p;
}
/* sigmoid from e = e^-|v| <= 1 only (no overflow): 1 / (1 + e) for v >= 0, e / (1 + e)
   below, so tiny results keep their relative accuracy; the numerator is chosen and there
   is one division (a select between two values already computed, which GCC
   if-converts: a product that only one branch made kept the loop scalar). */
static inline float mt_sigmoidf_fast(float v) {
    float e = mt_expf_fast(-fabsf(v));
    return (v >= 0.0f ? 1.0f : e) / (1.0f + e);
}
/* tanh within about 2 ulp: an odd polynomial below |v| = 0.55 (least squares on the
   relative error, fitted for this file: 6e-8), 1 - 2 / (e^(2|v|) + 1) above; computed
   on |v|, v's sign put back (so tanh(-0) is -0).  Both parts are computed and one is
   selected, so a loop over it has no branch. */
static inline float mt_tanhf_fast(float v) {
    float a = fabsf(v), z = v * v;
    float small = a + a * z * (-0.33333319f + z * (0.133327f + z * (-0.053865079f
                  + z * (0.021127241f + z * -0.0063564959f))));
    float big = 1.0f - 2.0f / (mt_expf_fast(2.0f * a) + 1.0f);
    return copysignf(a < 0.55f ? small : big, v);
}
/* The standard normal CDF Phi(v) = erfc(-v / sqrt 2) / 2, for the exact GELU v Phi(v)
   and its derivative, within a few float32 ulp of its value (relative, so the tiny
   values far left keep their digits), branch-free.  z = v / sqrt 2 is rounded as torch
   rounds it.  erfc(|z|) / 2 = t P(t) e^(-z^2) with t = 1 / (1 + |z|/2) and P a degree-9
   polynomial fitted for this file to erfc(z) e^(z^2) / (2t) over z in [0, 10] (weighted
   least squares on the relative error, iterated towards minimax, the coefficients
   rounded to float32 one at a time with the rest refitted: 2.0e-8, as
   tools/fit_normal_cdf.py prints; beyond z = 10 the exponential is below 4e-44).
   Then that left of 0 and one minus it right of 0.  NaN stays NaN; Phi(-inf) = 0 and
   Phi(inf) = 1.  ``e`` receives e^(-z^2), the derivative's other term times
   sqrt(2 pi). */
/* P's coefficients, constant term first (AVX2's Estrin form in _act_simd.h takes them too). */
#define MT_PHI_P0 (0.14103224873542786f)
#define MT_PHI_P1 (0.14142853021621704f)
#define MT_PHI_P2 (0.11932235211133957f)
#define MT_PHI_P3 (0.11277102679014206f)
#define MT_PHI_P4 (-0.04915844276547432f)
#define MT_PHI_P5 (0.21063512563705444f)
#define MT_PHI_P6 (-0.3350071907043457f)
#define MT_PHI_P7 (0.21445992588996887f)
#define MT_PHI_P8 (-0.06162498891353607f)
#define MT_PHI_P9 (0.00614140322431922f)
static inline float mt_phif_e(float v, float* e) {
    float z = v * 0.70710678118654752f, a = fabsf(z);
    float t = 1.0f / (1.0f + 0.5f * a);
    float p = MT_PHI_P0 + t * (MT_PHI_P1 + t * (MT_PHI_P2 + t * (MT_PHI_P3 + t * (MT_PHI_P4
        + t * (MT_PHI_P5 + t * (MT_PHI_P6 + t * (MT_PHI_P7 + t * (MT_PHI_P8
        + t * MT_PHI_P9))))))));
    float h;
    *e = mt_expf_fast(-(z * z));
    h = t * p * *e;
    return z < 0.0f ? h : 1.0f - h;
}
static inline float mt_phif_fast(float v) {
    float e;
    return mt_phif_e(v, &e);
}
/* GELU's derivative Phi(v) + v e^(-v^2/2) / sqrt(2 pi), one exp for both terms. */
static inline float mt_gelu_gradf_fast(float v) {
    float e, cdf = mt_phif_e(v, &e);
    return cdf + v * 0.39894228040143268f * e;
}

/* The tanh GELU's argument to a sigmoid: 0.5 v (1 + tanh(u)) = v sigmoid(2u) with
   2u = v (C1 + C3 v^2), C1 = 2 sqrt(2 / pi) and C3 = C1 * 0.044715 (torch's kappa). */
#define MT_GELU_TANH_C1 1.5957691216057308f
#define MT_GELU_TANH_C3 0.071354816f
static inline float mt_gelu_tanhf_fast(float v) {
    return v * mt_sigmoidf_fast(v * (MT_GELU_TANH_C1 + MT_GELU_TANH_C3 * (v * v)));
}
static inline float mt_gelu_tanh_gradf_fast(float v) {
    float s = mt_sigmoidf_fast(v * (MT_GELU_TANH_C1 + MT_GELU_TANH_C3 * (v * v)));
    return s + v * s * (1.0f - s) * (MT_GELU_TANH_C1 + 3.0f * MT_GELU_TANH_C3 * (v * v));
}

/* float64: libm's exp, only of a non-positive number (no overflow for any input); NaN
   propagates. */
static inline double mt_sigmoid_d(double v) {
    double e;
    if (v >= 0.0)
        return 1.0 / (1.0 + exp(-v));
    e = exp(v);
    return e / (1.0 + e);
}

#endif
