"""Level-1/2 drivers: dot, gemv, ger, outer on the vector kernels of the ISA in force.

These are memory-bound, so the drivers' job is to stream each matrix element once, with
unit stride: rows-contiguous matrices use fused four-row dot products that share the loads
of x, columns-contiguous ones fused four-column axpys that share the loads and stores of y.
Strided vectors and rows are gathered into per-thread scratch GATHER_ELEMS elements at a
time, so the scratch a call uses does not grow with its operands (a stride-0 vector of 2**31
elements is 8 bytes of input and must not cost 16 GB).  Row blocks are items on the
thread pool.
"""
from libc.stdint cimport int64_t

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport ceil_div, imin
from microtile._kernels._ukernel cimport (kernel_set_t, ukr_axpy, ukr_axpy4, ukr_dot, ukr_dot4,
                                          ukr_scal)
from microtile._common._scratch cimport (scratch_get, scratch_trim, SCRATCH_EXTRA,
                                         SCRATCH_EXTRA2)
from microtile._common._mt_pool cimport pool_items
from microtile._common._atomic64 cimport mt_atomic_add64

# A row-split job on the pool (gemv or a rank-1 update); pointers untyped so one item
# function serves both dtypes.
cdef enum:
    L2_GEMV = 0
    L2_RANK1 = 1

ctypedef struct _l2_job:
    int kind
    const kernel_set_t* ks
    bint dbl, by_cols, assign
    idx_t m, n, per, rs_a, cs_a, incx, incy
    double alpha, beta      # exact for float32 too
    const void* a           # the matrix (gemv) or A to update (rank 1)
    const void* x
    const void* y           # y out (gemv) or the contiguous y in (rank 1)
    int64_t fails           # atomic


# Below this many matrix elements a second thread costs more than it brings.
cdef idx_t THREAD_MIN_ELEMS = 1 << 16

# Elements of a strided operand gathered at a time (128 KiB of float64: in L2, and large
# enough that the blocks' loop overhead is lost in the copying).
cdef enum:
    GATHER_ELEMS = 1 << 14


cdef inline void _gather(const floating* x, idx_t n, idx_t inc, floating* buf) noexcept nogil:
    """buf[0:n] = x[0:n*inc:inc]; a stride of 0 is a fill, which the compiler vectorizes."""
    cdef idx_t i
    cdef floating v
    if inc == 0:
        v = x[0]
        for i in range(n):
            buf[i] = v
    else:
        for i in range(n):
            buf[i] = x[i * inc]


cdef inline int _nthreads(int n_threads, idx_t m, idx_t n) noexcept nogil:
    if n_threads <= 1 or m * n < THREAD_MIN_ELEMS or m < 8:
        return 1
    return n_threads if n_threads < m // 4 else <int> (m // 4)


cdef floating dot_run(const kernel_set_t* ks, idx_t n, const floating* x, idx_t incx,
                      const floating* y, idx_t incy) noexcept nogil:
    cdef floating s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef idx_t i = 0
    if n <= 0:
        return 0
    if incx == 1 and incy == 1:
        return ukr_dot(ks, n, x, y)
    while i + 4 <= n:
        s0 += x[i * incx] * y[i * incy]
        s1 += x[(i + 1) * incx] * y[(i + 1) * incy]
        s2 += x[(i + 2) * incx] * y[(i + 2) * incy]
        s3 += x[(i + 3) * incx] * y[(i + 3) * incy]
        i += 4
    while i < n:
        s0 += x[i * incx] * y[i * incy]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef inline void _store_y(floating* y, idx_t incy, floating alpha, floating t,
                          floating beta) noexcept nogil:
    if beta == 0:
        y[0] = alpha * t
    else:
        y[0] = alpha * t + beta * y[0]


cdef int _gemv_rows(const kernel_set_t* ks, idx_t r0, idx_t r1, idx_t n, floating alpha,
                    const floating* a, idx_t rs_a, idx_t cs_a, const floating* x,
                    floating beta, floating* y, idx_t incy) noexcept nogil:
    """Rows r0..r1 of y = alpha * A x + beta * y; x contiguous."""
    cdef floating t[4]
    cdef floating* row = NULL
    cdef idx_t i = r0, j, nb, blk
    cdef int r
    if cs_a == 1:
        while i + 4 <= r1:
            ukr_dot4(ks, n, a + i * rs_a, rs_a, x, t)
            for r in range(4):
                _store_y(y + (i + r) * incy, incy, alpha, t[r], beta)
            i += 4
        while i < r1:
            _store_y(y + i * incy, incy, alpha, ukr_dot(ks, n, a + i * rs_a, x), beta)
            i += 1
        return 0
    # Neither rows nor columns contiguous: gather each row, a block at a time.
    row = <floating*> scratch_get(SCRATCH_EXTRA2, imin(n, GATHER_ELEMS) * sizeof(floating))
    if row == NULL:
        return -1
    for i in range(r0, r1):
        t[0] = 0
        for blk in range(ceil_div(n, GATHER_ELEMS)):
            j = blk * GATHER_ELEMS
            nb = imin(GATHER_ELEMS, n - j)
            _gather(a + i * rs_a + j * cs_a, nb, cs_a, row)
            t[0] += ukr_dot(ks, nb, row, x + j)
        _store_y(y + i * incy, incy, alpha, t[0], beta)
    return 0


cdef int _gemv_cols(const kernel_set_t* ks, idx_t r0, idx_t r1, idx_t n, floating alpha,
                    const floating* a, idx_t cs_a, const floating* x, floating beta,
                    floating* y, idx_t incy) noexcept nogil:
    """Rows r0..r1 of y = alpha * A x + beta * y for A with contiguous columns: GATHER_ELEMS
    rows at a time, each block's sums kept in scratch while the columns stream past."""
    cdef idx_t b0, mm, i, j, blk
    cdef floating* t = <floating*> scratch_get(SCRATCH_EXTRA2,
                                               imin(r1 - r0, GATHER_ELEMS) * sizeof(floating))
    if t == NULL:
        return -1
    for blk in range(ceil_div(r1 - r0, GATHER_ELEMS)):
        b0 = r0 + blk * GATHER_ELEMS
        mm = imin(GATHER_ELEMS, r1 - b0)
        for i in range(mm):
            t[i] = 0
        j = 0
        while j + 4 <= n:
            ukr_axpy4(ks, mm, x + j, a + b0 + j * cs_a, cs_a, t)
            j += 4
        while j < n:
            ukr_axpy(ks, mm, x[j], a + b0 + j * cs_a, t)
            j += 1
        for i in range(mm):
            _store_y(y + (b0 + i) * incy, incy, alpha, t[i], beta)
    return 0


cdef int _gemv_contig_x(const kernel_set_t* ks, int nt, idx_t m, idx_t n, floating alpha,
                        const floating* a, idx_t rs_a, idx_t cs_a, const floating* x,
                        floating beta, floating* y, idx_t incy) noexcept nogil:
    """y = alpha * A x + beta * y for a contiguous x, threads splitting the rows."""
    cdef bint by_cols = cs_a != 1 and rs_a == 1
    cdef _l2_job jb
    if nt <= 1:
        if by_cols:
            return _gemv_cols(ks, 0, m, n, alpha, a, cs_a, x, beta, y, incy)
        return _gemv_rows(ks, 0, m, n, alpha, a, rs_a, cs_a, x, beta, y, incy)
    # Row blocks in multiples of 8 keep the four-row kernels and cache lines whole.
    jb.kind = L2_GEMV
    jb.ks = ks
    jb.dbl = floating is double
    jb.m = m
    jb.n = n
    jb.per = ((m + nt - 1) // nt + 7) // 8 * 8
    jb.alpha = alpha
    jb.beta = beta
    jb.a = a
    jb.rs_a = rs_a
    jb.cs_a = cs_a
    jb.x = x
    jb.y = y
    jb.incy = incy
    jb.by_cols = by_cols
    jb.fails = 0
    pool_items(nt, ceil_div(m, jb.per), _l2_item, &jb)
    return -1 if jb.fails else 0


cdef int gemv_run(const kernel_set_t* ks, int n_threads, idx_t m, idx_t n, floating alpha,
                  const floating* a, idx_t rs_a, idx_t cs_a, const floating* x, idx_t incx,
                  floating beta, floating* y, idx_t incy) noexcept nogil:
    cdef floating* xb
    cdef idx_t i, j, nb, blk
    cdef int nt, rc = 0
    if m <= 0:
        return 0
    if n <= 0 or alpha == 0:
        for i in range(m):
            if beta == 0:
                y[i * incy] = 0
            else:
                y[i * incy] = beta * y[i * incy]
        return 0
    nt = _nthreads(n_threads, m, n)
    if incx == 1 or n == 1:
        rc = _gemv_contig_x(ks, nt, m, n, alpha, a, rs_a, cs_a, x, beta, y, incy)
    else:
        # A strided x is gathered GATHER_ELEMS elements at a time; each block adds its
        # columns' share, alpha times its partial sums, into y (beta applies to the first
        # only), as blocked BLAS gemv kernels do.
        xb = <floating*> scratch_get(SCRATCH_EXTRA, imin(n, GATHER_ELEMS) * sizeof(floating))
        if xb == NULL:
            return -1
        for blk in range(ceil_div(n, GATHER_ELEMS)):
            j = blk * GATHER_ELEMS
            nb = imin(GATHER_ELEMS, n - j)
            _gather(x + j * incx, nb, incx, xb)
            rc = _gemv_contig_x(ks, nt, m, nb, alpha, a + j * cs_a, rs_a, cs_a, xb,
                                beta if j == 0 else <floating> 1, y, incy)
            if rc != 0:
                break
    scratch_trim()
    return rc


cdef int _rank1_rows(const kernel_set_t* ks, idx_t r0, idx_t r1, idx_t n, floating alpha,
                     const floating* x, idx_t incx, const floating* y, floating* a,
                     idx_t rs_a, bint assign) noexcept nogil:
    """Rows r0..r1 of A (+)= alpha * x y^T for A with contiguous rows; y contiguous."""
    cdef idx_t i
    for i in range(r0, r1):
        if assign:
            ukr_scal(ks, n, alpha * x[i * incx], y, a + i * rs_a)
        else:
            ukr_axpy(ks, n, alpha * x[i * incx], y, a + i * rs_a)
    return 0


cdef void _rank1_split(const kernel_set_t* ks, int nt, idx_t m, idx_t n, idx_t per,
                       floating alpha, const floating* x, idx_t incx, const floating* y,
                       floating* a, idx_t rs_a, bint assign) noexcept nogil:
    """_rank1_rows over row blocks of ``per`` rows, items on the pool; y contiguous."""
    cdef _l2_job jb
    jb.kind = L2_RANK1
    jb.ks = ks
    jb.dbl = floating is double
    jb.m = m
    jb.n = n
    jb.per = per
    jb.alpha = alpha
    jb.a = a
    jb.rs_a = rs_a
    jb.x = x
    jb.incx = incx
    jb.y = y
    jb.assign = assign
    jb.fails = 0
    pool_items(nt, ceil_div(m, per), _l2_item, &jb)


cdef int _rank1(const kernel_set_t* ks, int n_threads, idx_t m, idx_t n, floating alpha,
                const floating* x, idx_t incx, const floating* y, idx_t incy,
                floating* a, idx_t rs_a, idx_t cs_a, bint assign) noexcept nogil:
    """A (+)= alpha * x y^T: the shared body of ger (assign False) and outer (True)."""
    cdef floating* yb
    cdef idx_t i, j, j0, nb, per, blk
    cdef int nt
    if m <= 0 or n <= 0:
        return 0
    if cs_a != 1 and rs_a == 1:
        # Columns contiguous: the transposed update A^T (+)= alpha * y x^T has contiguous rows.
        return _rank1(ks, n_threads, n, m, alpha, y, incy, x, incx, a, cs_a, rs_a, assign)
    if cs_a != 1:
        for i in range(m):
            for j in range(n):
                if assign:
                    a[i * rs_a + j * cs_a] = alpha * x[i * incx] * y[j * incy]
                else:
                    a[i * rs_a + j * cs_a] += alpha * x[i * incx] * y[j * incy]
        return 0
    nt = _nthreads(n_threads, m, n)
    per = (m + nt - 1) // nt
    if incy == 1 or n == 1:
        if nt <= 1:
            return _rank1_rows(ks, 0, m, n, alpha, x, incx, y, a, rs_a, assign)
        _rank1_split(ks, nt, m, n, per, alpha, x, incx, y, a, rs_a, assign)
        return 0
    # A strided y is gathered GATHER_ELEMS elements at a time, each block of A's columns
    # updated with its share.
    yb = <floating*> scratch_get(SCRATCH_EXTRA, imin(n, GATHER_ELEMS) * sizeof(floating))
    if yb == NULL:
        return -1
    for blk in range(ceil_div(n, GATHER_ELEMS)):
        j0 = blk * GATHER_ELEMS
        nb = imin(GATHER_ELEMS, n - j0)
        _gather(y + j0 * incy, nb, incy, yb)
        if nt <= 1:
            _rank1_rows(ks, 0, m, nb, alpha, x, incx, yb, a + j0, rs_a, assign)
        else:
            _rank1_split(ks, nt, m, nb, per, alpha, x, incx, yb, a + j0, rs_a, assign)
    scratch_trim()
    return 0


cdef int ger_run(const kernel_set_t* ks, int n_threads, idx_t m, idx_t n, floating alpha,
                 const floating* x, idx_t incx, const floating* y, idx_t incy,
                 floating* a, idx_t rs_a, idx_t cs_a) noexcept nogil:
    if alpha == 0:
        return 0
    return _rank1(ks, n_threads, m, n, alpha, x, incx, y, incy, a, rs_a, cs_a, False)


cdef int outer_run(const kernel_set_t* ks, int n_threads, idx_t m, idx_t n,
                   const floating* x, idx_t incx, const floating* y, idx_t incy,
                   floating* a, idx_t rs_a, idx_t cs_a) noexcept nogil:
    return _rank1(ks, n_threads, m, n, <floating> 1, x, incx, y, incy, a, rs_a, cs_a, True)


# -- the pool's entry point --------------------------------------------------------------------

cdef int _l2_rows(const _l2_job* j, idx_t r0, idx_t r1, floating alpha, floating beta,
                  const floating* a, const floating* x, floating* y) noexcept nogil:
    if j.kind == L2_RANK1:
        return _rank1_rows(j.ks, r0, r1, j.n, alpha, x, j.incx, <const floating*> j.y,
                           <floating*> j.a, j.rs_a, j.assign)
    if j.by_cols:
        return _gemv_cols(j.ks, r0, r1, j.n, alpha, a, j.cs_a, x, beta, y, j.incy)
    return _gemv_rows(j.ks, r0, r1, j.n, alpha, a, j.rs_a, j.cs_a, x, beta, y, j.incy)


cdef void _l2_item(void* ctx, idx_t t, int tid) noexcept nogil:
    cdef _l2_job* j = <_l2_job*> ctx
    cdef idx_t r0 = t * j.per, r1 = imin(j.m, r0 + j.per)
    cdef int rc
    if r0 >= r1:
        return
    if j.dbl:
        rc = _l2_rows(j, r0, r1, <double> j.alpha, <double> j.beta, <const double*> j.a,
                      <const double*> j.x, <double*> j.y)
    else:
        rc = _l2_rows(j, r0, r1, <float> j.alpha, <float> j.beta, <const float*> j.a,
                      <const float*> j.x, <float*> j.y)
    if rc != 0:
        mt_atomic_add64(&j.fails, 1)
    if tid != 0:
        scratch_trim()      # a helper's own; the caller's holds a gathered x or y
