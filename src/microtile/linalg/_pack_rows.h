/* A micro-panel of A from rows that are contiguous (row-major A): w rows rs apart, kc
 * columns, written k-major, dst[p*w + i] = src[i*rs + p] -- a w x kc transpose.
 *
 * The portable loop moves one element per load and store; here 4 (float) or 2 (double)
 * columns of every row are loaded as one vector and transposed in registers, so a float32
 * 6-row panel takes 6 loads and 8 stores per 24 elements instead of 24 of each.  Packing A
 * was 15 % of a one-thread 1600 x 128 x 1024 float32 product (perf), where each packed
 * element is used by only 8 micro-kernel calls.  SSE2 only, which every x86-64 has, so
 * the baseline build has it (GCC and Clang say so with __SSE2__, MSVC with _M_X64);
 * elsewhere the loop. */
#ifndef MICROTILE_PACK_ROWS_H
#define MICROTILE_PACK_ROWS_H

#include <stddef.h>
#if defined(__SSE2__) || defined(_M_X64)
#define MT_PACK_SSE2 1
#include <emmintrin.h>
#endif

static inline void mt_pack_rows_f(float* dst, const float* src, ptrdiff_t rs, ptrdiff_t kc,
                                  int w) {
    ptrdiff_t p = 0;
    int i;
#if defined(MT_PACK_SSE2)
    if (w == 6 || w == 4) {
        const float* r0 = src;
        const float* r1 = src + rs;
        const float* r2 = src + 2 * rs;
        const float* r3 = src + 3 * rs;
        for (; p + 4 <= kc; p += 4) {
            __m128 a0 = _mm_loadu_ps(r0 + p), a1 = _mm_loadu_ps(r1 + p);
            __m128 a2 = _mm_loadu_ps(r2 + p), a3 = _mm_loadu_ps(r3 + p);
            float* d = dst + p * w;
            _MM_TRANSPOSE4_PS(a0, a1, a2, a3);      /* a_j: rows 0-3 of column p + j */
            _mm_storeu_ps(d, a0);
            _mm_storeu_ps(d + w, a1);
            _mm_storeu_ps(d + 2 * w, a2);
            _mm_storeu_ps(d + 3 * w, a3);
            if (w == 6) {
                __m128 a4 = _mm_loadu_ps(src + 4 * rs + p), a5 = _mm_loadu_ps(src + 5 * rs + p);
                __m128 lo = _mm_unpacklo_ps(a4, a5);   /* rows 4, 5 of columns p, p+1 */
                __m128 hi = _mm_unpackhi_ps(a4, a5);   /* of columns p+2, p+3 */
                _mm_storel_pi((__m64*) (d + 4), lo);
                _mm_storeh_pi((__m64*) (d + 10), lo);
                _mm_storel_pi((__m64*) (d + 16), hi);
                _mm_storeh_pi((__m64*) (d + 22), hi);
            }
        }
    }
#endif
    for (; p < kc; p++)
        for (i = 0; i < w; i++)
            dst[p * w + i] = src[i * rs + p];
}

static inline void mt_pack_rows_d(double* dst, const double* src, ptrdiff_t rs, ptrdiff_t kc,
                                  int w) {
    ptrdiff_t p = 0;
    int i;
#if defined(MT_PACK_SSE2)
    if (w == 6 || w == 4) {
        for (; p + 2 <= kc; p += 2) {
            double* d = dst + p * w;
            for (i = 0; i < w; i += 2) {
                __m128d a = _mm_loadu_pd(src + i * rs + p);         /* row i, columns p, p+1 */
                __m128d b = _mm_loadu_pd(src + (i + 1) * rs + p);   /* row i+1 */
                _mm_storeu_pd(d + i, _mm_unpacklo_pd(a, b));
                _mm_storeu_pd(d + w + i, _mm_unpackhi_pd(a, b));
            }
        }
    }
#endif
    for (; p < kc; p++)
        for (i = 0; i < w; i++)
            dst[p * w + i] = src[i * rs + p];
}

#endif
