"""Sparse-dense products on CSR arrays: structure checks and the two nogil drivers.

Everything here works on the three arrays of a CSR matrix M (R x K) as scipy stores them
(``indptr``, ``indices``, ``data``), with int32 or int64 indices used as they come.  A CSC
matrix is the CSR matrix of its transpose, so the public layer maps every case onto

* ``gather``:  Y = alpha * M @ X + beta * Y    (X is K x n, Y is R x n), row by row;
* ``scatter``: Y = alpha * M.T @ X + beta * Y  (X is R x n, Y is K x n), nonzero by nonzero.

X and Y must have contiguous rows (any row stride); the public layer copies when they do not.
``check_csr`` runs before either kernel on every call: O(R + nnz), one pass, and nothing
malformed (indices out of range, ``indptr`` not monotonic, too short ``indices``/``data``)
reaches a kernel.

Ctrl-C (see ``_common/_interrupt.pxd``): both kernels walk rows of M, and between blocks of
rows worth about POLL_WORK multiply-adds the calling thread polls for signals and every thread
looks whether to stop, so a long product stops within a block of work of a KeyboardInterrupt.
"""
import numpy as np
cimport numpy as cnp

from libc.stdint cimport int32_t, int64_t
from libc.string cimport memset

from microtile._common._typedefs cimport idx_t, floating, sp_index
from microtile._common._mt_pool cimport mt_share, mt_share_end, pool_items
from microtile._common._interrupt cimport (signal_poll, caller_poll, open_poll, close_poll,
                                           raise_for_rc, poll_step, stop_before, interrupted,
                                           INTERRUPTED)
from microtile._config._params cimport gemm_params, current_params
from microtile._kernels._dispatch cimport kernel_set
from microtile._kernels._ukernel cimport (kernel_set_t, ukr_csr_gather, ukr_csr_scatter,
                                          ukr_scal)

cnp.import_array()

cdef object F32 = np.dtype(np.float32)
cdef object I32 = np.dtype(np.int32)
cdef object I64 = np.dtype(np.int64)

# Multiply-adds (plus one per output row) below which a second thread costs more than it
# brings; a guess from the level-2 drivers' threshold, not yet measured for these kernels.
cdef double THREAD_MIN_WORK = 1 << 16
# Multiply-adds (plus one per row) between two looks for a stop: about 0.05-0.1 ms of a row
# kernel, small beside the 50 ms between the caller's polls, while a look (an atomic load, and
# a clock read on the caller) costs nothing beside it.  Counted by work, not rows, so a
# power-law matrix's dense rows or a wide X cannot stretch the time between looks.
cdef idx_t POLL_WORK = 1 << 18


cdef int _check(idx_t nrows, idx_t ncols, const sp_index* indptr, const sp_index* indices,
                idx_t n_indices, idx_t n_data) noexcept nogil:
    """0 when the structure is well formed, else the code of the first fault found."""
    cdef idx_t i, p, nnz
    cdef sp_index c
    if indptr[0] != 0:
        return 1
    for i in range(nrows):
        if indptr[i + 1] < indptr[i]:
            return 2
    nnz = indptr[nrows]
    if nnz > n_indices or nnz > n_data:
        return 3
    for p in range(nnz):
        c = indices[p]
        if c < 0 or c >= ncols:
            return 4
    return 0


_FAULTS = {1: "indptr[0] is not 0",
           2: "indptr is not monotonically non-decreasing",
           3: "indptr[-1] is larger than the number of stored indices or values",
           4: "an index is out of range"}


def check_csr(cnp.ndarray indptr, cnp.ndarray indices, Py_ssize_t n_data, idx_t nrows,
              idx_t ncols, str name="matrix"):
    """Raise ValueError unless (indptr, indices) describe a valid compressed structure with
    ``nrows`` compressed rows and ``ncols`` columns and ``n_data`` stored values.

    ``indptr`` and ``indices`` are contiguous arrays of one index dtype, int32 or int64.
    """
    cdef int rc
    cdef idx_t n_idx = indices.shape[0]
    if indptr.ndim != 1 or indices.ndim != 1:
        raise ValueError(f"{name}: indptr and indices must be 1-D")
    if indptr.shape[0] != nrows + 1:
        raise ValueError(f"{name}: indptr has length {indptr.shape[0]}; expected "
                         f"{nrows + 1} for {nrows} compressed rows")
    if indptr.dtype != indices.dtype or indptr.dtype not in (I32, I64):
        raise TypeError(f"{name}: index arrays must both be int32 or both int64, got "
                        f"{indptr.dtype} and {indices.dtype}")
    if not (indptr.flags.c_contiguous and indices.flags.c_contiguous):
        raise ValueError(f"{name}: index arrays must be contiguous")
    if indptr.dtype == I32:
        with nogil:
            rc = _check(nrows, ncols, <const int32_t*> cnp.PyArray_DATA(indptr),
                        <const int32_t*> cnp.PyArray_DATA(indices), n_idx, n_data)
    else:
        with nogil:
            rc = _check(nrows, ncols, <const int64_t*> cnp.PyArray_DATA(indptr),
                        <const int64_t*> cnp.PyArray_DATA(indices), n_idx, n_data)
    if rc:
        raise ValueError(f"{name}: malformed sparse matrix: {_FAULTS[rc]}")


cdef inline idx_t _row_at(const sp_index* indptr, idx_t nrows, double target) noexcept nogil:
    """The first row i in [0, nrows] with indptr[i] + i >= target.  indptr[i] + i (nonzeros
    before row i, plus one per row for writing it) grows strictly, so equal targets split
    the rows into runs of equal work however the nonzeros are spread."""
    cdef idx_t lo = 0, hi = nrows, mid
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if <double> indptr[mid] + <double> mid >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef bint _stop_here(signal_poll* poll, bint caller) noexcept nogil:
    """Whether this thread should stop taking work: the caller first runs the signal handlers
    when due (poll_step); every thread then sees a stop that any poll has marked."""
    if caller:
        poll_step(poll, 0)
    return stop_before(poll, 1)


cdef bint _gather_rows(const kernel_set_t* ks, idx_t r0, idx_t r1, const sp_index* indptr,
                       const sp_index* indices, const floating* data, const floating* x,
                       idx_t rs_x, idx_t n, floating alpha, floating beta, floating* y,
                       idx_t rs_y, signal_poll* poll, bint caller) noexcept nogil:
    """Rows r0..r1 of Y = alpha * M @ X + beta * Y; True when stopped by an interrupt (rows
    from there on are left as they were)."""
    cdef idx_t i, p0, since = 0
    for i in range(r0, r1):
        p0 = indptr[i]
        ukr_csr_gather(ks, indptr[i + 1] - p0, data + p0, indices + p0, x, rs_x, n, alpha,
                       beta, y + i * rs_y)
        since += (indptr[i + 1] - p0 + 1) * n
        if since >= POLL_WORK:
            since = 0
            if _stop_here(poll, caller):
                return True
    return False


cdef int _gather_run(const kernel_set_t* ks, int nt, idx_t nrows, const sp_index* indptr,
                     const sp_index* indices, const floating* data, const floating* x,
                     idx_t rs_x, idx_t n, floating alpha, floating beta, floating* y,
                     idx_t rs_y) noexcept nogil:
    """Y = alpha * M @ X + beta * Y.  Threads take runs of rows of equal nonzeros (plus
    rows), so a few dense rows do not leave one thread with all the work; each owns its rows
    of Y.  Returns 0, or INTERRUPTED when a signal handler raised."""
    cdef double total = <double> indptr[nrows] + <double> nrows
    cdef signal_poll* poll = caller_poll()
    if nt > nrows:
        nt = <int> nrows
    if nt <= 1 or total * n < THREAD_MIN_WORK:
        if _gather_rows(ks, 0, nrows, indptr, indices, data, x, rs_x, n, alpha, beta, y,
                        rs_y, poll, True):
            return INTERRUPTED
        return 0
    _sp_items(False, ks, nt, nt, nrows, 0, indptr, indices, data, x, rs_x, n, alpha, beta,
              y, rs_y, total, 0, poll)
    return INTERRUPTED if interrupted(poll) else 0


cdef bint _scatter_cols(const kernel_set_t* ks, idx_t j0, idx_t j1, idx_t nrows,
                        idx_t ncols, const sp_index* indptr, const sp_index* indices,
                        const floating* data, const floating* x, idx_t rs_x,
                        floating alpha, floating beta, floating* y, idx_t rs_y,
                        signal_poll* poll, bint caller) noexcept nogil:
    """Columns j0..j1 of Y = alpha * M.T @ X + beta * Y; True when stopped by an interrupt.

    One chunk of columns may be all of them (one thread), and every nonzero of M adds into
    it, so the looks for a stop come between blocks of M's rows, not only between chunks."""
    cdef idx_t i, p0, w = j1 - j0, since = 0
    for i in range(ncols):
        if beta == 0:
            memset(y + i * rs_y + j0, 0, w * sizeof(floating))
        elif beta != 1:
            ukr_scal(ks, w, beta, y + i * rs_y + j0, y + i * rs_y + j0)
    for i in range(nrows):
        p0 = indptr[i]
        if indptr[i + 1] > p0:
            ukr_csr_scatter(ks, indptr[i + 1] - p0, data + p0, indices + p0,
                            x + i * rs_x + j0, w, alpha, y + j0, rs_y)
        since += (indptr[i + 1] - p0) * w + 1
        if since >= POLL_WORK:
            since = 0
            if _stop_here(poll, caller):
                return True
    return False


cdef int _scatter_run(const kernel_set_t* ks, int nt, idx_t nrows, idx_t ncols,
                      const sp_index* indptr, const sp_index* indices, const floating* data,
                      const floating* x, idx_t rs_x, idx_t n, floating alpha,
                      floating beta, floating* y, idx_t rs_y) noexcept nogil:
    """Y = alpha * M.T @ X + beta * Y.  Each thread owns a slice of Y's columns (whole
    vectors: multiples of 16 elements) and walks every nonzero for it, so the threads never
    write the same element and need no atomics; the work per thread is nnz times its slice.
    Returns 0, or INTERRUPTED when a signal handler raised."""
    cdef double work = (<double> indptr[nrows] + <double> ncols) * n
    cdef idx_t chunk = n
    cdef signal_poll* poll = caller_poll()
    if nt > 1 and work >= THREAD_MIN_WORK:
        chunk = mt_share(n, nt)
        nt = <int> ((n + chunk - 1) // chunk)
    if nt <= 1 or work < THREAD_MIN_WORK:
        if _scatter_cols(ks, 0, n, nrows, ncols, indptr, indices, data, x, rs_x, alpha, beta,
                         y, rs_y, poll, True):
            return INTERRUPTED
        return 0
    _sp_items(True, ks, nt, nt, nrows, ncols, indptr, indices, data, x, rs_x, n, alpha, beta,
              y, rs_y, 0, chunk, poll)
    return INTERRUPTED if interrupted(poll) else 0


# -- the pool's entry point: share t of the rows (gather) or of Y's columns (scatter) ------------

ctypedef struct _sp_job:
    bint scatter, dbl, i64
    const kernel_set_t* ks
    int shares
    idx_t nrows, ncols, rs_x, n, rs_y, chunk
    const void* indptr
    const void* indices
    const void* data
    const void* x
    void* y
    double alpha, beta, total
    signal_poll* poll       # the caller's (helpers have none of their own to look at)


cdef void _sp_share(const _sp_job* j, idx_t t, bint caller, const sp_index* indptr,
                    const sp_index* indices, const floating* data, const floating* x,
                    floating* y) noexcept nogil:
    cdef idx_t r0, r1, j0
    if _stop_here(j.poll, caller):      # a share not yet begun is not begun after a stop
        return
    if j.scatter:
        j0 = t * j.chunk
        _scatter_cols(j.ks, j0, mt_share_end(j0, j.chunk, j.n), j.nrows, j.ncols, indptr,
                      indices, data, x, j.rs_x, <floating> j.alpha, <floating> j.beta, y,
                      j.rs_y, j.poll, caller)
    else:
        r0 = _row_at(indptr, j.nrows, j.total * t / j.shares)
        r1 = j.nrows if t == j.shares - 1 else _row_at(indptr, j.nrows,
                                                       j.total * (t + 1) / j.shares)
        _gather_rows(j.ks, r0, r1, indptr, indices, data, x, j.rs_x, j.n,
                     <floating> j.alpha, <floating> j.beta, y, j.rs_y, j.poll, caller)


cdef void _sp_item(void* ctx, idx_t t, int tid) noexcept nogil:
    # tid 0 is the calling thread (the pool's contract): the only one that polls.
    cdef const _sp_job* j = <const _sp_job*> ctx
    if j.dbl and j.i64:
        _sp_share(j, t, tid == 0, <const int64_t*> j.indptr, <const int64_t*> j.indices,
                  <const double*> j.data, <const double*> j.x, <double*> j.y)
    elif j.dbl:
        _sp_share(j, t, tid == 0, <const int32_t*> j.indptr, <const int32_t*> j.indices,
                  <const double*> j.data, <const double*> j.x, <double*> j.y)
    elif j.i64:
        _sp_share(j, t, tid == 0, <const int64_t*> j.indptr, <const int64_t*> j.indices,
                  <const float*> j.data, <const float*> j.x, <float*> j.y)
    else:
        _sp_share(j, t, tid == 0, <const int32_t*> j.indptr, <const int32_t*> j.indices,
                  <const float*> j.data, <const float*> j.x, <float*> j.y)


cdef void _sp_items(bint scatter, const kernel_set_t* ks, int nt, int shares, idx_t nrows,
                    idx_t ncols, const sp_index* indptr, const sp_index* indices,
                    const floating* data, const floating* x, idx_t rs_x, idx_t n,
                    floating alpha, floating beta, floating* y, idx_t rs_y, double total,
                    idx_t chunk, signal_poll* poll) noexcept nogil:
    cdef _sp_job j
    j.scatter = scatter
    j.dbl = floating is double
    j.i64 = sp_index is int64_t
    j.ks = ks
    j.shares = shares
    j.nrows = nrows
    j.ncols = ncols
    j.rs_x = rs_x
    j.n = n
    j.rs_y = rs_y
    j.chunk = chunk
    j.indptr = indptr
    j.indices = indices
    j.data = data
    j.x = x
    j.y = y
    j.alpha = alpha
    j.beta = beta
    j.total = total
    j.poll = poll
    pool_items(nt, shares, _sp_item, &j)


cdef inline idx_t _row_stride(cnp.ndarray a):
    return 0 if a.shape[0] <= 1 else a.strides[0] // a.itemsize


cdef bint _rows_contiguous(cnp.ndarray a):
    # An empty array's strides mean nothing (NumPy may give (0, 0)).
    return a.shape[0] == 0 or a.shape[1] <= 1 or a.strides[1] == a.itemsize


def csr_product(bint scatter, cnp.ndarray indptr, cnp.ndarray indices, cnp.ndarray data,
                idx_t ncols, cnp.ndarray X, cnp.ndarray Y, double alpha, double beta):
    """Y = alpha * op(M) @ X + beta * Y in place, op(M) = M.T when ``scatter``, M the CSR
    matrix (len(indptr) - 1) x ``ncols``.

    ``data``, ``X`` and ``Y`` are native, aligned arrays of one float dtype, ``data``
    contiguous; X and Y 2-D with contiguous rows; ``beta == 0`` means Y is not read.  The
    structure is checked first (ValueError for a malformed one).  A KeyboardInterrupt
    (Ctrl-C on the main thread) stops the product part-way and is raised here, Y then being
    partly written.
    """
    cdef idx_t nrows, n, rs_x, rs_y
    cdef gemm_params prm
    cdef const kernel_set_t* ks
    cdef int nt, rc
    cdef signal_poll poll
    cdef bint i32, f32
    cdef float af = <float> alpha, bf = <float> beta
    cdef void* ip
    cdef void* ix
    cdef void* pd
    cdef void* px
    cdef void* py
    if indptr.ndim != 1 or indptr.shape[0] < 1 or data.ndim != 1:
        raise ValueError("csr_product: indptr must be 1-D and non-empty, data 1-D")
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"csr_product: X and Y must be 2-D, got {np.shape(X)} and {np.shape(Y)}")
    nrows = indptr.shape[0] - 1
    n = Y.shape[1]
    check_csr(indptr, indices, data.shape[0], nrows, ncols)
    in_rows, out_rows = (nrows, ncols) if scatter else (ncols, nrows)
    if X.shape[0] != in_rows or Y.shape[0] != out_rows or X.shape[1] != n:
        raise ValueError(f"csr_product: X {np.shape(X)} and Y {np.shape(Y)} do not fit a "
                         f"{nrows} x {ncols} matrix")
    if not (_rows_contiguous(X) and _rows_contiguous(Y) and data.flags.c_contiguous):
        raise ValueError("csr_product: X and Y need contiguous rows, data contiguity")
    if not (data.dtype == X.dtype == Y.dtype) or data.dtype not in (F32, np.dtype(np.float64)):
        raise TypeError("csr_product: data, X and Y must share one float dtype")
    if Y.shape[0] == 0 or n == 0:
        return
    current_params(0 if data.dtype == F32 else 1, &prm)
    ks = kernel_set(prm.isa)
    nt = prm.n_threads
    rs_x = _row_stride(X)
    rs_y = _row_stride(Y)
    i32 = indptr.dtype == I32
    f32 = data.dtype == F32
    ip = cnp.PyArray_DATA(indptr)
    ix = cnp.PyArray_DATA(indices)
    pd = cnp.PyArray_DATA(data)
    px = cnp.PyArray_DATA(X)
    py = cnp.PyArray_DATA(Y)
    open_poll(&poll)
    with nogil:
        if f32:
            if scatter and i32:
                rc = _scatter_run(ks, nt, nrows, ncols, <const int32_t*> ip, <const int32_t*> ix,
                                  <const float*> pd, <const float*> px, rs_x, n, af, bf,
                                  <float*> py, rs_y)
            elif scatter:
                rc = _scatter_run(ks, nt, nrows, ncols, <const int64_t*> ip, <const int64_t*> ix,
                                  <const float*> pd, <const float*> px, rs_x, n, af, bf,
                                  <float*> py, rs_y)
            elif i32:
                rc = _gather_run(ks, nt, nrows, <const int32_t*> ip, <const int32_t*> ix,
                                 <const float*> pd, <const float*> px, rs_x, n, af, bf,
                                 <float*> py, rs_y)
            else:
                rc = _gather_run(ks, nt, nrows, <const int64_t*> ip, <const int64_t*> ix,
                                 <const float*> pd, <const float*> px, rs_x, n, af, bf,
                                 <float*> py, rs_y)
        else:
            if scatter and i32:
                rc = _scatter_run(ks, nt, nrows, ncols, <const int32_t*> ip, <const int32_t*> ix,
                                  <const double*> pd, <const double*> px, rs_x, n, alpha, beta,
                                  <double*> py, rs_y)
            elif scatter:
                rc = _scatter_run(ks, nt, nrows, ncols, <const int64_t*> ip, <const int64_t*> ix,
                                  <const double*> pd, <const double*> px, rs_x, n, alpha, beta,
                                  <double*> py, rs_y)
            elif i32:
                rc = _gather_run(ks, nt, nrows, <const int32_t*> ip, <const int32_t*> ix,
                                 <const double*> pd, <const double*> px, rs_x, n, alpha, beta,
                                 <double*> py, rs_y)
            else:
                rc = _gather_run(ks, nt, nrows, <const int64_t*> ip, <const int64_t*> ix,
                                 <const double*> pd, <const double*> px, rs_x, n, alpha, beta,
                                 <double*> py, rs_y)
        close_poll()
    raise_for_rc(rc, &poll, "spmm")
