/* The float32 activations of _act_math.h eight at a time with AVX2/FMA intrinsics, and the
 * loops of _act_loops.pxd that use them; included only by _act_avx2 (built with -mavx2
 * -mfma).  Same formulas, constants and special values as _act_math.h, written so that each
 * step is one instruction: GCC's vectorisation of the scalar functions spent ~40
 * instructions per eight exps (the clamps became compare masks applied at the end, the
 * integer part a conversion; 0.55 ns per element on one core), against 22 here.
 *
 * Every element of a loop, the last partial vector included (masked loads and stores), goes
 * through the same vector code, so a result does not depend on where an element sits. */
#ifndef MICROTILE_ACT_SIMD_H
#define MICROTILE_ACT_SIMD_H

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdint.h>

#define MT_ACT_SIMD 1

/* e^x, x clamped to [-104, 88] (NaN passes: min and max return their second operand when
   either is NaN), n = round(x / ln 2) from the bits of x / ln 2 + 1.5 * 2^23, e^r by its
   Taylor series to r^7, 2^n as two normal powers of two (so n may go below -126). */
static inline __m256 mt_exp8(__m256 x) {
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    __m256 c = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    __m256 t, n, r, p;
    __m256i ni, n1, n2;
    c = _mm256_max_ps(_mm256_set1_ps(-104.0f), c);
    t = _mm256_fmadd_ps(c, _mm256_set1_ps(1.44269504f), magic);
    n = _mm256_sub_ps(t, magic);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), c);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068202862268e-06f), r);
    p = _mm256_fmadd_ps(r, _mm256_set1_ps(1.9841270e-04f), _mm256_set1_ps(1.3888889e-03f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(8.3333338e-03f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(4.1666668e-02f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.6666667e-01f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.0f));
    ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic));
    n1 = _mm256_srai_epi32(ni, 1);
    n2 = _mm256_sub_epi32(ni, n1);
    n1 = _mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23);
    n2 = _mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(n1));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(n2));
}

static inline __m256 mt_abs8(__m256 v) {
    return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
}

/* 1 / (1 + e) for v >= 0, e / (1 + e) below, e = e^-|v|. */
static inline __m256 mt_sigmoid8(__m256 v) {
    __m256 e = mt_exp8(_mm256_xor_ps(mt_abs8(v), _mm256_set1_ps(-0.0f)));
    __m256 d = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    __m256 ge = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ);
    return _mm256_blendv_ps(_mm256_mul_ps(e, d), d, ge);
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
          _mm256_add_ps(mt_exp8(_mm256_add_ps(a, a)), _mm256_set1_ps(1.0f))));
    a = _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.55f), _CMP_LT_OQ));
    return _mm256_or_ps(a, _mm256_and_ps(v, _mm256_set1_ps(-0.0f)));
}

/* The standard normal CDF, as mt_phif_fast: the Maclaurin series of erf below |z| = 0.75,
   t exp(q(t) - z^2) above (NaN propagates through both; Phi(-inf) = 0, Phi(inf) = 1). */
static inline __m256 mt_phi8(__m256 v) {
    __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f));
    __m256 a = mt_abs8(z), s = _mm256_mul_ps(z, z), e, t, q, h, big;
    e = _mm256_fmadd_ps(s, _mm256_set1_ps(1.6462114365e-06f), _mm256_set1_ps(-1.4925650358e-05f));
    e = _mm256_fmadd_ps(s, e, _mm256_set1_ps(0.00012055332982f));
    e = _mm256_fmadd_ps(s, e, _mm256_set1_ps(-0.00085483270234f));
    e = _mm256_fmadd_ps(s, e, _mm256_set1_ps(0.0052239776254f));
    e = _mm256_fmadd_ps(s, e, _mm256_set1_ps(-0.026866170645f));
    e = _mm256_fmadd_ps(s, e, _mm256_set1_ps(0.11283791671f));
    e = _mm256_fmadd_ps(s, e, _mm256_set1_ps(-0.37612638903f));
    e = _mm256_fmadd_ps(s, e, _mm256_set1_ps(1.1283791671f));
    e = _mm256_mul_ps(z, e);
    t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                      _mm256_fmadd_ps(_mm256_set1_ps(0.5f), a, _mm256_set1_ps(1.0f)));
    q = _mm256_fmadd_ps(t, _mm256_set1_ps(0.17087277f), _mm256_set1_ps(-0.82215223f));
    q = _mm256_fmadd_ps(t, q, _mm256_set1_ps(1.48851587f));
    q = _mm256_fmadd_ps(t, q, _mm256_set1_ps(-1.13520398f));
    q = _mm256_fmadd_ps(t, q, _mm256_set1_ps(0.27886807f));
    q = _mm256_fmadd_ps(t, q, _mm256_set1_ps(-0.18628806f));
    q = _mm256_fmadd_ps(t, q, _mm256_set1_ps(0.09678418f));
    q = _mm256_fmadd_ps(t, q, _mm256_set1_ps(0.37409196f));
    q = _mm256_fmadd_ps(t, q, _mm256_set1_ps(1.00002368f));
    q = _mm256_fmadd_ps(t, q, _mm256_set1_ps(-1.26551223f));
    h = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), t),
                      mt_exp8(_mm256_fnmadd_ps(a, a, q)));
    big = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), h), h,
                           _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_blendv_ps(big, _mm256_fmadd_ps(_mm256_set1_ps(0.5f), e,
                                                 _mm256_set1_ps(0.5f)),
                            _mm256_cmp_ps(a, _mm256_set1_ps(0.75f), _CMP_LT_OQ));
}

/* Lanes [0, n) of a partial vector, n < 8. */
static inline __m256i mt_lanes8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int) n),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* One loop per formula: OUT(v, g) from the input vector v (and dy's g when there is one). */
#define MT_ACT_LOOP(NAME, EXPR)                                                           \
static void NAME(const float* x, const float* dy, float* out, int64_t n) {               \
    int64_t i;                                                                            \
    __m256 v, g = _mm256_setzero_ps();                                                    \
    __m256i m;                                                                            \
    for (i = 0; i + 8 <= n; i += 8) {                                                     \
        v = _mm256_loadu_ps(x + i);                                                       \
        if (dy) g = _mm256_loadu_ps(dy + i);                                              \
        _mm256_storeu_ps(out + i, EXPR);                                                  \
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

/* GELU (exact): v Phi(v); backward dy (Phi(v) + v phi(v)), phi(v) = e^(-v^2/2) / sqrt(2 pi). */
static inline __m256 mt_gelu_grad8(__m256 v, __m256 g) {
    __m256 pdf = _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f),
                               mt_exp8(_mm256_mul_ps(_mm256_set1_ps(-0.5f),
                                                     _mm256_mul_ps(v, v))));
    return _mm256_mul_ps(g, _mm256_fmadd_ps(v, pdf, mt_phi8(v)));
}
MT_ACT_LOOP(mt_gelu_loop8, _mm256_mul_ps(v, mt_phi8(v)))
MT_ACT_LOOP(mt_gelu_grad_loop8, mt_gelu_grad8(v, g))

/* GELU (tanh): 0.5 v (1 + t), t = tanh(beta (v + kappa v^3)); backward
   dy (0.5 (1 + t) + 0.5 v (1 - t^2) beta (1 + 3 kappa v^2)). */
static inline __m256 mt_gelu_tanh_t8(__m256 v) {
    __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
    return mt_tanh8(_mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f),
                                  _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v)));
}
static inline __m256 mt_gelu_tanh_grad8(__m256 v, __m256 g) {
    __m256 t = mt_gelu_tanh_t8(v);
    __m256 u = _mm256_mul_ps(_mm256_mul_ps(MT_HALF, v), _mm256_fnmadd_ps(t, t, MT_ONE));
    __m256 w = _mm256_fmadd_ps(_mm256_set1_ps(3.0f * 0.044715f), _mm256_mul_ps(v, v), MT_ONE);
    u = _mm256_mul_ps(_mm256_mul_ps(u, _mm256_set1_ps(0.79788456080286536f)), w);
    return _mm256_mul_ps(g, _mm256_fmadd_ps(MT_HALF, _mm256_add_ps(MT_ONE, t), u));
}
MT_ACT_LOOP(mt_gelu_tanh_loop8,
            _mm256_mul_ps(_mm256_mul_ps(MT_HALF, v), _mm256_add_ps(MT_ONE, mt_gelu_tanh_t8(v))))
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
