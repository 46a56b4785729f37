/* The float32 activations of _act_math.h eight at a time with AVX2/FMA intrinsics, and the
 * loops of _act_loops.pxd that use them; included by _act_avx2 and by the AVX2 recurrent
 * cells (_rnn_cells.h), both built with -mavx2 -mfma.  Same formulas, constants and special
 * values as _act_math.h (the rounding differs by a few ulp: FMA, Estrin's order, 2^n
 * applied once), written so that each step is one instruction: GCC's vectorisation of the
 * scalar functions spent ~40 instructions per eight exps (the clamps became compare masks
 * applied at the end, the integer part a conversion; 0.55 ns per element on one core),
 * against about 20 here.
 *
 * Every element of a loop, the last partial vector included (masked loads and stores), goes
 * through the same vector code, so a result does not depend on where an element sits. */
#ifndef MICROTILE_ACT_SIMD_H
#define MICROTILE_ACT_SIMD_H

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdint.h>

#include "_act_math.h"      /* the tanh GELU's constants, the CDF's coefficients */

#define MT_ACT_SIMD 1

/* e^c for c already clamped to [-104, 88], times 2^BIAS: n = round(c / ln 2) from the bits
   of c / ln 2 + 1.5 * 2^23 (their low bits are n, so n << 23 is those bits shifted, the
   magic number's own bits falling off the top), e^r by its Taylor series to r^7, then
   2^(n + BIAS) made from n << 23 with one integer add.  The two callers keep n + BIAS a
   normal exponent.  The series by Estrin's scheme (pairs of terms, then pairs of pairs:
   depth 3 against Horner's 7) for the long chains of tanh and GELU, whose loops wait on
   latency: one core, ns per element, Horner -> Estrin: tanh 0.74 -> 0.68, GELU 1.29 ->
   1.22, its derivative 1.95 -> 1.82, the tanh GELU's derivative 0.99 -> 0.92; sigmoid,
   limited by throughput, 0.56 -> 0.58. */
static inline __m256 mt_exp8_biased(__m256 c, int bias) {
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    __m256 t, n, r, r2, r4, p01, p23, p45, p67, p;
    __m256i e;
    t = _mm256_fmadd_ps(c, _mm256_set1_ps(1.44269504f), magic);
    n = _mm256_sub_ps(t, magic);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), c);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068202862268e-06f), r);
    r2 = _mm256_mul_ps(r, r);
    p01 = _mm256_add_ps(r, _mm256_set1_ps(1.0f));
    p23 = _mm256_fmadd_ps(r, _mm256_set1_ps(1.6666667e-01f), _mm256_set1_ps(0.5f));
    p45 = _mm256_fmadd_ps(r, _mm256_set1_ps(8.3333338e-03f), _mm256_set1_ps(4.1666668e-02f));
    p67 = _mm256_fmadd_ps(r, _mm256_set1_ps(1.9841270e-04f), _mm256_set1_ps(1.3888889e-03f));
    r4 = _mm256_mul_ps(r2, r2);
    p01 = _mm256_fmadd_ps(r2, p23, p01);
    p45 = _mm256_fmadd_ps(r2, p67, p45);
    p = _mm256_fmadd_ps(r4, p45, p01);
    e = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23),
                         _mm256_set1_epi32((127 + bias) << 23));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* e^x for x <= 0 (the CDF's e^(-z^2), the sigmoid's e^-|v|), x clamped below at -104
   (NaN passes: max returns its second operand when either is NaN).  2^n is applied as
   2^(n + 64) (normal for every n >= -150) times 2^-64, so a subnormal result is rounded
   once, as by the scalar mt_expf_fast's two halves of n; that split took seven integer
   instructions of the loop's ~25, this two (one core, ns per element: sigmoid 0.65 ->
   0.56, tanh 0.85 -> 0.74, with tanh's exp below). */
static inline __m256 mt_exp8_nonpos(__m256 x) {
    __m256 c = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);
    return _mm256_mul_ps(mt_exp8_biased(c, 64), _mm256_set1_ps(5.421010862427522e-20f));
}

/* e^x for x >= 0 (tanh's e^(2|v|)), x clamped to [0, 88]: 2^n is normal as it is. */
static inline __m256 mt_exp8_pos(__m256 x) {
    __m256 c = _mm256_max_ps(_mm256_setzero_ps(), x);
    c = _mm256_min_ps(_mm256_set1_ps(88.0f), c);
    return mt_exp8_biased(c, 0);
}

static inline __m256 mt_abs8(__m256 v) {
    return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
}

/* 1 / (1 + e) for v >= 0, e / (1 + e) below, e = e^-|v|: the numerator chosen, one
   division.  -|v| is v with its sign bit set (a NaN stays a NaN), never above 0. */
static inline __m256 mt_sigmoid8(__m256 v) {
    __m256 e = mt_exp8_nonpos(_mm256_or_ps(v, _mm256_set1_ps(-0.0f)));
    __m256 ge = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ);
    return _mm256_div_ps(_mm256_blendv_ps(e, _mm256_set1_ps(1.0f), ge),
                         _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* The odd polynomial below |v| = 0.55, 1 - 2 / (e^(2|v|) + 1) above, v's sign put back. */
static inline __m256 mt_tanh8(__m256 v) {
    __m256 a = mt_abs8(v), z = _mm256_mul_ps(v, v), q, small, big;
    q = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.0063564959f), _mm256_set1_ps(0.021127241f));
    q = _mm256_fmadd_ps(z, q, _mm256_set1_ps(-0.053865079f));
    q = _mm256_fmadd_ps(z, q, _mm256_set1_ps(0.133327f));
    q = _mm256_fmadd_ps(z, q, _mm256_set1_ps(-0.33333319f));
    small = _mm256_fmadd_ps(_mm256_mul_ps(a, z), q, a);
    big = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f),
          _mm256_add_ps(mt_exp8_pos(_mm256_add_ps(a, a)), _mm256_set1_ps(1.0f))));
    a = _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.55f), _CMP_LT_OQ));
    return _mm256_or_ps(a, _mm256_and_ps(v, _mm256_set1_ps(-0.0f)));
}

/* The standard normal CDF, as mt_phif_fast: t P(t) E left of 0, one minus it right of 0,
   E = e^(-z^2) (NaN propagates; Phi(-inf) = 0, Phi(inf) = 1); E is handed back for
   GELU's derivative, whose other term is E / sqrt(2 pi).  P by Estrin's scheme (pairs,
   then pairs of pairs).  E does not wait for P, unlike the exp(q(t) - z^2) of Numerical
   Recipes' erfcc that this replaced, whose chain from v to the result was ~120 cycles:
   one core, ns per element, two runs, GELU 1.09-1.28 -> 0.98-1.01, its derivative
   (which took a second exp for phi) 1.52-1.59 -> 1.10-1.15. */
static inline __m256 mt_phi8(__m256 v, __m256* e_out) {
    __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f));
    __m256 a = mt_abs8(z), t, t2, t4, p01, p23, p45, p67, p89, e, h;
    t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                      _mm256_fmadd_ps(_mm256_set1_ps(0.5f), a, _mm256_set1_ps(1.0f)));
    t2 = _mm256_mul_ps(t, t);
    p01 = _mm256_fmadd_ps(t, _mm256_set1_ps(MT_PHI_P1), _mm256_set1_ps(MT_PHI_P0));
    p23 = _mm256_fmadd_ps(t, _mm256_set1_ps(MT_PHI_P3), _mm256_set1_ps(MT_PHI_P2));
    p45 = _mm256_fmadd_ps(t, _mm256_set1_ps(MT_PHI_P5), _mm256_set1_ps(MT_PHI_P4));
    p67 = _mm256_fmadd_ps(t, _mm256_set1_ps(MT_PHI_P7), _mm256_set1_ps(MT_PHI_P6));
    p89 = _mm256_fmadd_ps(t, _mm256_set1_ps(MT_PHI_P9), _mm256_set1_ps(MT_PHI_P8));
    t4 = _mm256_mul_ps(t2, t2);
    p01 = _mm256_fmadd_ps(t2, p23, p01);
    p45 = _mm256_fmadd_ps(t2, p67, p45);
    p45 = _mm256_fmadd_ps(t4, p89, p45);
    e = mt_exp8_nonpos(_mm256_fnmadd_ps(z, z, _mm256_setzero_ps()));     /* -z^2 <= 0 */
    h = _mm256_mul_ps(_mm256_mul_ps(t, _mm256_fmadd_ps(t4, p45, p01)), e);
    *e_out = e;
    return _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), h), h,
                            _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ));
}

/* Lanes [0, n) of a partial vector, n < 8. */
static inline __m256i mt_lanes8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int) n),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* One loop per formula: OUT(v, g) from the input vector v (and dy's g when there is one).
   Two vectors per turn, the second formula in its own scope with its own v and g, so that
   the build's pre-allocation scheduling (-fschedule-insns for this module, setup.py) can
   interleave two independent chains: one core, ns per element, one vector per turn ->
   two: GELU 1.20 -> 1.03, its derivative 1.81 -> 1.47, sigmoid 0.57 -> 0.52, tanh 0.67
   -> 0.62 (without the scheduling pass, two per turn changed nothing: GCC emits the two
   chains one after the other). */
#define MT_ACT_LOOP(NAME, EXPR)                                                           \
static inline void NAME(const float* x, const float* dy, float* out, int64_t n) {        \
    int64_t i;                                                                            \
    __m256 v, g = _mm256_setzero_ps(), v2, g2 = _mm256_setzero_ps(), r1, r2;              \
    __m256i m;                                                                            \
    for (i = 0; i + 16 <= n; i += 16) {                                                   \
        v = _mm256_loadu_ps(x + i);                                                       \
        v2 = _mm256_loadu_ps(x + i + 8);                                                  \
        if (dy) {                                                                         \
            g = _mm256_loadu_ps(dy + i);                                                  \
            g2 = _mm256_loadu_ps(dy + i + 8);                                             \
        }                                                                                 \
        r1 = EXPR;                                                                        \
        {                                                                                 \
            __m256 v = v2, g = g2;                                                        \
            r2 = EXPR;                                                                    \
            (void) g;                                                                     \
        }                                                                                 \
        _mm256_storeu_ps(out + i, r1);                                                    \
        _mm256_storeu_ps(out + i + 8, r2);                                                \
    }                                                                                     \
    if (i + 8 <= n) {                                                                     \
        v = _mm256_loadu_ps(x + i);                                                       \
        if (dy) g = _mm256_loadu_ps(dy + i);                                              \
        _mm256_storeu_ps(out + i, EXPR);                                                  \
        i += 8;                                                                           \
    }                                                                                     \
    if (i < n) {                                                                          \
        m = mt_lanes8(n - i);                                                             \
        v = _mm256_maskload_ps(x + i, m);                                                 \
        if (dy) g = _mm256_maskload_ps(dy + i, m);                                        \
        _mm256_maskstore_ps(out + i, m, EXPR);                                            \
    }                                                                                     \
    (void) g;                   /* unused by the forward formulas */                      \
}

#define MT_ONE _mm256_set1_ps(1.0f)
#define MT_HALF _mm256_set1_ps(0.5f)

/* sigmoid, tanh; their derivatives are polynomials of the output (plain loops suffice). */
MT_ACT_LOOP(mt_sigmoid_loop8, mt_sigmoid8(v))
MT_ACT_LOOP(mt_tanh_loop8, mt_tanh8(v))

/* GELU (exact): v Phi(v); backward dy (Phi(v) + v phi(v)), phi(v) = e^(-v^2/2) / sqrt(2 pi),
   taken from the CDF's own E = e^(-z^2). */
static inline __m256 mt_gelu8(__m256 v) {
    __m256 e;
    return _mm256_mul_ps(v, mt_phi8(v, &e));
}
static inline __m256 mt_gelu_grad8(__m256 v, __m256 g) {
    __m256 e, cdf = mt_phi8(v, &e);
    return _mm256_mul_ps(g, _mm256_fmadd_ps(
        _mm256_mul_ps(v, _mm256_set1_ps(0.39894228040143268f)), e, cdf));
}
MT_ACT_LOOP(mt_gelu_loop8, mt_gelu8(v))
MT_ACT_LOOP(mt_gelu_grad_loop8, mt_gelu_grad8(v, g))

/* GELU (tanh): 0.5 v (1 + tanh(u)) = v sigmoid(2u), u = beta (v + kappa v^3), written
   as 2u = v (2 beta + 2 beta kappa v^2).  The sigmoid costs what tanh's exp branch alone
   does (no polynomial for small arguments, no sign) and keeps the far left tail that
   1 + tanh(u) cancels to 0.  Backward: with s = sigmoid(2u), 0.5 (1 + t) = s and
   1 - t^2 = 4 s (1 - s), so dy (s + v s (1 - s) (2 beta + 6 beta kappa v^2)). */
static inline __m256 mt_gelu_tanh_u8(__m256 v) {
    return _mm256_mul_ps(v, _mm256_fmadd_ps(_mm256_set1_ps(MT_GELU_TANH_C3),
                                            _mm256_mul_ps(v, v),
                                            _mm256_set1_ps(MT_GELU_TANH_C1)));
}
static inline __m256 mt_gelu_tanh_grad8(__m256 v, __m256 g) {
    __m256 s = mt_sigmoid8(mt_gelu_tanh_u8(v));
    __m256 du = _mm256_fmadd_ps(_mm256_set1_ps(3.0f * MT_GELU_TANH_C3), _mm256_mul_ps(v, v),
                                _mm256_set1_ps(MT_GELU_TANH_C1));
    __m256 w = _mm256_mul_ps(_mm256_mul_ps(v, s), _mm256_sub_ps(MT_ONE, s));
    return _mm256_mul_ps(g, _mm256_fmadd_ps(w, du, s));
}
MT_ACT_LOOP(mt_gelu_tanh_loop8, _mm256_mul_ps(v, mt_sigmoid8(mt_gelu_tanh_u8(v))))
MT_ACT_LOOP(mt_gelu_tanh_grad_loop8, mt_gelu_tanh_grad8(v, g))

/* SiLU: v sigmoid(v); backward dy s (1 + v (1 - s)). */
static inline __m256 mt_silu_grad8(__m256 v, __m256 g) {
    __m256 s = mt_sigmoid8(v);
    return _mm256_mul_ps(_mm256_mul_ps(g, s),
                         _mm256_fmadd_ps(v, _mm256_sub_ps(MT_ONE, s), MT_ONE));
}
MT_ACT_LOOP(mt_silu_loop8, _mm256_mul_ps(v, mt_sigmoid8(v)))
MT_ACT_LOOP(mt_silu_grad_loop8, mt_silu_grad8(v, g))

#endif
#endif
