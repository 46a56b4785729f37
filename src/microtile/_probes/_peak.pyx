"""The micro-kernel's peak: microtile's own packed kernel called over and over on panels
that live in L1, so the time is the FMA units' and nothing else's.  Tuned GEMM results are
then shown as a fraction of this figure.
"""
import numpy as np
cimport numpy as cnp

from microtile._common._typedefs cimport idx_t, floating
from microtile._kernels._ukernel cimport kernel_set_t, ukr_mr, ukr_nr, ukr_packed
from microtile._kernels._dispatch cimport kernel_set
from microtile._common._mt_pool cimport pool_items

cnp.import_array()


cdef void _spin(const kernel_set_t* ks, idx_t k, const floating* a, const floating* b,
                floating* c, idx_t reps) noexcept nogil:
    cdef idx_t r
    cdef int nr = ukr_nr(ks, a)
    for r in range(reps):
        ukr_packed(ks, k, a, b, c, nr, 1, 1.0, 1.0)


ctypedef struct _team:
    const kernel_set_t* ks
    bint dbl
    idx_t k, lda, ldb, ldc, reps
    const void* a
    const void* b
    void* c


cdef void _spin_item(void* ctx, idx_t t, int tid) noexcept nogil:
    cdef const _team* j = <const _team*> ctx
    if j.dbl:
        _spin(j.ks, j.k, (<const double*> j.a) + t * j.lda, (<const double*> j.b) + t * j.ldb,
              (<double*> j.c) + t * j.ldc, j.reps)
    else:
        _spin(j.ks, j.k, (<const float*> j.a) + t * j.lda, (<const float*> j.b) + t * j.ldb,
              (<float*> j.c) + t * j.ldc, j.reps)


cdef void _spin_team(const kernel_set_t* ks, idx_t k, const floating* a, idx_t lda,
                     const floating* b, idx_t ldb, floating* c, idx_t ldc, idx_t reps,
                     int threads) noexcept nogil:
    """_spin for each of ``threads`` rows of a, b and c, the rows items on the pool (a
    thread that does not come leaves its row to the others, and the figure shows it)."""
    cdef _team j
    if threads == 1:
        _spin(ks, k, a, b, c, reps)
        return
    j.ks = ks
    j.dbl = floating is double
    j.k = k
    j.lda = lda
    j.ldb = ldb
    j.ldc = ldc
    j.reps = reps
    j.a = a
    j.b = b
    j.c = c
    pool_items(threads, threads, _spin_item, &j)


def run(int isa, int dtype_code, Py_ssize_t k, Py_ssize_t reps, int threads=1):
    """Call the packed micro-kernel ``reps`` times on each of ``threads`` threads, each with
    its own A (mr x k), B (k x nr) and C (mr x nr) panels, all small enough for L1.

    Returns the floating-point operations done in total (2 * mr * nr * k * reps * threads);
    the caller times the call.  C accumulates (beta = 1) and is scaled down by the tiny
    inputs, so the values stay finite however long it runs.
    """
    cdef const kernel_set_t* ks = kernel_set(isa)
    cdef int mr, nr, t
    cdef idx_t kk = k, rr = reps
    if k < 1 or reps < 0 or threads < 1:
        raise ValueError("k >= 1, reps >= 0 and threads >= 1 are required")
    if dtype_code == 0:
        mr, nr = ukr_mr(ks, <float*> NULL), ukr_nr(ks, <float*> NULL)
    else:
        mr, nr = ukr_mr(ks, <double*> NULL), ukr_nr(ks, <double*> NULL)
    dt = np.float32 if dtype_code == 0 else np.float64
    # One set of panels per thread, 4 KiB apart so threads never share a line.
    pad = 4096 // np.dtype(dt).itemsize
    a = np.full((threads, mr * k + pad), 1e-6, dtype=dt)
    b = np.full((threads, nr * k + pad), 1e-6, dtype=dt)
    c = np.zeros((threads, mr * nr + pad), dtype=dt)
    cdef idx_t la = a.shape[1], lb = b.shape[1], lc = c.shape[1]
    cdef cnp.ndarray aa = a, bb = b, cc = c
    if dtype_code == 0:
        with nogil:
            _spin_team(ks, kk, <const float*> cnp.PyArray_DATA(aa), la,
                       <const float*> cnp.PyArray_DATA(bb), lb,
                       <float*> cnp.PyArray_DATA(cc), lc, rr, threads)
    else:
        with nogil:
            _spin_team(ks, kk, <const double*> cnp.PyArray_DATA(aa), la,
                       <const double*> cnp.PyArray_DATA(bb), lb,
                       <double*> cnp.PyArray_DATA(cc), lc, rr, threads)
    if not np.isfinite(c).all():
        raise FloatingPointError("peak loop produced non-finite values")
    return 2.0 * mr * nr * k * reps * threads
