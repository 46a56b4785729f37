/* The per-plane loops of BatchNorm (_norm_kernels): the two sums of a plane and the affine
 * write, float32 and float64.  Compiled into _norm_kernels for the baseline ISA and into
 * _norm_avx2 with -mavx2 -mfma, where the float32 sums are written with intrinsics.
 *
 * Eight independent float64 partial sums per quantity: a single accumulator is a serial
 * chain of dependent adds that the compiler may not reorder, and with a fused ReLU each
 * element also took a branch on the sign of the kept output, which a random sign
 * mispredicts half the time: BatchNorm2d+ReLU backward on (32, 32, 32, 32) took 10.4 ms
 * against 0.76 ms without the ReLU (1 thread).  Eight lanes vectorise (SSE2 pairs on the
 * baseline build) and the masked read is a bit mask, not a branch: 1.12 ms. */
#ifndef MICROTILE_BN_LOOPS_H
#define MICROTILE_BN_LOOPS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#define MT_BN_LANES 8
/* u where g > 0, else +0 (a NaN u included, as torch's threshold_backward), by masking
   u's bits: GCC turned the plain select into a branch, which random signs mispredict
   half the time. */
#define MT_BN_KEEP(T, uv, gv) mt_bn_keep_##T((uv), (gv))
static inline float mt_bn_keep_float(float u, float g) {
    uint32_t b;
    memcpy(&b, &u, sizeof b);
    b &= (uint32_t) 0 - (uint32_t) (g > 0);
    memcpy(&u, &b, sizeof b);
    return u;
}
static inline double mt_bn_keep_double(double u, double g) {
    uint64_t b;
    memcpy(&b, &u, sizeof b);
    b &= (uint64_t) 0 - (uint64_t) (g > 0);
    memcpy(&u, &b, sizeof b);
    return u;
}
#define MT_BN_SUMS(T, NAME)                                                         \
static inline void NAME(const T* x, const T* u, const T* g, double k, ptrdiff_t s, \
                 double* out0, double* out1) {                                      \
    double a0[MT_BN_LANES] = {0}, a1[MT_BN_LANES] = {0};                            \
    ptrdiff_t i = 0, l, e = s - s % MT_BN_LANES;                                   \
    if (u == NULL) {                                                                \
        for (; i < e; i += MT_BN_LANES)                                             \
            for (l = 0; l < MT_BN_LANES; l++) {                                     \
                double d = (double) x[i + l] - k;                                   \
                a0[l] += d;                                                         \
                a1[l] += d * d;                                                     \
            }                                                                       \
        for (; i < s; i++) {                                                        \
            double d = (double) x[i] - k;                                           \
            a0[0] += d;                                                             \
            a1[0] += d * d;                                                         \
        }                                                                           \
    } else if (g == NULL) {                                                         \
        for (; i < e; i += MT_BN_LANES)                                             \
            for (l = 0; l < MT_BN_LANES; l++) {                                     \
                double v = (double) u[i + l];                                       \
                a0[l] += v;                                                         \
                a1[l] += v * ((double) x[i + l] - k);                               \
            }                                                                       \
        for (; i < s; i++) {                                                        \
            double v = (double) u[i];                                               \
            a0[0] += v;                                                             \
            a1[0] += v * ((double) x[i] - k);                                       \
        }                                                                           \
    } else {                                                                        \
        for (; i < e; i += MT_BN_LANES)                                             \
            for (l = 0; l < MT_BN_LANES; l++) {                                     \
                double v = (double) MT_BN_KEEP(T, u[i + l], g[i + l]);              \
                a0[l] += v;                                                         \
                a1[l] += v * ((double) x[i + l] - k);                               \
            }                                                                       \
        for (; i < s; i++) {                                                        \
            double v = (double) MT_BN_KEEP(T, u[i], g[i]);                          \
            a0[0] += v;                                                             \
            a1[0] += v * ((double) x[i] - k);                                       \
        }                                                                           \
    }                                                                               \
    for (l = 1; l < MT_BN_LANES; l++) {                                             \
        a0[0] += a0[l];                                                             \
        a1[0] += a1[l];                                                             \
    }                                                                               \
    *out0 = a0[0];                                                                  \
    *out1 = a1[0];                                                                  \
}
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* The float32 sums with AVX2: eight floats a turn widened to two vectors of four doubles,
   the lanes those of the portable loop (element i + l in lane l), so the tail and the
   reduction below are the same code.  GCC's vectorisation of the eight-lane arrays mixed
   four-wide, two-wide and scalar double operations and spilled a lane to the stack
   (perf annotate): BatchNorm's sums were 37 % of a one-thread forward+backward. */
static inline void mt_bn_sums_f(const float* x, const float* u, const float* g, double k,
                                ptrdiff_t s, double* out0, double* out1) {
    __m256d s0l = _mm256_setzero_pd(), s0h = _mm256_setzero_pd();
    __m256d s1l = _mm256_setzero_pd(), s1h = _mm256_setzero_pd();
    const __m256d kk = _mm256_set1_pd(k);
    double a0[MT_BN_LANES], a1[MT_BN_LANES];
    ptrdiff_t i = 0, l, e = s - s % MT_BN_LANES;
    if (u == NULL) {
        for (; i < e; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            __m256d dl = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), kk);
            __m256d dh = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), kk);
            s0l = _mm256_add_pd(s0l, dl);
            s0h = _mm256_add_pd(s0h, dh);
            s1l = _mm256_fmadd_pd(dl, dl, s1l);
            s1h = _mm256_fmadd_pd(dh, dh, s1h);
        }
    } else {
        for (; i < e; i += 8) {
            __m256 v = _mm256_loadu_ps(u + i), w = _mm256_loadu_ps(x + i);
            __m256d vl, vh, dl, dh;
            if (g != NULL)      /* u where g > 0, else +0 (a NaN g too) */
                v = _mm256_and_ps(v, _mm256_cmp_ps(_mm256_loadu_ps(g + i),
                                                   _mm256_setzero_ps(), _CMP_GT_OQ));
            vl = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            vh = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            dl = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(w)), kk);
            dh = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)), kk);
            s0l = _mm256_add_pd(s0l, vl);
            s0h = _mm256_add_pd(s0h, vh);
            s1l = _mm256_fmadd_pd(vl, dl, s1l);
            s1h = _mm256_fmadd_pd(vh, dh, s1h);
        }
    }
    _mm256_storeu_pd(a0, s0l);
    _mm256_storeu_pd(a0 + 4, s0h);
    _mm256_storeu_pd(a1, s1l);
    _mm256_storeu_pd(a1 + 4, s1h);
    for (; i < s; i++) {
        double v, d = (double) x[i] - k;
        if (u == NULL) {
            a0[0] += d;
            a1[0] += d * d;
        } else {
            v = (double) (g == NULL ? u[i] : MT_BN_KEEP(float, u[i], g[i]));
            a0[0] += v;
            a1[0] += v * d;
        }
    }
    for (l = 1; l < MT_BN_LANES; l++) {
        a0[0] += a0[l];
        a1[0] += a1[l];
    }
    *out0 = a0[0];
    *out1 = a1[0];
}
#else
MT_BN_SUMS(float, mt_bn_sums_f)
#endif
MT_BN_SUMS(double, mt_bn_sums_d)
/* out = b*(x - m) + k, plus a*u when u is given (u read as 0 where g <= 0 when g is
   given); with relu (forward only) through ReLU as it is written, NaN kept. */
#define MT_BN_AFFINE(T, NAME)                                                       \
static inline void NAME(const T* x, const T* u, const T* g, T* out, double m,     \
                        double a,                                              \
                 double b, double k, int relu, ptrdiff_t s) {                      \
    ptrdiff_t i;                                                                   \
    if (u == NULL && relu) {                                                        \
        for (i = 0; i < s; i++) {                                                   \
            double v = ((double) x[i] - m) * b + k;                                 \
            out[i] = (T) (v <= 0 ? 0.0 : v);                                        \
        }                                                                           \
    } else if (u == NULL) {                                                         \
        for (i = 0; i < s; i++)                                                     \
            out[i] = (T) (((double) x[i] - m) * b + k);                             \
    } else if (g == NULL) {                                                         \
        for (i = 0; i < s; i++)                                                     \
            out[i] = (T) (a * (double) u[i] + ((double) x[i] - m) * b + k);         \
    } else {                                                                        \
        for (i = 0; i < s; i++) {                                                   \
            double v = (double) MT_BN_KEEP(T, u[i], g[i]);                          \
            out[i] = (T) (a * v + ((double) x[i] - m) * b + k);                     \
        }                                                                           \
    }                                                                               \
}
/* float32 data: the write in float32 arithmetic.  The mean goes in as two floats,
   mh + ml = m to 2^-48 relative: x - mh is exact for x near a large mean (Sterbenz),
   so x - m keeps its digits (float32 data around 1e4 with unit spread: rounding m
   alone gave errors of 4e-4), then a multiply-add (fused in the AVX2 build).  Through
   double, the conversions made the pass compute-bound: BatchNorm2d forward (32, 64, 56,
   56), one thread, 6.1 ms against 2.7 ms for a copy of the same bytes. */
static inline void mt_bn_affine_f(const float* x, const float* u, const float* g, float* out,
                           double m, double a, double b, double k, int relu,
                           ptrdiff_t s) {
    ptrdiff_t i;
    const float mh = (float) m, ml = (float) (m - (double) mh);
    const float af = (float) a, bf = (float) b, kf = (float) k;
    if (u == NULL && relu) {
        for (i = 0; i < s; i++) {
            float v = ((x[i] - mh) - ml) * bf + kf;
            out[i] = v <= 0 ? 0.0f : v;
        }
    } else if (u == NULL) {
        for (i = 0; i < s; i++)
            out[i] = ((x[i] - mh) - ml) * bf + kf;
    } else if (g == NULL) {
        for (i = 0; i < s; i++)
            out[i] = af * u[i] + (((x[i] - mh) - ml) * bf + kf);
    } else {
        for (i = 0; i < s; i++)
            out[i] = af * mt_bn_keep_float(u[i], g[i]) + (((x[i] - mh) - ml) * bf + kf);
    }
}
MT_BN_AFFINE(double, mt_bn_affine_d)

#endif
