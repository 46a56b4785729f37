"""Portable kernels: plain C loops for any CPU (baseline x86-64 SSE2, aarch64 NEON, ...).

Used when the CPU or OS lacks AVX2/FMA, or when ``MICROTILE_ISA=generic``.  The micro-tiles
are small (4x8 float32, 4x4 float64) so that the accumulators fit in sixteen 128-bit
registers; the loops have literal bounds so the compiler unrolls them and keeps the tile
in registers.
"""
from cpython.pycapsule cimport PyCapsule_New

from libc.stdint cimport int32_t, int64_t

from microtile._common._typedefs cimport idx_t, floating, sp_index
from microtile._kernels._ukernel cimport skernels_t, dkernels_t


cdef inline void _write_tile(floating* ab, int mr, int nr, floating* c, idx_t rs_c, idx_t cs_c,
                             floating alpha, floating beta) noexcept nogil:
    cdef int i, j
    if beta != 0:
        for i in range(mr):
            for j in range(nr):
                c[i * rs_c + j * cs_c] = alpha * ab[i * nr + j] + beta * c[i * rs_c + j * cs_c]
    else:
        for i in range(mr):
            for j in range(nr):
                c[i * rs_c + j * cs_c] = alpha * ab[i * nr + j]


cdef inline void _s4x8(idx_t k, const float* a, idx_t rs_a, idx_t cs_a, const float* b,
                       idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                       float alpha, float beta) noexcept nogil:
    cdef float ab[32]
    cdef float ai
    cdef idx_t p
    cdef int i, j
    for i in range(32):
        ab[i] = 0
    for p in range(k):
        for i in range(4):
            ai = a[i * rs_a]
            for j in range(8):
                ab[i * 8 + j] += ai * b[j]
        a += cs_a
        b += rs_b
    _write_tile(ab, 4, 8, c, rs_c, cs_c, alpha, beta)


cdef inline void _d4x4(idx_t k, const double* a, idx_t rs_a, idx_t cs_a, const double* b,
                       idx_t rs_b, double* c, idx_t rs_c, idx_t cs_c,
                       double alpha, double beta) noexcept nogil:
    cdef double ab[16]
    cdef double ai
    cdef idx_t p
    cdef int i, j
    for i in range(16):
        ab[i] = 0
    for p in range(k):
        for i in range(4):
            ai = a[i * rs_a]
            for j in range(4):
                ab[i * 4 + j] += ai * b[j]
        a += cs_a
        b += rs_b
    _write_tile(ab, 4, 4, c, rs_c, cs_c, alpha, beta)


cdef void sgemm_4x8(idx_t k, const float* a, const float* b, float* c,
                    idx_t rs_c, idx_t cs_c, float alpha, float beta) noexcept nogil:
    _s4x8(k, a, 1, 4, b, 8, c, rs_c, cs_c, alpha, beta)


cdef void sgemm_4x8_gen(idx_t k, const float* a, idx_t rs_a, idx_t cs_a,
                        const float* b, idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                        float alpha, float beta) noexcept nogil:
    _s4x8(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta)


cdef void dgemm_4x4(idx_t k, const double* a, const double* b, double* c,
                    idx_t rs_c, idx_t cs_c, double alpha, double beta) noexcept nogil:
    _d4x4(k, a, 1, 4, b, 4, c, rs_c, cs_c, alpha, beta)


cdef void dgemm_4x4_gen(idx_t k, const double* a, idx_t rs_a, idx_t cs_a,
                        const double* b, idx_t rs_b, double* c, idx_t rs_c, idx_t cs_c,
                        double alpha, double beta) noexcept nogil:
    _d4x4(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta)


# Level 1/2: independent partial sums so the compiler may keep them in vector lanes
# without reassociating (which it would not do on its own for floating point).

cdef floating dot_g(idx_t n, const floating* x, const floating* y) noexcept nogil:
    cdef floating s[8]
    cdef idx_t i = 0
    cdef int j
    for j in range(8):
        s[j] = 0
    while i + 8 <= n:
        for j in range(8):
            s[j] += x[i + j] * y[i + j]
        i += 8
    while i < n:
        s[0] += x[i] * y[i]
        i += 1
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


cdef void dot4_g(idx_t n, const floating* a, idx_t lda, const floating* x,
                 floating* out) noexcept nogil:
    cdef int r
    for r in range(4):
        out[r] = dot_g(n, a + r * lda, x)


cdef void axpy_g(idx_t n, floating alpha, const floating* x, floating* y) noexcept nogil:
    cdef idx_t i
    for i in range(n):
        y[i] += alpha * x[i]


cdef void axpy4_g(idx_t n, const floating* alpha, const floating* a, idx_t lda,
                  floating* y) noexcept nogil:
    cdef idx_t i
    cdef floating a0 = alpha[0], a1 = alpha[1], a2 = alpha[2], a3 = alpha[3]
    for i in range(n):
        y[i] += a0 * a[i] + a1 * a[lda + i] + a2 * a[2 * lda + i] + a3 * a[3 * lda + i]


cdef void scal_g(idx_t n, floating alpha, const floating* x, floating* y) noexcept nogil:
    cdef idx_t i
    for i in range(n):
        y[i] = alpha * x[i]


# Sparse rows.  The gather keeps eight columns of y in independent sums while it walks the
# row's nonzeros, so each x row segment is read once per block and the sums can live in
# registers; the scatter is an axpy per nonzero.

cdef void csr_gather_g(idx_t nnz, const floating* val, const sp_index* col, const floating* x,
                       idx_t rs_x, idx_t n, floating alpha, floating beta,
                       floating* y) noexcept nogil:
    cdef floating s[8]
    cdef floating v
    cdef const floating* xr
    cdef idx_t j = 0, p
    cdef int w, q
    while j < n:
        w = 8 if j + 8 <= n else <int> (n - j)
        for q in range(8):
            s[q] = 0
        for p in range(nnz):
            v = val[p]
            xr = x + col[p] * rs_x + j
            for q in range(w):
                s[q] += v * xr[q]
        if beta == 0:
            for q in range(w):
                y[j + q] = alpha * s[q]
        else:
            for q in range(w):
                y[j + q] = alpha * s[q] + beta * y[j + q]
        j += w


cdef void csr_scatter_g(idx_t nnz, const floating* val, const sp_index* col,
                        const floating* x, idx_t n, floating alpha, floating* y,
                        idx_t rs_y) noexcept nogil:
    cdef floating v
    cdef floating* yr
    cdef idx_t p, j
    for p in range(nnz):
        v = alpha * val[p]
        yr = y + col[p] * rs_y
        for j in range(n):
            yr[j] += v * x[j]


# Direct convolution.  conv_rows adds one tap at a time into the output row (an axpy the
# compiler vectorizes with the baseline ISA; the row stays in L1 across the taps); conv_taps
# is one dot product per tap and row, in dot_g's independent partial sums.

cdef void conv_rows_g(idx_t P, idx_t Q, idx_t T, const idx_t* off, const floating* w,
                      idx_t nk, const floating* bias, const floating* src, idx_t srs,
                      floating* out, idx_t ors, idx_t oks) noexcept nogil:
    cdef idx_t k, p, q, t
    cdef floating b, wt
    cdef floating* o
    cdef const floating* s
    for k in range(nk):
        b = bias[k] if bias != NULL else 0
        for p in range(P):
            o = out + k * oks + p * ors
            for q in range(Q):
                o[q] = b
            for t in range(T):
                wt = w[k * T + t]
                s = src + p * srs + off[t]
                for q in range(Q):
                    o[q] += wt * s[q]


cdef void conv_taps_g(idx_t P, idx_t Q, idx_t T, const idx_t* off, const floating* src,
                      idx_t srs, const floating* dy, idx_t dys, double* acc) noexcept nogil:
    cdef idx_t t, p
    cdef double a
    for t in range(T):
        a = 0
        for p in range(P):
            a += dot_g(Q, dy + p * dys, src + p * srs + off[t])
        acc[t] += a


cdef skernels_t _s_table
cdef dkernels_t _d_table
_s_table.mr = 4
_s_table.nr = 8
_s_table.gemm = sgemm_4x8
_s_table.gemm_gen = sgemm_4x8_gen
_s_table.gemm_rows = NULL        # no rows kernel: partial row panels go through a buffer
_s_table.dot = dot_g[float]
_s_table.dot4 = dot4_g[float]
_s_table.axpy = axpy_g[float]
_s_table.axpy4 = axpy4_g[float]
_s_table.scal = scal_g[float]
_s_table.csr_gather32 = csr_gather_g[float, int32_t]
_s_table.csr_gather64 = csr_gather_g[float, int64_t]
_s_table.csr_scatter32 = csr_scatter_g[float, int32_t]
_s_table.csr_scatter64 = csr_scatter_g[float, int64_t]
_s_table.conv_rows = conv_rows_g[float]
_s_table.conv_taps = conv_taps_g[float]
_d_table.mr = 4
_d_table.nr = 4
_d_table.gemm = dgemm_4x4
_d_table.gemm_gen = dgemm_4x4_gen
_d_table.gemm_rows = NULL
_d_table.dot = dot_g[double]
_d_table.dot4 = dot4_g[double]
_d_table.axpy = axpy_g[double]
_d_table.axpy4 = axpy4_g[double]
_d_table.scal = scal_g[double]
_d_table.csr_gather32 = csr_gather_g[double, int32_t]
_d_table.csr_gather64 = csr_gather_g[double, int64_t]
_d_table.csr_scatter32 = csr_scatter_g[double, int32_t]
_d_table.csr_scatter64 = csr_scatter_g[double, int64_t]
_d_table.conv_rows = conv_rows_g[double]
_d_table.conv_taps = conv_taps_g[double]


def tables():
    """Capsules holding this module's float32 and float64 kernel tables."""
    return (PyCapsule_New(&_s_table, b"microtile.skernels", NULL),
            PyCapsule_New(&_d_table, b"microtile.dkernels", NULL))
