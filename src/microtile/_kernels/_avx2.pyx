"""AVX2/FMA kernels: the 6x16 (float32) and 6x8 (float64) GEMM micro-kernels, the
level-1/2 and sparse-row kernels, and the direct-convolution row kernels.

This translation unit is compiled with ``-mavx2 -mfma``, so the compiler may use those
instructions anywhere in it, module initialisation included: ``_dispatch`` imports it only
after CPUID and XGETBV confirm support.  The tables are handed over as a capsule.

The micro-kernel keeps the 6 x 16 (6 x 8) tile of C in twelve YMM accumulators; each step
of k broadcasts six elements of A and loads two vectors of B: one rank-1 update, twelve FMAs.
Two FMA pipes of latency 4 need at least eight independent accumulators: twelve keep both busy.
"""
from cpython.pycapsule cimport PyCapsule_New

from libc.stdint cimport int32_t, int64_t

from microtile._common._typedefs cimport idx_t, floating, sp_index
from microtile._kernels._ukernel cimport skernels_t, dkernels_t

cdef extern from "<immintrin.h>" nogil:
    ctypedef float __m256
    ctypedef double __m256d
    ctypedef float __m128
    ctypedef double __m128d
    __m256 _mm256_setzero_ps()
    __m256 _mm256_set1_ps(float)
    __m256 _mm256_loadu_ps(const float*)
    void _mm256_storeu_ps(float*, __m256)
    __m256 _mm256_broadcast_ss(const float*)
    __m256 _mm256_fmadd_ps(__m256, __m256, __m256)
    __m256 _mm256_mul_ps(__m256, __m256)
    __m256 _mm256_add_ps(__m256, __m256)
    __m128 _mm256_castps256_ps128(__m256)
    __m128 _mm256_extractf128_ps(__m256, int)
    __m128 _mm_add_ps(__m128, __m128)
    __m128 _mm_hadd_ps(__m128, __m128)
    float _mm_cvtss_f32(__m128)
    __m256d _mm256_setzero_pd()
    __m256d _mm256_set1_pd(double)
    __m256d _mm256_loadu_pd(const double*)
    void _mm256_storeu_pd(double*, __m256d)
    __m256d _mm256_broadcast_sd(const double*)
    __m256d _mm256_fmadd_pd(__m256d, __m256d, __m256d)
    __m256d _mm256_mul_pd(__m256d, __m256d)
    __m256d _mm256_add_pd(__m256d, __m256d)
    __m128d _mm256_castpd256_pd128(__m256d)
    __m128d _mm256_extractf128_pd(__m256d, int)
    __m128d _mm_add_pd(__m128d, __m128d)
    __m128d _mm_hadd_pd(__m128d, __m128d)
    double _mm_cvtsd_f64(__m128d)
    void _mm_prefetch(const char*, int)
    int _MM_HINT_T0
    ctypedef long long __m256i
    __m256i _mm256_set1_epi32(int)
    __m256i _mm256_setr_epi32(int, int, int, int, int, int, int, int)
    __m256i _mm256_cmpgt_epi32(__m256i, __m256i)
    __m256i _mm256_set1_epi64x(long long)
    __m256i _mm256_setr_epi64x(long long, long long, long long, long long)
    __m256i _mm256_cmpgt_epi64(__m256i, __m256i)
    __m256 _mm256_maskload_ps(const float*, __m256i)
    void _mm256_maskstore_ps(float*, __m256i, __m256)
    __m256d _mm256_maskload_pd(const double*, __m256i)
    void _mm256_maskstore_pd(double*, __m256i, __m256d)


# ----------------------------------------------------------------------------- float32 6x16

cdef inline void _s_row_out(float* c, idx_t cs_c, __m256 x0, __m256 x1, __m256 va,
                            float beta, __m256 vb) noexcept nogil:
    """Write one row of the tile: c = alpha * x + beta * c (c not read when beta == 0)."""
    cdef float tmp[16]
    cdef int j
    x0 = _mm256_mul_ps(va, x0)
    x1 = _mm256_mul_ps(va, x1)
    if cs_c == 1:
        if beta != 0.0:
            x0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c), x0)
            x1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c + 8), x1)
        _mm256_storeu_ps(c, x0)
        _mm256_storeu_ps(c + 8, x1)
    else:
        _mm256_storeu_ps(tmp, x0)
        _mm256_storeu_ps(tmp + 8, x1)
        if beta != 0.0:
            for j in range(16):
                c[j * cs_c] = tmp[j] + beta * c[j * cs_c]
        else:
            for j in range(16):
                c[j * cs_c] = tmp[j]


# One template for the tile and for fewer rows than it (the last row panel of a block:
# m = 32, 64, 128, 256 ... leave 2 or 4 over 6).  `rows` is a literal at every call, so each
# inlined copy keeps only its rows' registers, and each row's sums are made in the same
# order whatever the row count: an element of C gets the same bits in a partial panel as in
# a full one.  Before the rows kernel, a partial panel ran the full tile into a buffer and
# copied the valid rows out: at m = 32 that panel was 11 % of the time, for 2 rows in 32
# (perf, 32x1024x784).
cdef inline void _s_tile16(idx_t k, const float* a, idx_t rs_a, idx_t cs_a,
                           const float* b, idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                           float alpha, float beta, const int rows) noexcept nogil:
    cdef __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps()
    cdef __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps()
    cdef __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps()
    cdef __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps()
    cdef __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps()
    cdef __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps()
    cdef __m256 b0, b1, av
    cdef idx_t p
    cdef int i
    for i in range(rows):
        _mm_prefetch(<const char*> (c + i * rs_c), _MM_HINT_T0)
    for p in range(k):
        b0 = _mm256_loadu_ps(b)
        b1 = _mm256_loadu_ps(b + 8)
        av = _mm256_broadcast_ss(a)
        c00 = _mm256_fmadd_ps(av, b0, c00)
        c01 = _mm256_fmadd_ps(av, b1, c01)
        if rows > 1:
            av = _mm256_broadcast_ss(a + rs_a)
            c10 = _mm256_fmadd_ps(av, b0, c10)
            c11 = _mm256_fmadd_ps(av, b1, c11)
        if rows > 2:
            av = _mm256_broadcast_ss(a + 2 * rs_a)
            c20 = _mm256_fmadd_ps(av, b0, c20)
            c21 = _mm256_fmadd_ps(av, b1, c21)
        if rows > 3:
            av = _mm256_broadcast_ss(a + 3 * rs_a)
            c30 = _mm256_fmadd_ps(av, b0, c30)
            c31 = _mm256_fmadd_ps(av, b1, c31)
        if rows > 4:
            av = _mm256_broadcast_ss(a + 4 * rs_a)
            c40 = _mm256_fmadd_ps(av, b0, c40)
            c41 = _mm256_fmadd_ps(av, b1, c41)
        if rows > 5:
            av = _mm256_broadcast_ss(a + 5 * rs_a)
            c50 = _mm256_fmadd_ps(av, b0, c50)
            c51 = _mm256_fmadd_ps(av, b1, c51)
        a += cs_a
        b += rs_b
    cdef __m256 va = _mm256_set1_ps(alpha)
    cdef __m256 vb = _mm256_set1_ps(beta)
    _s_row_out(c, cs_c, c00, c01, va, beta, vb)
    if rows > 1:
        _s_row_out(c + rs_c, cs_c, c10, c11, va, beta, vb)
    if rows > 2:
        _s_row_out(c + 2 * rs_c, cs_c, c20, c21, va, beta, vb)
    if rows > 3:
        _s_row_out(c + 3 * rs_c, cs_c, c30, c31, va, beta, vb)
    if rows > 4:
        _s_row_out(c + 4 * rs_c, cs_c, c40, c41, va, beta, vb)
    if rows > 5:
        _s_row_out(c + 5 * rs_c, cs_c, c50, c51, va, beta, vb)


cdef void sgemm_6x16(idx_t k, const float* a, const float* b, float* c,
                     idx_t rs_c, idx_t cs_c, float alpha, float beta) noexcept nogil:
    _s_tile16(k, a, 1, 6, b, 16, c, rs_c, cs_c, alpha, beta, 6)


cdef void sgemm_6x16_gen(idx_t k, const float* a, idx_t rs_a, idx_t cs_a,
                         const float* b, idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                         float alpha, float beta) noexcept nogil:
    _s_tile16(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 6)


cdef void sgemm_rows16(idx_t k, int rows, const float* a, idx_t rs_a, idx_t cs_a,
                       const float* b, idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                       float alpha, float beta) noexcept nogil:
    if rows == 1:
        _s_tile16(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 1)
    elif rows == 2:
        _s_tile16(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 2)
    elif rows == 3:
        _s_tile16(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 3)
    elif rows == 4:
        _s_tile16(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 4)
    else:
        _s_tile16(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 5)


# ----------------------------------------------------------------------------- float64 6x8

cdef inline void _d_row_out(double* c, idx_t cs_c, __m256d x0, __m256d x1, __m256d va,
                            double beta, __m256d vb) noexcept nogil:
    cdef double tmp[8]
    cdef int j
    x0 = _mm256_mul_pd(va, x0)
    x1 = _mm256_mul_pd(va, x1)
    if cs_c == 1:
        if beta != 0.0:
            x0 = _mm256_fmadd_pd(vb, _mm256_loadu_pd(c), x0)
            x1 = _mm256_fmadd_pd(vb, _mm256_loadu_pd(c + 4), x1)
        _mm256_storeu_pd(c, x0)
        _mm256_storeu_pd(c + 4, x1)
    else:
        _mm256_storeu_pd(tmp, x0)
        _mm256_storeu_pd(tmp + 4, x1)
        if beta != 0.0:
            for j in range(8):
                c[j * cs_c] = tmp[j] + beta * c[j * cs_c]
        else:
            for j in range(8):
                c[j * cs_c] = tmp[j]


# The tile and fewer rows than it: see _s_tile16.
cdef inline void _d_tile8(idx_t k, const double* a, idx_t rs_a, idx_t cs_a,
                          const double* b, idx_t rs_b, double* c, idx_t rs_c, idx_t cs_c,
                          double alpha, double beta, const int rows) noexcept nogil:
    cdef __m256d c00 = _mm256_setzero_pd(), c01 = _mm256_setzero_pd()
    cdef __m256d c10 = _mm256_setzero_pd(), c11 = _mm256_setzero_pd()
    cdef __m256d c20 = _mm256_setzero_pd(), c21 = _mm256_setzero_pd()
    cdef __m256d c30 = _mm256_setzero_pd(), c31 = _mm256_setzero_pd()
    cdef __m256d c40 = _mm256_setzero_pd(), c41 = _mm256_setzero_pd()
    cdef __m256d c50 = _mm256_setzero_pd(), c51 = _mm256_setzero_pd()
    cdef __m256d b0, b1, av
    cdef idx_t p
    cdef int i
    for i in range(rows):
        _mm_prefetch(<const char*> (c + i * rs_c), _MM_HINT_T0)
    for p in range(k):
        b0 = _mm256_loadu_pd(b)
        b1 = _mm256_loadu_pd(b + 4)
        av = _mm256_broadcast_sd(a)
        c00 = _mm256_fmadd_pd(av, b0, c00)
        c01 = _mm256_fmadd_pd(av, b1, c01)
        if rows > 1:
            av = _mm256_broadcast_sd(a + rs_a)
            c10 = _mm256_fmadd_pd(av, b0, c10)
            c11 = _mm256_fmadd_pd(av, b1, c11)
        if rows > 2:
            av = _mm256_broadcast_sd(a + 2 * rs_a)
            c20 = _mm256_fmadd_pd(av, b0, c20)
            c21 = _mm256_fmadd_pd(av, b1, c21)
        if rows > 3:
            av = _mm256_broadcast_sd(a + 3 * rs_a)
            c30 = _mm256_fmadd_pd(av, b0, c30)
            c31 = _mm256_fmadd_pd(av, b1, c31)
        if rows > 4:
            av = _mm256_broadcast_sd(a + 4 * rs_a)
            c40 = _mm256_fmadd_pd(av, b0, c40)
            c41 = _mm256_fmadd_pd(av, b1, c41)
        if rows > 5:
            av = _mm256_broadcast_sd(a + 5 * rs_a)
            c50 = _mm256_fmadd_pd(av, b0, c50)
            c51 = _mm256_fmadd_pd(av, b1, c51)
        a += cs_a
        b += rs_b
    cdef __m256d va = _mm256_set1_pd(alpha)
    cdef __m256d vb = _mm256_set1_pd(beta)
    _d_row_out(c, cs_c, c00, c01, va, beta, vb)
    if rows > 1:
        _d_row_out(c + rs_c, cs_c, c10, c11, va, beta, vb)
    if rows > 2:
        _d_row_out(c + 2 * rs_c, cs_c, c20, c21, va, beta, vb)
    if rows > 3:
        _d_row_out(c + 3 * rs_c, cs_c, c30, c31, va, beta, vb)
    if rows > 4:
        _d_row_out(c + 4 * rs_c, cs_c, c40, c41, va, beta, vb)
    if rows > 5:
        _d_row_out(c + 5 * rs_c, cs_c, c50, c51, va, beta, vb)


cdef void dgemm_6x8(idx_t k, const double* a, const double* b, double* c,
                    idx_t rs_c, idx_t cs_c, double alpha, double beta) noexcept nogil:
    _d_tile8(k, a, 1, 6, b, 8, c, rs_c, cs_c, alpha, beta, 6)


cdef void dgemm_6x8_gen(idx_t k, const double* a, idx_t rs_a, idx_t cs_a,
                        const double* b, idx_t rs_b, double* c, idx_t rs_c, idx_t cs_c,
                        double alpha, double beta) noexcept nogil:
    _d_tile8(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 6)


cdef void dgemm_rows8(idx_t k, int rows, const double* a, idx_t rs_a, idx_t cs_a,
                      const double* b, idx_t rs_b, double* c, idx_t rs_c, idx_t cs_c,
                      double alpha, double beta) noexcept nogil:
    if rows == 1:
        _d_tile8(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 1)
    elif rows == 2:
        _d_tile8(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 2)
    elif rows == 3:
        _d_tile8(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 3)
    elif rows == 4:
        _d_tile8(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 4)
    else:
        _d_tile8(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta, 5)


# ----------------------------------------------------------------------------- level 1/2

cdef inline float _hsum_ps(__m256 v) noexcept nogil:
    cdef __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))
    s = _mm_hadd_ps(s, s)
    s = _mm_hadd_ps(s, s)
    return _mm_cvtss_f32(s)


cdef inline double _hsum_pd(__m256d v) noexcept nogil:
    cdef __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1))
    s = _mm_hadd_pd(s, s)
    return _mm_cvtsd_f64(s)


cdef float sdot(idx_t n, const float* x, const float* y) noexcept nogil:
    # Four accumulators hide the FMA latency; the tail is summed in scalar.
    cdef __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps()
    cdef __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps()
    cdef idx_t i = 0
    cdef float tail = 0
    while i + 32 <= n:
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0)
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), s1)
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16), s2)
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24), s3)
        i += 32
    while i + 8 <= n:
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0)
        i += 8
    while i < n:
        tail += x[i] * y[i]
        i += 1
    return _hsum_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3))) + tail


cdef double ddot(idx_t n, const double* x, const double* y) noexcept nogil:
    cdef __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd()
    cdef __m256d s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd()
    cdef idx_t i = 0
    cdef double tail = 0
    while i + 16 <= n:
        s0 = _mm256_fmadd_pd(_mm256_loadu_pd(x + i), _mm256_loadu_pd(y + i), s0)
        s1 = _mm256_fmadd_pd(_mm256_loadu_pd(x + i + 4), _mm256_loadu_pd(y + i + 4), s1)
        s2 = _mm256_fmadd_pd(_mm256_loadu_pd(x + i + 8), _mm256_loadu_pd(y + i + 8), s2)
        s3 = _mm256_fmadd_pd(_mm256_loadu_pd(x + i + 12), _mm256_loadu_pd(y + i + 12), s3)
        i += 16
    while i + 4 <= n:
        s0 = _mm256_fmadd_pd(_mm256_loadu_pd(x + i), _mm256_loadu_pd(y + i), s0)
        i += 4
    while i < n:
        tail += x[i] * y[i]
        i += 1
    return _hsum_pd(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3))) + tail


cdef void sdot4(idx_t n, const float* a, idx_t lda, const float* x, float* out) noexcept nogil:
    cdef __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps()
    cdef __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps()
    cdef __m256 xv
    cdef const float* a1 = a + lda
    cdef const float* a2 = a + 2 * lda
    cdef const float* a3 = a + 3 * lda
    cdef idx_t i = 0
    cdef float t0 = 0, t1 = 0, t2 = 0, t3 = 0
    while i + 8 <= n:
        xv = _mm256_loadu_ps(x + i)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), xv, s0)
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + i), xv, s1)
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + i), xv, s2)
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + i), xv, s3)
        i += 8
    while i < n:
        t0 += a[i] * x[i]
        t1 += a1[i] * x[i]
        t2 += a2[i] * x[i]
        t3 += a3[i] * x[i]
        i += 1
    out[0] = _hsum_ps(s0) + t0
    out[1] = _hsum_ps(s1) + t1
    out[2] = _hsum_ps(s2) + t2
    out[3] = _hsum_ps(s3) + t3


cdef void ddot4(idx_t n, const double* a, idx_t lda, const double* x, double* out) noexcept nogil:
    cdef __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd()
    cdef __m256d s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd()
    cdef __m256d xv
    cdef const double* a1 = a + lda
    cdef const double* a2 = a + 2 * lda
    cdef const double* a3 = a + 3 * lda
    cdef idx_t i = 0
    cdef double t0 = 0, t1 = 0, t2 = 0, t3 = 0
    while i + 4 <= n:
        xv = _mm256_loadu_pd(x + i)
        s0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i), xv, s0)
        s1 = _mm256_fmadd_pd(_mm256_loadu_pd(a1 + i), xv, s1)
        s2 = _mm256_fmadd_pd(_mm256_loadu_pd(a2 + i), xv, s2)
        s3 = _mm256_fmadd_pd(_mm256_loadu_pd(a3 + i), xv, s3)
        i += 4
    while i < n:
        t0 += a[i] * x[i]
        t1 += a1[i] * x[i]
        t2 += a2[i] * x[i]
        t3 += a3[i] * x[i]
        i += 1
    out[0] = _hsum_pd(s0) + t0
    out[1] = _hsum_pd(s1) + t1
    out[2] = _hsum_pd(s2) + t2
    out[3] = _hsum_pd(s3) + t3


cdef void saxpy(idx_t n, float alpha, const float* x, float* y) noexcept nogil:
    cdef __m256 va = _mm256_set1_ps(alpha)
    cdef idx_t i = 0
    while i + 16 <= n:
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)))
        _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 8),
                                                    _mm256_loadu_ps(y + i + 8)))
        i += 16
    while i < n:
        y[i] += alpha * x[i]
        i += 1


cdef void daxpy(idx_t n, double alpha, const double* x, double* y) noexcept nogil:
    cdef __m256d va = _mm256_set1_pd(alpha)
    cdef idx_t i = 0
    while i + 8 <= n:
        _mm256_storeu_pd(y + i, _mm256_fmadd_pd(va, _mm256_loadu_pd(x + i), _mm256_loadu_pd(y + i)))
        _mm256_storeu_pd(y + i + 4, _mm256_fmadd_pd(va, _mm256_loadu_pd(x + i + 4),
                                                    _mm256_loadu_pd(y + i + 4)))
        i += 8
    while i < n:
        y[i] += alpha * x[i]
        i += 1


cdef void saxpy4(idx_t n, const float* alpha, const float* a, idx_t lda, float* y) noexcept nogil:
    cdef __m256 v0 = _mm256_set1_ps(alpha[0]), v1 = _mm256_set1_ps(alpha[1])
    cdef __m256 v2 = _mm256_set1_ps(alpha[2]), v3 = _mm256_set1_ps(alpha[3])
    cdef __m256 acc
    cdef const float* a1 = a + lda
    cdef const float* a2 = a + 2 * lda
    cdef const float* a3 = a + 3 * lda
    cdef idx_t i = 0
    while i + 8 <= n:
        acc = _mm256_fmadd_ps(v0, _mm256_loadu_ps(a + i), _mm256_loadu_ps(y + i))
        acc = _mm256_fmadd_ps(v1, _mm256_loadu_ps(a1 + i), acc)
        acc = _mm256_fmadd_ps(v2, _mm256_loadu_ps(a2 + i), acc)
        acc = _mm256_fmadd_ps(v3, _mm256_loadu_ps(a3 + i), acc)
        _mm256_storeu_ps(y + i, acc)
        i += 8
    while i < n:
        y[i] += alpha[0] * a[i] + alpha[1] * a1[i] + alpha[2] * a2[i] + alpha[3] * a3[i]
        i += 1


cdef void daxpy4(idx_t n, const double* alpha, const double* a, idx_t lda, double* y) noexcept nogil:
    cdef __m256d v0 = _mm256_set1_pd(alpha[0]), v1 = _mm256_set1_pd(alpha[1])
    cdef __m256d v2 = _mm256_set1_pd(alpha[2]), v3 = _mm256_set1_pd(alpha[3])
    cdef __m256d acc
    cdef const double* a1 = a + lda
    cdef const double* a2 = a + 2 * lda
    cdef const double* a3 = a + 3 * lda
    cdef idx_t i = 0
    while i + 4 <= n:
        acc = _mm256_fmadd_pd(v0, _mm256_loadu_pd(a + i), _mm256_loadu_pd(y + i))
        acc = _mm256_fmadd_pd(v1, _mm256_loadu_pd(a1 + i), acc)
        acc = _mm256_fmadd_pd(v2, _mm256_loadu_pd(a2 + i), acc)
        acc = _mm256_fmadd_pd(v3, _mm256_loadu_pd(a3 + i), acc)
        _mm256_storeu_pd(y + i, acc)
        i += 4
    while i < n:
        y[i] += alpha[0] * a[i] + alpha[1] * a1[i] + alpha[2] * a2[i] + alpha[3] * a3[i]
        i += 1


cdef void sscal(idx_t n, float alpha, const float* x, float* y) noexcept nogil:
    cdef __m256 va = _mm256_set1_ps(alpha)
    cdef idx_t i = 0
    while i + 8 <= n:
        _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(x + i)))
        i += 8
    while i < n:
        y[i] = alpha * x[i]
        i += 1


cdef void dscal(idx_t n, double alpha, const double* x, double* y) noexcept nogil:
    cdef __m256d va = _mm256_set1_pd(alpha)
    cdef idx_t i = 0
    while i + 4 <= n:
        _mm256_storeu_pd(y + i, _mm256_mul_pd(va, _mm256_loadu_pd(x + i)))
        i += 4
    while i < n:
        y[i] = alpha * x[i]
        i += 1


# ----------------------------------------------------------------------------- sparse rows
# Gather (one CSR row times a dense matrix): the row's nonzeros are walked once per column
# block of y held in eight YMM accumulators (64 float32 / 32 float64 columns), so each
# gathered x row segment is loaded once and the sums never leave the registers; eight
# independent chains keep both FMA pipes busy.  Narrower blocks and a scalar tail follow.
# Scatter (one CSR row into M^T @ X): a column block of x stays in registers while every
# nonzero's y row segment is loaded, updated and stored.

cdef inline void _s_put(float* y, __m256 acc, __m256 va, float beta, __m256 vb) noexcept nogil:
    acc = _mm256_mul_ps(va, acc)
    if beta != 0.0:
        acc = _mm256_fmadd_ps(vb, _mm256_loadu_ps(y), acc)
    _mm256_storeu_ps(y, acc)


cdef inline void _d_put(double* y, __m256d acc, __m256d va, double beta,
                        __m256d vb) noexcept nogil:
    acc = _mm256_mul_pd(va, acc)
    if beta != 0.0:
        acc = _mm256_fmadd_pd(vb, _mm256_loadu_pd(y), acc)
    _mm256_storeu_pd(y, acc)


cdef void s_csr_gather(idx_t nnz, const float* val, const sp_index* col, const float* x,
                       idx_t rs_x, idx_t n, float alpha, float beta, float* y) noexcept nogil:
    cdef __m256 a0, a1, a2, a3, a4, a5, a6, a7, v
    cdef __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta)
    cdef const float* xr
    cdef idx_t j = 0, p
    cdef float t
    while j + 64 <= n:
        a0 = _mm256_setzero_ps(); a1 = _mm256_setzero_ps()
        a2 = _mm256_setzero_ps(); a3 = _mm256_setzero_ps()
        a4 = _mm256_setzero_ps(); a5 = _mm256_setzero_ps()
        a6 = _mm256_setzero_ps(); a7 = _mm256_setzero_ps()
        for p in range(nnz):
            v = _mm256_set1_ps(val[p])
            xr = x + col[p] * rs_x + j
            a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr), a0)
            a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8), a1)
            a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 16), a2)
            a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 24), a3)
            a4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 32), a4)
            a5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 40), a5)
            a6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 48), a6)
            a7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 56), a7)
        _s_put(y + j, a0, va, beta, vb)
        _s_put(y + j + 8, a1, va, beta, vb)
        _s_put(y + j + 16, a2, va, beta, vb)
        _s_put(y + j + 24, a3, va, beta, vb)
        _s_put(y + j + 32, a4, va, beta, vb)
        _s_put(y + j + 40, a5, va, beta, vb)
        _s_put(y + j + 48, a6, va, beta, vb)
        _s_put(y + j + 56, a7, va, beta, vb)
        j += 64
    while j + 8 <= n:
        a0 = _mm256_setzero_ps()
        for p in range(nnz):
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(val[p]),
                                 _mm256_loadu_ps(x + col[p] * rs_x + j), a0)
        _s_put(y + j, a0, va, beta, vb)
        j += 8
    while j < n:
        t = 0
        for p in range(nnz):
            t += val[p] * x[col[p] * rs_x + j]
        y[j] = alpha * t if beta == 0 else alpha * t + beta * y[j]
        j += 1


cdef void d_csr_gather(idx_t nnz, const double* val, const sp_index* col, const double* x,
                       idx_t rs_x, idx_t n, double alpha, double beta,
                       double* y) noexcept nogil:
    cdef __m256d a0, a1, a2, a3, a4, a5, a6, a7, v
    cdef __m256d va = _mm256_set1_pd(alpha), vb = _mm256_set1_pd(beta)
    cdef const double* xr
    cdef idx_t j = 0, p
    cdef double t
    while j + 32 <= n:
        a0 = _mm256_setzero_pd(); a1 = _mm256_setzero_pd()
        a2 = _mm256_setzero_pd(); a3 = _mm256_setzero_pd()
        a4 = _mm256_setzero_pd(); a5 = _mm256_setzero_pd()
        a6 = _mm256_setzero_pd(); a7 = _mm256_setzero_pd()
        for p in range(nnz):
            v = _mm256_set1_pd(val[p])
            xr = x + col[p] * rs_x + j
            a0 = _mm256_fmadd_pd(v, _mm256_loadu_pd(xr), a0)
            a1 = _mm256_fmadd_pd(v, _mm256_loadu_pd(xr + 4), a1)
            a2 = _mm256_fmadd_pd(v, _mm256_loadu_pd(xr + 8), a2)
            a3 = _mm256_fmadd_pd(v, _mm256_loadu_pd(xr + 12), a3)
            a4 = _mm256_fmadd_pd(v, _mm256_loadu_pd(xr + 16), a4)
            a5 = _mm256_fmadd_pd(v, _mm256_loadu_pd(xr + 20), a5)
            a6 = _mm256_fmadd_pd(v, _mm256_loadu_pd(xr + 24), a6)
            a7 = _mm256_fmadd_pd(v, _mm256_loadu_pd(xr + 28), a7)
        _d_put(y + j, a0, va, beta, vb)
        _d_put(y + j + 4, a1, va, beta, vb)
        _d_put(y + j + 8, a2, va, beta, vb)
        _d_put(y + j + 12, a3, va, beta, vb)
        _d_put(y + j + 16, a4, va, beta, vb)
        _d_put(y + j + 20, a5, va, beta, vb)
        _d_put(y + j + 24, a6, va, beta, vb)
        _d_put(y + j + 28, a7, va, beta, vb)
        j += 32
    while j + 4 <= n:
        a0 = _mm256_setzero_pd()
        for p in range(nnz):
            a0 = _mm256_fmadd_pd(_mm256_set1_pd(val[p]),
                                 _mm256_loadu_pd(x + col[p] * rs_x + j), a0)
        _d_put(y + j, a0, va, beta, vb)
        j += 4
    while j < n:
        t = 0
        for p in range(nnz):
            t += val[p] * x[col[p] * rs_x + j]
        y[j] = alpha * t if beta == 0 else alpha * t + beta * y[j]
        j += 1


cdef void s_csr_scatter(idx_t nnz, const float* val, const sp_index* col, const float* x,
                        idx_t n, float alpha, float* y, idx_t rs_y) noexcept nogil:
    cdef __m256 va = _mm256_set1_ps(alpha), x0, x1, x2, x3, v
    cdef float* yr
    cdef idx_t j = 0, p
    cdef float xs
    while j + 32 <= n:
        x0 = _mm256_mul_ps(va, _mm256_loadu_ps(x + j))
        x1 = _mm256_mul_ps(va, _mm256_loadu_ps(x + j + 8))
        x2 = _mm256_mul_ps(va, _mm256_loadu_ps(x + j + 16))
        x3 = _mm256_mul_ps(va, _mm256_loadu_ps(x + j + 24))
        for p in range(nnz):
            v = _mm256_set1_ps(val[p])
            yr = y + col[p] * rs_y + j
            _mm256_storeu_ps(yr, _mm256_fmadd_ps(v, x0, _mm256_loadu_ps(yr)))
            _mm256_storeu_ps(yr + 8, _mm256_fmadd_ps(v, x1, _mm256_loadu_ps(yr + 8)))
            _mm256_storeu_ps(yr + 16, _mm256_fmadd_ps(v, x2, _mm256_loadu_ps(yr + 16)))
            _mm256_storeu_ps(yr + 24, _mm256_fmadd_ps(v, x3, _mm256_loadu_ps(yr + 24)))
        j += 32
    while j + 8 <= n:
        x0 = _mm256_mul_ps(va, _mm256_loadu_ps(x + j))
        for p in range(nnz):
            yr = y + col[p] * rs_y + j
            _mm256_storeu_ps(yr, _mm256_fmadd_ps(_mm256_set1_ps(val[p]), x0,
                                                 _mm256_loadu_ps(yr)))
        j += 8
    while j < n:
        xs = alpha * x[j]
        for p in range(nnz):
            y[col[p] * rs_y + j] += val[p] * xs
        j += 1


cdef void d_csr_scatter(idx_t nnz, const double* val, const sp_index* col, const double* x,
                        idx_t n, double alpha, double* y, idx_t rs_y) noexcept nogil:
    cdef __m256d va = _mm256_set1_pd(alpha), x0, x1, x2, x3, v
    cdef double* yr
    cdef idx_t j = 0, p
    cdef double xs
    while j + 16 <= n:
        x0 = _mm256_mul_pd(va, _mm256_loadu_pd(x + j))
        x1 = _mm256_mul_pd(va, _mm256_loadu_pd(x + j + 4))
        x2 = _mm256_mul_pd(va, _mm256_loadu_pd(x + j + 8))
        x3 = _mm256_mul_pd(va, _mm256_loadu_pd(x + j + 12))
        for p in range(nnz):
            v = _mm256_set1_pd(val[p])
            yr = y + col[p] * rs_y + j
            _mm256_storeu_pd(yr, _mm256_fmadd_pd(v, x0, _mm256_loadu_pd(yr)))
            _mm256_storeu_pd(yr + 4, _mm256_fmadd_pd(v, x1, _mm256_loadu_pd(yr + 4)))
            _mm256_storeu_pd(yr + 8, _mm256_fmadd_pd(v, x2, _mm256_loadu_pd(yr + 8)))
            _mm256_storeu_pd(yr + 12, _mm256_fmadd_pd(v, x3, _mm256_loadu_pd(yr + 12)))
        j += 16
    while j + 4 <= n:
        x0 = _mm256_mul_pd(va, _mm256_loadu_pd(x + j))
        for p in range(nnz):
            yr = y + col[p] * rs_y + j
            _mm256_storeu_pd(yr, _mm256_fmadd_pd(_mm256_set1_pd(val[p]), x0,
                                                 _mm256_loadu_pd(yr)))
        j += 4
    while j < n:
        xs = alpha * x[j]
        for p in range(nnz):
            y[col[p] * rs_y + j] += val[p] * xs
        j += 1


# ----------------------------------------------------------------------------- direct conv
# conv_rows (see _ukernel.pxd): a tile of KB outputs x M rows x V vectors keeps its KB*M*V
# <= 8 sums in YMM registers while it walks the taps; per tap it broadcasts KB weights and
# loads M*V input vectors, each feeding KB FMAs.  Eight independent sums are what two FMA
# pipes of latency 4 need, so short rows are stacked (M rows of V vectors) rather than left
# as a single latency-bound chain.  Loads are whole vectors (the caller pads its rows,
# CONV_PAD); only the last vector of a row is stored under a mask.
# conv_taps: TB tap sums in registers while one pass reads dy once and each tap's shifted
# row, masked loads for the row's last partial vector (nothing past Q is read).
#
# Tile shapes and tap-block sizes are types: Cython compiles a fused function once per type
# and decides ``if tile_t is ...`` at compile time, so in every copy the sizes are
# constants, the loops over them unroll and the sums stay in registers.  (Sizes passed as
# literal arguments to one inline function were not enough: GCC kept an out-of-line copy
# for the many call sites, with the sums in memory.)

cdef struct tile_1_1_8:
    char unused
cdef struct tile_1_1_7:
    char unused
cdef struct tile_1_1_6:
    char unused
cdef struct tile_1_1_5:
    char unused
cdef struct tile_1_1_4:
    char unused
cdef struct tile_1_1_3:
    char unused
cdef struct tile_1_1_2:
    char unused
cdef struct tile_1_1_1:
    char unused
cdef struct tile_1_2_4:
    char unused
cdef struct tile_1_2_3:
    char unused
cdef struct tile_1_2_2:
    char unused
cdef struct tile_1_2_1:
    char unused
cdef struct tile_1_4_2:
    char unused
cdef struct tile_1_4_1:
    char unused
cdef struct tile_1_8_1:
    char unused
cdef struct tile_4_1_2:
    char unused
cdef struct tile_4_1_1:
    char unused
cdef struct tile_2_1_2:
    char unused
cdef struct tile_2_1_1:
    char unused

ctypedef fused tile_t:
    tile_1_1_8
    tile_1_1_7
    tile_1_1_6
    tile_1_1_5
    tile_1_1_4
    tile_1_1_3
    tile_1_1_2
    tile_1_1_1
    tile_1_2_4
    tile_1_2_3
    tile_1_2_2
    tile_1_2_1
    tile_1_4_2
    tile_1_4_1
    tile_1_8_1
    tile_4_1_2
    tile_4_1_1
    tile_2_1_2
    tile_2_1_1


cdef inline void _tile_dims(const tile_t* shape, int* kb, int* m, int* v) noexcept nogil:
    if tile_t is tile_1_1_8:
        kb[0], m[0], v[0] = 1, 1, 8
    elif tile_t is tile_1_1_7:
        kb[0], m[0], v[0] = 1, 1, 7
    elif tile_t is tile_1_1_6:
        kb[0], m[0], v[0] = 1, 1, 6
    elif tile_t is tile_1_1_5:
        kb[0], m[0], v[0] = 1, 1, 5
    elif tile_t is tile_1_1_4:
        kb[0], m[0], v[0] = 1, 1, 4
    elif tile_t is tile_1_1_3:
        kb[0], m[0], v[0] = 1, 1, 3
    elif tile_t is tile_1_1_2:
        kb[0], m[0], v[0] = 1, 1, 2
    elif tile_t is tile_1_1_1:
        kb[0], m[0], v[0] = 1, 1, 1
    elif tile_t is tile_1_2_4:
        kb[0], m[0], v[0] = 1, 2, 4
    elif tile_t is tile_1_2_3:
        kb[0], m[0], v[0] = 1, 2, 3
    elif tile_t is tile_1_2_2:
        kb[0], m[0], v[0] = 1, 2, 2
    elif tile_t is tile_1_2_1:
        kb[0], m[0], v[0] = 1, 2, 1
    elif tile_t is tile_1_4_2:
        kb[0], m[0], v[0] = 1, 4, 2
    elif tile_t is tile_1_4_1:
        kb[0], m[0], v[0] = 1, 4, 1
    elif tile_t is tile_1_8_1:
        kb[0], m[0], v[0] = 1, 8, 1
    elif tile_t is tile_4_1_2:
        kb[0], m[0], v[0] = 4, 1, 2
    elif tile_t is tile_4_1_1:
        kb[0], m[0], v[0] = 4, 1, 1
    elif tile_t is tile_2_1_2:
        kb[0], m[0], v[0] = 2, 1, 2
    elif tile_t is tile_2_1_1:
        kb[0], m[0], v[0] = 2, 1, 1


cdef struct taps_1:
    char unused
cdef struct taps_2:
    char unused
cdef struct taps_3:
    char unused
cdef struct taps_4:
    char unused
cdef struct taps_5:
    char unused
cdef struct taps_6:
    char unused
cdef struct taps_7:
    char unused
cdef struct taps_8:
    char unused
cdef struct taps_9:
    char unused
cdef struct taps_10:
    char unused
cdef struct taps_11:
    char unused
cdef struct taps_12:
    char unused

ctypedef fused taps_t:
    taps_1
    taps_2
    taps_3
    taps_4
    taps_5
    taps_6
    taps_7
    taps_8
    taps_9
    taps_10
    taps_11
    taps_12


cdef inline int _taps_count(const taps_t* block) noexcept nogil:
    if taps_t is taps_1:
        return 1
    elif taps_t is taps_2:
        return 2
    elif taps_t is taps_3:
        return 3
    elif taps_t is taps_4:
        return 4
    elif taps_t is taps_5:
        return 5
    elif taps_t is taps_6:
        return 6
    elif taps_t is taps_7:
        return 7
    elif taps_t is taps_8:
        return 8
    elif taps_t is taps_9:
        return 9
    elif taps_t is taps_10:
        return 10
    elif taps_t is taps_11:
        return 11
    elif taps_t is taps_12:
        return 12
    return 0


cdef void _s_tile(const tile_t* shape, idx_t T, const idx_t* off, const float* w, idx_t ws,
                  const float* bias, const float* src, idx_t srs, float* out, idx_t ors,
                  idx_t oks, int tail) noexcept nogil:
    cdef __m256 acc[8]
    cdef __m256 wv[4]
    cdef __m256 xv
    cdef __m256i mask
    cdef const float* sp
    cdef float* o
    cdef idx_t t
    cdef int KB, M, V, k, m, v, i
    _tile_dims(shape, &KB, &M, &V)
    for k in range(KB):
        wv[k] = _mm256_set1_ps(bias[k]) if bias != NULL else _mm256_setzero_ps()
        for i in range(M * V):
            acc[k * M * V + i] = wv[k]
    # A loop that runs at least once (T >= 1, one tap at least): over range(T), which
    # may run zero times, GCC 12 kept a copy of the sums on the stack and stored all of them
    # on every tap, half the speed of the grouped tile 4x1x2.
    t = 0
    while True:
        sp = src + off[t]
        for k in range(KB):
            wv[k] = _mm256_broadcast_ss(w + k * ws + t)
        for m in range(M):
            for v in range(V):
                xv = _mm256_loadu_ps(sp + m * srs + v * 8)
                for k in range(KB):
                    i = (k * M + m) * V + v
                    acc[i] = _mm256_fmadd_ps(wv[k], xv, acc[i])
        t += 1
        if t >= T:
            break
    mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    for k in range(KB):
        for m in range(M):
            for v in range(V):
                o = out + k * oks + m * ors + v * 8
                i = (k * M + m) * V + v
                if v == V - 1 and tail < 8:
                    _mm256_maskstore_ps(o, mask, acc[i])
                else:
                    _mm256_storeu_ps(o, acc[i])


cdef void _d_tile(const tile_t* shape, idx_t T, const idx_t* off, const double* w, idx_t ws,
                  const double* bias, const double* src, idx_t srs, double* out, idx_t ors,
                  idx_t oks, int tail) noexcept nogil:
    cdef __m256d acc[8]
    cdef __m256d wv[4]
    cdef __m256d xv
    cdef __m256i mask
    cdef const double* sp
    cdef double* o
    cdef idx_t t
    cdef int KB, M, V, k, m, v, i
    _tile_dims(shape, &KB, &M, &V)
    for k in range(KB):
        wv[k] = _mm256_set1_pd(bias[k]) if bias != NULL else _mm256_setzero_pd()
        for i in range(M * V):
            acc[k * M * V + i] = wv[k]
    # A loop that runs at least once (T >= 1, one tap at least): over range(T), which
    # may run zero times, GCC 12 kept a copy of the sums on the stack and stored all of them
    # on every tap, half the speed of the grouped tile 4x1x2.
    t = 0
    while True:
        sp = src + off[t]
        for k in range(KB):
            wv[k] = _mm256_broadcast_sd(w + k * ws + t)
        for m in range(M):
            for v in range(V):
                xv = _mm256_loadu_pd(sp + m * srs + v * 4)
                for k in range(KB):
                    i = (k * M + m) * V + v
                    acc[i] = _mm256_fmadd_pd(wv[k], xv, acc[i])
        t += 1
        if t >= T:
            break
    mask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(tail), _mm256_setr_epi64x(0, 1, 2, 3))
    for k in range(KB):
        for m in range(M):
            for v in range(V):
                o = out + k * oks + m * ors + v * 4
                i = (k * M + m) * V + v
                if v == V - 1 and tail < 4:
                    _mm256_maskstore_pd(o, mask, acc[i])
                else:
                    _mm256_storeu_pd(o, acc[i])


cdef inline void _tile_f(const tile_t* shape, idx_t T, const idx_t* off, const floating* w,
                         idx_t ws, const floating* bias, const floating* src, idx_t srs,
                         floating* out, idx_t ors, idx_t oks, int tail) noexcept nogil:
    if floating is float:
        _s_tile(shape, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    else:
        _d_tile(shape, T, off, w, ws, bias, src, srs, out, ors, oks, tail)


cdef void _tile(int KB, int M, int V, idx_t T, const idx_t* off, const floating* w, idx_t ws,
                const floating* bias, const floating* src, idx_t srs, floating* out,
                idx_t ors, idx_t oks, int tail) noexcept nogil:
    """The tile of KB outputs x M rows x V vectors (one of tile_t's shapes)."""
    cdef int code = (KB * 10 + M) * 10 + V
    if code == 118:
        _tile_f(<tile_1_1_8*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 117:
        _tile_f(<tile_1_1_7*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 116:
        _tile_f(<tile_1_1_6*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 115:
        _tile_f(<tile_1_1_5*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 114:
        _tile_f(<tile_1_1_4*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 113:
        _tile_f(<tile_1_1_3*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 112:
        _tile_f(<tile_1_1_2*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 111:
        _tile_f(<tile_1_1_1*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 124:
        _tile_f(<tile_1_2_4*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 123:
        _tile_f(<tile_1_2_3*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 122:
        _tile_f(<tile_1_2_2*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 121:
        _tile_f(<tile_1_2_1*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 142:
        _tile_f(<tile_1_4_2*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 141:
        _tile_f(<tile_1_4_1*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 181:
        _tile_f(<tile_1_8_1*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 412:
        _tile_f(<tile_4_1_2*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 411:
        _tile_f(<tile_4_1_1*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 212:
        _tile_f(<tile_2_1_2*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)
    elif code == 211:
        _tile_f(<tile_2_1_1*> NULL, T, off, w, ws, bias, src, srs, out, ors, oks, tail)


cdef void conv_rows_avx2(idx_t P, idx_t Q, idx_t T, const idx_t* off, const floating* w,
                         idx_t nk, const floating* bias, const floating* src, idx_t srs,
                         floating* out, idx_t ors, idx_t oks) noexcept nogil:
    cdef int vw = 8 if floating is float else 4
    cdef idx_t nv = (Q + vw - 1) // vw, p, j, k0
    cdef int tail = <int> (Q - (nv - 1) * vw), V, M, KB
    if P <= 0 or Q <= 0:
        return
    if T <= 0:
        # No taps (a phase of dx no tap reaches): the bias alone.  The tiles need T >= 1.
        for k0 in range(nk):
            for p in range(P):
                for j in range(Q):
                    out[k0 * oks + p * ors + j] = bias[k0] if bias != NULL else 0
        return
    if nk == 1:
        if nv >= 8:
            # Long rows: blocks of eight vectors along the row, the last block shorter.
            for p in range(P):
                for j in range(0, nv, 8):
                    V = <int> (nv - j if nv - j < 8 else 8)
                    _tile(1, 1, V, T, off, w, T, bias, src + p * srs + j * vw, srs,
                          out + p * ors + j * vw, ors, oks, tail if j + V == nv else vw)
            return
        # Short rows: as many rows as make up to eight vectors (a power of two), fewer at
        # the bottom.
        V = <int> nv
        M = 8 if V == 1 else (4 if V == 2 else (2 if V <= 4 else 1))
        p = 0
        while p < P:
            while M > P - p:
                M //= 2
            _tile(1, M, V, T, off, w, T, bias, src + p * srs, srs, out + p * ors, ors, oks,
                  tail)
            p += M
        return
    # Several outputs (grouped layers): four at a time share each input vector, two
    # vectors along the row.
    k0 = 0
    while k0 < nk:
        KB = 4 if nk - k0 >= 4 else (2 if nk - k0 >= 2 else 1)
        for p in range(P):
            for j in range(0, nv, 2):
                V = <int> (nv - j if nv - j < 2 else 2)
                _tile(KB, 1, V, T, off, w + k0 * T, T, NULL if bias == NULL else bias + k0,
                      src + p * srs + j * vw, srs, out + k0 * oks + p * ors + j * vw, ors,
                      oks, tail if j + V == nv else vw)
        k0 += KB


# The three shapes of a row in conv_taps: whole vectors only, whole vectors and a partial
# last one, a partial one only.  A type each, so that each copy of the loops has no branch
# inside: with the partial vector under an ``if`` (or the whole ones in a range() loop, which
# may run zero times) GCC 12 kept a copy of the sums on the stack and stored every one of
# them on every row (or vector).
cdef struct rows_full:
    char unused
cdef struct rows_both:
    char unused
cdef struct rows_tail:
    char unused

ctypedef fused rows_t:
    rows_full
    rows_both
    rows_tail


cdef void _s_taps(const taps_t* block, const rows_t* shape, idx_t P, idx_t Q,
                  const idx_t* off, const float* src, idx_t srs, const float* dy, idx_t dys,
                  double* acc) noexcept nogil:
    cdef int TB = _taps_count(block), j
    cdef __m256 a[12]
    cdef __m256 d
    cdef __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(<int> (Q % 8)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    cdef idx_t nfull = Q // 8, p = 0, v
    cdef const float* sp
    cdef const float* r
    for j in range(TB):
        a[j] = _mm256_setzero_ps()
    while True:                 # P >= 1, nfull >= 1 where there are whole vectors
        sp = src + p * srs
        r = dy + p * dys
        if rows_t is not rows_tail:
            v = 0
            while True:
                d = _mm256_loadu_ps(r + v * 8)
                for j in range(TB):
                    a[j] = _mm256_fmadd_ps(d, _mm256_loadu_ps(sp + off[j] + v * 8), a[j])
                v += 1
                if v >= nfull:
                    break
        if rows_t is not rows_full:
            d = _mm256_maskload_ps(r + nfull * 8, mask)
            for j in range(TB):
                a[j] = _mm256_fmadd_ps(d, _mm256_maskload_ps(sp + off[j] + nfull * 8, mask),
                                       a[j])
        p += 1
        if p >= P:
            break
    for j in range(TB):
        acc[j] += _hsum_ps(a[j])


cdef void _d_taps(const taps_t* block, const rows_t* shape, idx_t P, idx_t Q,
                  const idx_t* off, const double* src, idx_t srs, const double* dy, idx_t dys,
                  double* acc) noexcept nogil:
    cdef int TB = _taps_count(block), j
    cdef __m256d a[12]
    cdef __m256d d
    cdef __m256i mask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(Q % 4),
                                          _mm256_setr_epi64x(0, 1, 2, 3))
    cdef idx_t nfull = Q // 4, p = 0, v
    cdef const double* sp
    cdef const double* r
    for j in range(TB):
        a[j] = _mm256_setzero_pd()
    while True:
        sp = src + p * srs
        r = dy + p * dys
        if rows_t is not rows_tail:
            v = 0
            while True:
                d = _mm256_loadu_pd(r + v * 4)
                for j in range(TB):
                    a[j] = _mm256_fmadd_pd(d, _mm256_loadu_pd(sp + off[j] + v * 4), a[j])
                v += 1
                if v >= nfull:
                    break
        if rows_t is not rows_full:
            d = _mm256_maskload_pd(r + nfull * 4, mask)
            for j in range(TB):
                a[j] = _mm256_fmadd_pd(d, _mm256_maskload_pd(sp + off[j] + nfull * 4, mask),
                                       a[j])
        p += 1
        if p >= P:
            break
    for j in range(TB):
        acc[j] += _hsum_pd(a[j])


cdef inline void _taps_rows(const taps_t* block, const rows_t* shape, idx_t P, idx_t Q,
                            const idx_t* off, const floating* src, idx_t srs,
                            const floating* dy, idx_t dys, double* acc) noexcept nogil:
    if floating is float:
        _s_taps(block, shape, P, Q, off, src, srs, dy, dys, acc)
    else:
        _d_taps(block, shape, P, Q, off, src, srs, dy, dys, acc)


cdef inline void _taps_f(const taps_t* block, idx_t P, idx_t Q, const idx_t* off,
                         const floating* src, idx_t srs, const floating* dy, idx_t dys,
                         double* acc) noexcept nogil:
    """One block of taps over the P rows, through the copy of the loops for the rows' shape."""
    cdef int vw = 8 if floating is float else 4
    if Q % vw == 0:
        _taps_rows(block, <rows_full*> NULL, P, Q, off, src, srs, dy, dys, acc)
    elif Q > vw:
        _taps_rows(block, <rows_both*> NULL, P, Q, off, src, srs, dy, dys, acc)
    else:
        _taps_rows(block, <rows_tail*> NULL, P, Q, off, src, srs, dy, dys, acc)


cdef void conv_taps_avx2(idx_t P, idx_t Q, idx_t T, const idx_t* off, const floating* src,
                         idx_t srs, const floating* dy, idx_t dys, double* acc) noexcept nogil:
    # Taps in nearly equal blocks of at most 12 (twelve sums, the dy vector and one load
    # fit the sixteen registers): one pass over dy per block.
    cdef idx_t nblk = (T + 11) // 12, b, t0, t1
    if P <= 0 or Q <= 0:        # the tap blocks' loops run at least once: they rely on it
        return
    for b in range(nblk):
        t0 = b * T // nblk
        t1 = (b + 1) * T // nblk
        if t1 - t0 == 12:
            _taps_f(<taps_12*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 11:
            _taps_f(<taps_11*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 10:
            _taps_f(<taps_10*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 9:
            _taps_f(<taps_9*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 8:
            _taps_f(<taps_8*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 7:
            _taps_f(<taps_7*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 6:
            _taps_f(<taps_6*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 5:
            _taps_f(<taps_5*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 4:
            _taps_f(<taps_4*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 3:
            _taps_f(<taps_3*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 2:
            _taps_f(<taps_2*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)
        elif t1 - t0 == 1:
            _taps_f(<taps_1*> NULL, P, Q, off + t0, src, srs, dy, dys, acc + t0)


cdef skernels_t _s_table
cdef dkernels_t _d_table
_s_table.mr = 6
_s_table.nr = 16
_s_table.gemm = sgemm_6x16
_s_table.gemm_gen = sgemm_6x16_gen
_s_table.gemm_rows = sgemm_rows16
_s_table.dot = sdot
_s_table.dot4 = sdot4
_s_table.axpy = saxpy
_s_table.axpy4 = saxpy4
_s_table.scal = sscal
_s_table.csr_gather32 = s_csr_gather[int32_t]
_s_table.csr_gather64 = s_csr_gather[int64_t]
_s_table.csr_scatter32 = s_csr_scatter[int32_t]
_s_table.csr_scatter64 = s_csr_scatter[int64_t]
_s_table.conv_rows = conv_rows_avx2[float]
_s_table.conv_taps = conv_taps_avx2[float]
_d_table.mr = 6
_d_table.nr = 8
_d_table.gemm = dgemm_6x8
_d_table.gemm_gen = dgemm_6x8_gen
_d_table.gemm_rows = dgemm_rows8
_d_table.dot = ddot
_d_table.dot4 = ddot4
_d_table.axpy = daxpy
_d_table.axpy4 = daxpy4
_d_table.scal = dscal
_d_table.csr_gather32 = d_csr_gather[int32_t]
_d_table.csr_gather64 = d_csr_gather[int64_t]
_d_table.csr_scatter32 = d_csr_scatter[int32_t]
_d_table.csr_scatter64 = d_csr_scatter[int64_t]
_d_table.conv_rows = conv_rows_avx2[double]
_d_table.conv_taps = conv_taps_avx2[double]


def tables():
    """Capsules holding this module's float32 and float64 kernel tables."""
    return (PyCapsule_New(&_s_table, b"microtile.skernels", NULL),
            PyCapsule_New(&_d_table, b"microtile.dkernels", NULL))
