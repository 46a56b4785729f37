"""AVX2/FMA kernels: the 6x16 (float32) and 6x8 (float64) GEMM micro-kernels and the
level-1/2 kernels.

This translation unit is compiled with ``-mavx2 -mfma``, so the compiler may use those
instructions anywhere in it, module initialisation included: ``_dispatch`` imports it only
after CPUID and XGETBV confirm support.  The tables are handed over as a capsule.

The micro-kernel keeps the 6 x 16 (6 x 8) tile of C in twelve YMM accumulators; each step
of k broadcasts six elements of A and loads two vectors of B: one rank-1 update, twelve FMAs.
Two FMA pipes of latency 4 need at least eight independent accumulators: twelve keep both busy.
"""
from cpython.pycapsule cimport PyCapsule_New

from libc.stdint cimport int32_t, int64_t

from microtile._common._typedefs cimport idx_t, sp_index
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


cdef inline void _s6x16(idx_t k, const float* a, idx_t rs_a, idx_t cs_a,
                        const float* b, idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                        float alpha, float beta) noexcept nogil:
    cdef __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps()
    cdef __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps()
    cdef __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps()
    cdef __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps()
    cdef __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps()
    cdef __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps()
    cdef __m256 b0, b1, av
    cdef idx_t p
    cdef int i
    for i in range(6):
        _mm_prefetch(<const char*> (c + i * rs_c), _MM_HINT_T0)
    for p in range(k):
        b0 = _mm256_loadu_ps(b)
        b1 = _mm256_loadu_ps(b + 8)
        av = _mm256_broadcast_ss(a)
        c00 = _mm256_fmadd_ps(av, b0, c00)
        c01 = _mm256_fmadd_ps(av, b1, c01)
        av = _mm256_broadcast_ss(a + rs_a)
        c10 = _mm256_fmadd_ps(av, b0, c10)
        c11 = _mm256_fmadd_ps(av, b1, c11)
        av = _mm256_broadcast_ss(a + 2 * rs_a)
        c20 = _mm256_fmadd_ps(av, b0, c20)
        c21 = _mm256_fmadd_ps(av, b1, c21)
        av = _mm256_broadcast_ss(a + 3 * rs_a)
        c30 = _mm256_fmadd_ps(av, b0, c30)
        c31 = _mm256_fmadd_ps(av, b1, c31)
        av = _mm256_broadcast_ss(a + 4 * rs_a)
        c40 = _mm256_fmadd_ps(av, b0, c40)
        c41 = _mm256_fmadd_ps(av, b1, c41)
        av = _mm256_broadcast_ss(a + 5 * rs_a)
        c50 = _mm256_fmadd_ps(av, b0, c50)
        c51 = _mm256_fmadd_ps(av, b1, c51)
        a += cs_a
        b += rs_b
    cdef __m256 va = _mm256_set1_ps(alpha)
    cdef __m256 vb = _mm256_set1_ps(beta)
    _s_row_out(c, cs_c, c00, c01, va, beta, vb)
    _s_row_out(c + rs_c, cs_c, c10, c11, va, beta, vb)
    _s_row_out(c + 2 * rs_c, cs_c, c20, c21, va, beta, vb)
    _s_row_out(c + 3 * rs_c, cs_c, c30, c31, va, beta, vb)
    _s_row_out(c + 4 * rs_c, cs_c, c40, c41, va, beta, vb)
    _s_row_out(c + 5 * rs_c, cs_c, c50, c51, va, beta, vb)


cdef void sgemm_6x16(idx_t k, const float* a, const float* b, float* c,
                     idx_t rs_c, idx_t cs_c, float alpha, float beta) noexcept nogil:
    _s6x16(k, a, 1, 6, b, 16, c, rs_c, cs_c, alpha, beta)


cdef void sgemm_6x16_gen(idx_t k, const float* a, idx_t rs_a, idx_t cs_a,
                         const float* b, idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                         float alpha, float beta) noexcept nogil:
    _s6x16(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta)


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


cdef inline void _d6x8(idx_t k, const double* a, idx_t rs_a, idx_t cs_a,
                       const double* b, idx_t rs_b, double* c, idx_t rs_c, idx_t cs_c,
                       double alpha, double beta) noexcept nogil:
    cdef __m256d c00 = _mm256_setzero_pd(), c01 = _mm256_setzero_pd()
    cdef __m256d c10 = _mm256_setzero_pd(), c11 = _mm256_setzero_pd()
    cdef __m256d c20 = _mm256_setzero_pd(), c21 = _mm256_setzero_pd()
    cdef __m256d c30 = _mm256_setzero_pd(), c31 = _mm256_setzero_pd()
    cdef __m256d c40 = _mm256_setzero_pd(), c41 = _mm256_setzero_pd()
    cdef __m256d c50 = _mm256_setzero_pd(), c51 = _mm256_setzero_pd()
    cdef __m256d b0, b1, av
    cdef idx_t p
    cdef int i
    for i in range(6):
        _mm_prefetch(<const char*> (c + i * rs_c), _MM_HINT_T0)
    for p in range(k):
        b0 = _mm256_loadu_pd(b)
        b1 = _mm256_loadu_pd(b + 4)
        av = _mm256_broadcast_sd(a)
        c00 = _mm256_fmadd_pd(av, b0, c00)
        c01 = _mm256_fmadd_pd(av, b1, c01)
        av = _mm256_broadcast_sd(a + rs_a)
        c10 = _mm256_fmadd_pd(av, b0, c10)
        c11 = _mm256_fmadd_pd(av, b1, c11)
        av = _mm256_broadcast_sd(a + 2 * rs_a)
        c20 = _mm256_fmadd_pd(av, b0, c20)
        c21 = _mm256_fmadd_pd(av, b1, c21)
        av = _mm256_broadcast_sd(a + 3 * rs_a)
        c30 = _mm256_fmadd_pd(av, b0, c30)
        c31 = _mm256_fmadd_pd(av, b1, c31)
        av = _mm256_broadcast_sd(a + 4 * rs_a)
        c40 = _mm256_fmadd_pd(av, b0, c40)
        c41 = _mm256_fmadd_pd(av, b1, c41)
        av = _mm256_broadcast_sd(a + 5 * rs_a)
        c50 = _mm256_fmadd_pd(av, b0, c50)
        c51 = _mm256_fmadd_pd(av, b1, c51)
        a += cs_a
        b += rs_b
    cdef __m256d va = _mm256_set1_pd(alpha)
    cdef __m256d vb = _mm256_set1_pd(beta)
    _d_row_out(c, cs_c, c00, c01, va, beta, vb)
    _d_row_out(c + rs_c, cs_c, c10, c11, va, beta, vb)
    _d_row_out(c + 2 * rs_c, cs_c, c20, c21, va, beta, vb)
    _d_row_out(c + 3 * rs_c, cs_c, c30, c31, va, beta, vb)
    _d_row_out(c + 4 * rs_c, cs_c, c40, c41, va, beta, vb)
    _d_row_out(c + 5 * rs_c, cs_c, c50, c51, va, beta, vb)


cdef void dgemm_6x8(idx_t k, const double* a, const double* b, double* c,
                    idx_t rs_c, idx_t cs_c, double alpha, double beta) noexcept nogil:
    _d6x8(k, a, 1, 6, b, 8, c, rs_c, cs_c, alpha, beta)


cdef void dgemm_6x8_gen(idx_t k, const double* a, idx_t rs_a, idx_t cs_a,
                        const double* b, idx_t rs_b, double* c, idx_t rs_c, idx_t cs_c,
                        double alpha, double beta) noexcept nogil:
    _d6x8(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta)


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


cdef skernels_t _s_table
cdef dkernels_t _d_table
_s_table.mr = 6
_s_table.nr = 16
_s_table.gemm = sgemm_6x16
_s_table.gemm_gen = sgemm_6x16_gen
_s_table.dot = sdot
_s_table.dot4 = sdot4
_s_table.axpy = saxpy
_s_table.axpy4 = saxpy4
_s_table.scal = sscal
_s_table.csr_gather32 = s_csr_gather[int32_t]
_s_table.csr_gather64 = s_csr_gather[int64_t]
_s_table.csr_scatter32 = s_csr_scatter[int32_t]
_s_table.csr_scatter64 = s_csr_scatter[int64_t]
_d_table.mr = 6
_d_table.nr = 8
_d_table.gemm = dgemm_6x8
_d_table.gemm_gen = dgemm_6x8_gen
_d_table.dot = ddot
_d_table.dot4 = ddot4
_d_table.axpy = daxpy
_d_table.axpy4 = daxpy4
_d_table.scal = dscal
_d_table.csr_gather32 = d_csr_gather[int32_t]
_d_table.csr_gather64 = d_csr_gather[int64_t]
_d_table.csr_scatter32 = d_csr_scatter[int32_t]
_d_table.csr_scatter64 = d_csr_scatter[int64_t]


def tables():
    """Capsules holding this module's float32 and float64 kernel tables."""
    return (PyCapsule_New(&_s_table, b"microtile.skernels", NULL),
            PyCapsule_New(&_d_table, b"microtile.dkernels", NULL))
