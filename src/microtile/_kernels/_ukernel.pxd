# The kernel layer's contract: what each ISA module provides, per dtype, as C function
# pointers.  `_dispatch` fills one table per dtype at import; drivers call through it.
#
# Packed GEMM micro-kernel: C[0:mr, 0:nr] = alpha * Ap @ Bp + beta * C, where Ap holds k
# columns of mr contiguous elements and Bp k rows of nr contiguous elements.  beta == 0 means
# C is not read.  C may have any strides.
# General micro-kernel: the same with A read in place (strides rs_a, cs_a) and B rows rs_b
# apart (B's columns contiguous), so small problems need not pack.
# Rows micro-kernel (optional, NULL when a module has none): the general micro-kernel on the
# first `rows` (1 to mr - 1) rows of the tile only, every column; C's other rows untouched.
from libc.string cimport memcpy

from libc.stdint cimport int32_t, int64_t

from microtile._common._typedefs cimport idx_t, floating, sp_index

ctypedef void (*sgemm_ukr_t)(idx_t k, const float* a, const float* b, float* c,
                             idx_t rs_c, idx_t cs_c, float alpha, float beta) noexcept nogil
ctypedef void (*dgemm_ukr_t)(idx_t k, const double* a, const double* b, double* c,
                             idx_t rs_c, idx_t cs_c, double alpha, double beta) noexcept nogil
ctypedef void (*sgemm_gen_t)(idx_t k, const float* a, idx_t rs_a, idx_t cs_a,
                             const float* b, idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                             float alpha, float beta) noexcept nogil
ctypedef void (*dgemm_gen_t)(idx_t k, const double* a, idx_t rs_a, idx_t cs_a,
                             const double* b, idx_t rs_b, double* c, idx_t rs_c, idx_t cs_c,
                             double alpha, double beta) noexcept nogil
ctypedef void (*sgemm_rows_t)(idx_t k, int rows, const float* a, idx_t rs_a, idx_t cs_a,
                              const float* b, idx_t rs_b, float* c, idx_t rs_c, idx_t cs_c,
                              float alpha, float beta) noexcept nogil
ctypedef void (*dgemm_rows_t)(idx_t k, int rows, const double* a, idx_t rs_a, idx_t cs_a,
                              const double* b, idx_t rs_b, double* c, idx_t rs_c,
                              idx_t cs_c, double alpha, double beta) noexcept nogil

# Level-1/2 kernels on contiguous vectors.
#   dot:  sum x[i] * y[i]
#   dot4: out[r] = sum_i a[r * lda + i] * x[i], r = 0..3  (four rows share the loads of x)
#   axpy: y[i] += alpha * x[i]
#   axpy4: y[i] += sum_r alpha[r] * a[r * lda + i]       (four columns, one pass over y)
#   scal: y[i] = alpha * x[i]
ctypedef float (*sdot_t)(idx_t n, const float* x, const float* y) noexcept nogil
ctypedef double (*ddot_t)(idx_t n, const double* x, const double* y) noexcept nogil
ctypedef void (*sdot4_t)(idx_t n, const float* a, idx_t lda, const float* x, float* out) noexcept nogil
ctypedef void (*ddot4_t)(idx_t n, const double* a, idx_t lda, const double* x, double* out) noexcept nogil
ctypedef void (*saxpy_t)(idx_t n, float alpha, const float* x, float* y) noexcept nogil
ctypedef void (*daxpy_t)(idx_t n, double alpha, const double* x, double* y) noexcept nogil
ctypedef void (*saxpy4_t)(idx_t n, const float* alpha, const float* a, idx_t lda, float* y) noexcept nogil
ctypedef void (*daxpy4_t)(idx_t n, const double* alpha, const double* a, idx_t lda, double* y) noexcept nogil
ctypedef void (*sscal_t)(idx_t n, float alpha, const float* x, float* y) noexcept nogil
ctypedef void (*dscal_t)(idx_t n, double alpha, const double* x, double* y) noexcept nogil

# Sparse (CSR) row kernels; the index type is int32 or int64, as scipy stores it.
#   csr_gather:  y[0:n] = alpha * sum_p val[p] * x[col[p] * rs_x + 0:n] + beta * y[0:n]
#                (beta == 0: y not read).  One row of a CSR matrix times a dense matrix with
#                contiguous rows; y contiguous.
#   csr_scatter: y[col[p] * rs_y + 0:n] += alpha * val[p] * x[0:n] for every p.  One row of
#                a CSR matrix M scattered into M^T @ X; x and the rows of y contiguous.
ctypedef void (*scsr_gather32_t)(idx_t nnz, const float* val, const int32_t* col,
                                 const float* x, idx_t rs_x, idx_t n, float alpha, float beta,
                                 float* y) noexcept nogil
ctypedef void (*scsr_gather64_t)(idx_t nnz, const float* val, const int64_t* col,
                                 const float* x, idx_t rs_x, idx_t n, float alpha, float beta,
                                 float* y) noexcept nogil
ctypedef void (*dcsr_gather32_t)(idx_t nnz, const double* val, const int32_t* col,
                                 const double* x, idx_t rs_x, idx_t n, double alpha,
                                 double beta, double* y) noexcept nogil
ctypedef void (*dcsr_gather64_t)(idx_t nnz, const double* val, const int64_t* col,
                                 const double* x, idx_t rs_x, idx_t n, double alpha,
                                 double beta, double* y) noexcept nogil
ctypedef void (*scsr_scatter32_t)(idx_t nnz, const float* val, const int32_t* col,
                                  const float* x, idx_t n, float alpha, float* y,
                                  idx_t rs_y) noexcept nogil
ctypedef void (*scsr_scatter64_t)(idx_t nnz, const float* val, const int64_t* col,
                                  const float* x, idx_t n, float alpha, float* y,
                                  idx_t rs_y) noexcept nogil
ctypedef void (*dcsr_scatter32_t)(idx_t nnz, const double* val, const int32_t* col,
                                  const double* x, idx_t n, double alpha, double* y,
                                  idx_t rs_y) noexcept nogil
ctypedef void (*dcsr_scatter64_t)(idx_t nnz, const double* val, const int64_t* col,
                                  const double* x, idx_t n, double alpha, double* y,
                                  idx_t rs_y) noexcept nogil

# Direct convolution (``conv/_direct.pyx`` lays the operands out in its scratch so that
# every tap of the filter is one offset into it; see that module for the layout).
#   conv_rows: out[k*oks + p*ors + q] = b_k + sum_{t<T} w[k*T + t] * src[p*srs + off[t] + q]
#              for k < nk, p < P, q < Q, with b_k = bias[k] (0 when bias is NULL, and the
#              sum empty when T == 0).  Only q < Q of out is written, but a vector kernel
#              reads src at every q < Q + CONV_PAD - 1 (whole vectors, no masked loads in
#              the inner loop): the caller's rows must be readable that far.
#   conv_taps: acc[t] += sum_{p<P, q<Q} dy[p*dys + q] * src[p*srs + off[t] + q], t < T,
#              summed in the working precision within the call and added to acc in double;
#              dy and src are read at q < Q only (a NaN or Inf beyond them never leaks in).
# CONV_PAD: 16 elements, a 512-bit vector of float32, so one padding serves every ISA module
# (the AVX2 kernels read at most 7 past Q).
cdef enum:
    CONV_PAD = 16

ctypedef void (*sconv_rows_t)(idx_t P, idx_t Q, idx_t T, const idx_t* off, const float* w,
                              idx_t nk, const float* bias, const float* src, idx_t srs,
                              float* out, idx_t ors, idx_t oks) noexcept nogil
ctypedef void (*dconv_rows_t)(idx_t P, idx_t Q, idx_t T, const idx_t* off, const double* w,
                              idx_t nk, const double* bias, const double* src, idx_t srs,
                              double* out, idx_t ors, idx_t oks) noexcept nogil
ctypedef void (*sconv_taps_t)(idx_t P, idx_t Q, idx_t T, const idx_t* off, const float* src,
                              idx_t srs, const float* dy, idx_t dys, double* acc) noexcept nogil
ctypedef void (*dconv_taps_t)(idx_t P, idx_t Q, idx_t T, const idx_t* off, const double* src,
                              idx_t srs, const double* dy, idx_t dys, double* acc) noexcept nogil

# The largest micro-tile any ISA module may declare (sizes the drivers' stack buffers).
cdef enum:
    MAX_MR = 8
    MAX_NR = 16

ctypedef struct skernels_t:
    int mr
    int nr
    sgemm_ukr_t gemm
    sgemm_gen_t gemm_gen
    sgemm_rows_t gemm_rows
    sdot_t dot
    sdot4_t dot4
    saxpy_t axpy
    saxpy4_t axpy4
    sscal_t scal
    scsr_gather32_t csr_gather32
    scsr_gather64_t csr_gather64
    scsr_scatter32_t csr_scatter32
    scsr_scatter64_t csr_scatter64
    sconv_rows_t conv_rows
    sconv_taps_t conv_taps

ctypedef struct dkernels_t:
    int mr
    int nr
    dgemm_ukr_t gemm
    dgemm_gen_t gemm_gen
    dgemm_rows_t gemm_rows
    ddot_t dot
    ddot4_t dot4
    daxpy_t axpy
    daxpy4_t axpy4
    dscal_t scal
    dcsr_gather32_t csr_gather32
    dcsr_gather64_t csr_gather64
    dcsr_scatter32_t csr_scatter32
    dcsr_scatter64_t csr_scatter64
    dconv_rows_t conv_rows
    dconv_taps_t conv_taps

# Both dtypes' tables for one ISA.
ctypedef struct kernel_set_t:
    skernels_t s
    dkernels_t d


# Typed calls through a kernel set, so fused-type drivers are written once.
cdef inline int ukr_mr(const kernel_set_t* ks, const floating* tag) noexcept nogil:
    if floating is float:
        return ks.s.mr
    else:
        return ks.d.mr


cdef inline int ukr_nr(const kernel_set_t* ks, const floating* tag) noexcept nogil:
    if floating is float:
        return ks.s.nr
    else:
        return ks.d.nr


cdef inline void ukr_packed(const kernel_set_t* ks, idx_t k, const floating* a,
                            const floating* b, floating* c, idx_t rs_c, idx_t cs_c,
                            floating alpha, floating beta) noexcept nogil:
    if floating is float:
        ks.s.gemm(k, a, b, c, rs_c, cs_c, alpha, beta)
    else:
        ks.d.gemm(k, a, b, c, rs_c, cs_c, alpha, beta)


cdef inline void ukr_gen(const kernel_set_t* ks, idx_t k, const floating* a, idx_t rs_a,
                         idx_t cs_a, const floating* b, idx_t rs_b, floating* c, idx_t rs_c,
                         idx_t cs_c, floating alpha, floating beta) noexcept nogil:
    if floating is float:
        ks.s.gemm_gen(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta)
    else:
        ks.d.gemm_gen(k, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta)


cdef inline bint ukr_rows(const kernel_set_t* ks, idx_t k, int rows, const floating* a,
                          idx_t rs_a, idx_t cs_a, const floating* b, idx_t rs_b, floating* c,
                          idx_t rs_c, idx_t cs_c, floating alpha, floating beta) noexcept nogil:
    """The rows micro-kernel when the module has one (True), else nothing (False)."""
    if floating is float:
        if ks.s.gemm_rows == NULL:
            return False
        ks.s.gemm_rows(k, rows, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta)
    else:
        if ks.d.gemm_rows == NULL:
            return False
        ks.d.gemm_rows(k, rows, a, rs_a, cs_a, b, rs_b, c, rs_c, cs_c, alpha, beta)
    return True


cdef inline floating ukr_dot(const kernel_set_t* ks, idx_t n, const floating* x,
                            const floating* y) noexcept nogil:
    if floating is float:
        return ks.s.dot(n, x, y)
    else:
        return ks.d.dot(n, x, y)


cdef inline void ukr_dot4(const kernel_set_t* ks, idx_t n, const floating* a, idx_t lda,
                         const floating* x, floating* out) noexcept nogil:
    if floating is float:
        ks.s.dot4(n, a, lda, x, out)
    else:
        ks.d.dot4(n, a, lda, x, out)


cdef inline void ukr_axpy(const kernel_set_t* ks, idx_t n, floating alpha, const floating* x,
                         floating* y) noexcept nogil:
    if floating is float:
        ks.s.axpy(n, alpha, x, y)
    else:
        ks.d.axpy(n, alpha, x, y)


cdef inline void ukr_axpy4(const kernel_set_t* ks, idx_t n, const floating* alpha,
                          const floating* a, idx_t lda, floating* y) noexcept nogil:
    if floating is float:
        ks.s.axpy4(n, alpha, a, lda, y)
    else:
        ks.d.axpy4(n, alpha, a, lda, y)


cdef inline void ukr_scal(const kernel_set_t* ks, idx_t n, floating alpha, const floating* x,
                         floating* y) noexcept nogil:
    if floating is float:
        ks.s.scal(n, alpha, x, y)
    else:
        ks.d.scal(n, alpha, x, y)


cdef inline void ukr_csr_gather(const kernel_set_t* ks, idx_t nnz, const floating* val,
                                const sp_index* col, const floating* x, idx_t rs_x, idx_t n,
                                floating alpha, floating beta, floating* y) noexcept nogil:
    if floating is float:
        if sp_index is int32_t:
            ks.s.csr_gather32(nnz, val, col, x, rs_x, n, alpha, beta, y)
        else:
            ks.s.csr_gather64(nnz, val, col, x, rs_x, n, alpha, beta, y)
    else:
        if sp_index is int32_t:
            ks.d.csr_gather32(nnz, val, col, x, rs_x, n, alpha, beta, y)
        else:
            ks.d.csr_gather64(nnz, val, col, x, rs_x, n, alpha, beta, y)


cdef inline void ukr_csr_scatter(const kernel_set_t* ks, idx_t nnz, const floating* val,
                                 const sp_index* col, const floating* x, idx_t n,
                                 floating alpha, floating* y, idx_t rs_y) noexcept nogil:
    if floating is float:
        if sp_index is int32_t:
            ks.s.csr_scatter32(nnz, val, col, x, n, alpha, y, rs_y)
        else:
            ks.s.csr_scatter64(nnz, val, col, x, n, alpha, y, rs_y)
    else:
        if sp_index is int32_t:
            ks.d.csr_scatter32(nnz, val, col, x, n, alpha, y, rs_y)
        else:
            ks.d.csr_scatter64(nnz, val, col, x, n, alpha, y, rs_y)


cdef inline void ukr_conv_rows(const kernel_set_t* ks, idx_t P, idx_t Q, idx_t T,
                               const idx_t* off, const floating* w, idx_t nk,
                               const floating* bias, const floating* src, idx_t srs,
                               floating* out, idx_t ors, idx_t oks) noexcept nogil:
    if floating is float:
        ks.s.conv_rows(P, Q, T, off, w, nk, bias, src, srs, out, ors, oks)
    else:
        ks.d.conv_rows(P, Q, T, off, w, nk, bias, src, srs, out, ors, oks)


cdef inline void ukr_conv_taps(const kernel_set_t* ks, idx_t P, idx_t Q, idx_t T,
                               const idx_t* off, const floating* src, idx_t srs,
                               const floating* dy, idx_t dys, double* acc) noexcept nogil:
    if floating is float:
        ks.s.conv_taps(P, Q, T, off, src, srs, dy, dys, acc)
    else:
        ks.d.conv_taps(P, Q, T, off, src, srs, dy, dys, acc)


# Panel copies at the micro-tile widths the kernel modules declare (mr 4 or 6; nr 4, 8 or
# 16), for packing.  Each public helper tests the width once and calls the loop with a
# literal, so after inlining every copy has a constant size: a few vector moves where a
# run-time size calls memcpy.  A test per row instead cost float64 B packing 40 % more
# instructions (callgrind, 32x1024x784).  These are the only mr/nr literals outside the
# kernel modules' tables.
cdef inline void _copy_panels(floating* dst, const floating* src, idx_t rs, idx_t kc,
                              idx_t j0, idx_t j1, int width) noexcept nogil:
    cdef idx_t p, j
    for p in range(kc):
        for j in range(j0, j1):
            memcpy(dst + j * kc * width + p * width, src + p * rs + j * width,
                   width * sizeof(floating))


cdef inline void copy_panels(floating* dst, const floating* src, idx_t rs, idx_t kc,
                             idx_t j0, idx_t j1, int width) noexcept nogil:
    """Panels j0 <= j < j1 of ``width`` contiguous elements from kc rows ``rs`` apart:
    dst[(j * kc + p) * width + i] = src[p * rs + j * width + i], row by row so each read is
    a few consecutive lines."""
    if width == 16:
        _copy_panels(dst, src, rs, kc, j0, j1, 16)
    elif width == 8:
        _copy_panels(dst, src, rs, kc, j0, j1, 8)
    elif width == 6:
        _copy_panels(dst, src, rs, kc, j0, j1, 6)
    elif width == 4:
        _copy_panels(dst, src, rs, kc, j0, j1, 4)
    else:
        _copy_panels(dst, src, rs, kc, j0, j1, width)


cdef inline void _gather_panel(floating* dst, const floating* src, idx_t rs, idx_t cs,
                               idx_t kc, int width) noexcept nogil:
    cdef idx_t p
    cdef int i
    for p in range(kc):
        for i in range(width):
            dst[p * width + i] = src[i * rs + p * cs]


cdef inline void gather_panel(floating* dst, const floating* src, idx_t rs, idx_t cs,
                              idx_t kc, int width) noexcept nogil:
    """dst[p * width + i] = src[i * rs + p * cs]: a micro-panel of ``width`` strided rows,
    read in lockstep (``width`` sequential streams, contiguous writes)."""
    if width == 6:
        _gather_panel(dst, src, rs, cs, kc, 6)
    elif width == 4:
        _gather_panel(dst, src, rs, cs, kc, 4)
    elif width == 8:
        _gather_panel(dst, src, rs, cs, kc, 8)
    else:
        _gather_panel(dst, src, rs, cs, kc, width)
