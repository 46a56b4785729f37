/* One step of every Winograd transform (see _winograd_transforms.pxi): R output rows of n
 * contiguous values, each a combination of the same Q input rows,
 *
 *     dst[i*dstep + t] = base + sum_q cf[i*Q + q] * src[q*sstep + t]      (i < R, t < n)
 *
 * with R and Q compile-time constants for the shapes the transforms use (alpha = 4 or 6,
 * m = 2 or 4, r = 3), so the compiler unrolls i and q and vectorises over t: each vector of
 * t loads its Q inputs once and stores its R outputs once.  Row by row (one output row at a
 * time, a pass over it per nonzero coefficient) the same F(4x4) input transform took ~2.5x
 * the instructions (callgrind, C64 56x56 batch 8).  Zero coefficients are multiplied like
 * the others: fewer passes over memory matter more than the FMAs they save.
 *
 * Compiled in each translation unit that includes it (the baseline one and the -mavx2 -mfma
 * one), so each gets its own vector width. */
#ifndef MICROTILE_WINOGRAD_APPLY_H
#define MICROTILE_WINOGRAD_APPLY_H

#include <stddef.h>

#if defined(_MSC_VER)
#define WINO_RESTRICT __restrict
#else
#define WINO_RESTRICT __restrict__
#endif
/* The i and q loops must be gone before the vectoriser looks at the t loop (GCC left the
 * 6 x 6 case's nested, so it ran scalar). */
/* The R output rows never overlap (callers' contract), but the compiler cannot know that
 * dstep >= n: without ivdep GCC wants 15 run-time overlap checks for 6 rows, over its limit
 * of 10, and leaves the loop scalar. */
#if defined(__clang__)
#define WINO_UNROLL _Pragma("unroll 8")
#define WINO_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define WINO_UNROLL _Pragma("GCC unroll 8")
#define WINO_IVDEP _Pragma("GCC ivdep")
#else
#define WINO_UNROLL
#define WINO_IVDEP
#endif

#define WINO_APPLY_RQ(T, SUF, R, Q)                                                          \
static inline void wino_apply_##SUF##_##R##_##Q(T *WINO_RESTRICT dst, ptrdiff_t dstep,      \
        const T *WINO_RESTRICT src, ptrdiff_t sstep, const double *cf, ptrdiff_t n, T base) \
{                                                                                            \
    WINO_IVDEP                                                                               \
    for (ptrdiff_t t = 0; t < n; t++) {                                                      \
        T s[Q];                                                                              \
        WINO_UNROLL                                                                          \
        for (int q = 0; q < Q; q++)                                                          \
            s[q] = src[q * sstep + t];                                                       \
        WINO_UNROLL                                                                          \
        for (int i = 0; i < R; i++) {                                                        \
            T acc = base;                                                                    \
            WINO_UNROLL                                                                      \
            for (int q = 0; q < Q; q++)                                                      \
                acc += (T) cf[i * Q + q] * s[q];                                             \
            dst[i * dstep + t] = acc;                                                        \
        }                                                                                    \
    }                                                                                        \
}

#define WINO_APPLY_ALL(T, SUF)                                                               \
WINO_APPLY_RQ(T, SUF, 6, 6)                                                                  \
WINO_APPLY_RQ(T, SUF, 4, 4)                                                                  \
WINO_APPLY_RQ(T, SUF, 4, 6)                                                                  \
WINO_APPLY_RQ(T, SUF, 2, 4)                                                                  \
WINO_APPLY_RQ(T, SUF, 6, 3)                                                                  \
WINO_APPLY_RQ(T, SUF, 4, 3)                                                                  \
static inline void wino_apply_##SUF(T *dst, ptrdiff_t dstep, const T *src, ptrdiff_t sstep,  \
        const double *cf, int rows, int ncf, ptrdiff_t n, T base)                            \
{                                                                                            \
    if (rows == 6 && ncf == 6)                                                               \
        wino_apply_##SUF##_6_6(dst, dstep, src, sstep, cf, n, base);                         \
    else if (rows == 4 && ncf == 4)                                                          \
        wino_apply_##SUF##_4_4(dst, dstep, src, sstep, cf, n, base);                         \
    else if (rows == 4 && ncf == 6)                                                          \
        wino_apply_##SUF##_4_6(dst, dstep, src, sstep, cf, n, base);                         \
    else if (rows == 2 && ncf == 4)                                                          \
        wino_apply_##SUF##_2_4(dst, dstep, src, sstep, cf, n, base);                         \
    else if (rows == 6 && ncf == 3)                                                          \
        wino_apply_##SUF##_6_3(dst, dstep, src, sstep, cf, n, base);                         \
    else if (rows == 4 && ncf == 3)                                                          \
        wino_apply_##SUF##_4_3(dst, dstep, src, sstep, cf, n, base);                         \
    else {                                                                                   \
        for (int i = 0; i < rows; i++)                                                       \
            for (ptrdiff_t t = 0; t < n; t++) {                                              \
                T acc = base;                                                                \
                for (int q = 0; q < ncf; q++)                                                \
                    acc += (T) cf[i * ncf + q] * src[q * sstep + t];                         \
                dst[i * dstep + t] = acc;                                                    \
            }                                                                                \
    }                                                                                        \
}

WINO_APPLY_ALL(float, f)
WINO_APPLY_ALL(double, d)

/* The a x a window of a tile that lies inside x (element strides xs2 along rows, xs3
 * along columns) into column tl of D: D[(r*a + s)*tb] = x0[r*xs2 + s*xs3].  With a fixed
 * the 36 (or 16) copies unroll: through the generic loops this scalar gather took ~3x the
 * instructions. */
#define WINO_GATHER(T, SUF, A)                                                               \
static inline void wino_gather_##SUF##_##A(T *WINO_RESTRICT D, ptrdiff_t tb,                \
        const T *WINO_RESTRICT x0, ptrdiff_t xs2, ptrdiff_t xs3)                             \
{                                                                                            \
    WINO_UNROLL                                                                              \
    for (int r = 0; r < A; r++) {                                                            \
        const T *row = x0 + r * xs2;                                                         \
        if (xs3 == 1) {                                                                      \
            WINO_UNROLL                                                                      \
            for (int s = 0; s < A; s++)                                                      \
                D[(r * A + s) * tb] = row[s];                                                \
        } else {                                                                             \
            WINO_UNROLL                                                                      \
            for (int s = 0; s < A; s++)                                                      \
                D[(r * A + s) * tb] = row[s * xs3];                                          \
        }                                                                                    \
    }                                                                                        \
}

/* The m x m outputs of a tile that lies inside y (row length ldy) from column tl of O:
 * y0[i*ldy + j] = O[(i*m + j)*tb]. */
#define WINO_SCATTER(T, SUF, M)                                                              \
static inline void wino_scatter_##SUF##_##M(T *WINO_RESTRICT y0, ptrdiff_t ldy,            \
        const T *WINO_RESTRICT O, ptrdiff_t tb)                                              \
{                                                                                            \
    WINO_UNROLL                                                                              \
    for (int i = 0; i < M; i++) {                                                            \
        WINO_UNROLL                                                                          \
        for (int j = 0; j < M; j++)                                                          \
            y0[i * ldy + j] = O[(i * M + j) * tb];                                           \
    }                                                                                        \
}

#define WINO_MOVES(T, SUF)                                                                   \
WINO_GATHER(T, SUF, 6)                                                                       \
WINO_GATHER(T, SUF, 4)                                                                       \
WINO_SCATTER(T, SUF, 4)                                                                      \
WINO_SCATTER(T, SUF, 2)                                                                      \
static inline void wino_gather_##SUF(T *D, ptrdiff_t tb, const T *x0, ptrdiff_t xs2,        \
        ptrdiff_t xs3, int a)                                                                \
{                                                                                            \
    if (a == 6)                                                                              \
        wino_gather_##SUF##_6(D, tb, x0, xs2, xs3);                                          \
    else                                                                                     \
        wino_gather_##SUF##_4(D, tb, x0, xs2, xs3);                                          \
}                                                                                            \
static inline void wino_scatter_##SUF(T *y0, ptrdiff_t ldy, const T *O, ptrdiff_t tb, int m) \
{                                                                                            \
    if (m == 4)                                                                              \
        wino_scatter_##SUF##_4(y0, ldy, O, tb);                                              \
    else                                                                                     \
        wino_scatter_##SUF##_2(y0, ldy, O, tb);                                              \
}

WINO_MOVES(float, f)
WINO_MOVES(double, d)

#endif
