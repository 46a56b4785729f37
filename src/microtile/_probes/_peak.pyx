"""The micro-kernel's peak: microtile's own packed kernel called over and over on panels
that live in L1, so the time is the FMA units' and nothing else's.  Tuned GEMM results are
then shown as a fraction of this figure.
"""
import numpy as np
from cython.parallel cimport prange

from microtile._common._typedefs cimport idx_t
from microtile._kernels._ukernel cimport kernel_set_t
from microtile._kernels._dispatch cimport kernel_set


cdef void _spin_s(const kernel_set_t* ks, idx_t k, const float* a, const float* b, float* c,
                  idx_t reps) noexcept nogil:
    cdef idx_t r
    for r in range(reps):
        ks.s.gemm(k, a, b, c, ks.s.nr, 1, 1.0, 1.0)


cdef void _spin_d(const kernel_set_t* ks, idx_t k, const double* a, const double* b,
                  double* c, idx_t reps) noexcept nogil:
    cdef idx_t r
    for r in range(reps):
        ks.d.gemm(k, a, b, c, ks.d.nr, 1, 1.0, 1.0)


def kernel_shape(int isa, int dtype_code):
    """(mr, nr) of the kernel the loop will call."""
    cdef const kernel_set_t* ks = kernel_set(isa)
    return (ks.s.mr, ks.s.nr) if dtype_code == 0 else (ks.d.mr, ks.d.nr)


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
    mr, nr = kernel_shape(isa, dtype_code)
    dt = np.float32 if dtype_code == 0 else np.float64
    # One set of panels per thread, 4 KiB apart so threads never share a line.
    pad = 4096 // np.dtype(dt).itemsize
    a = np.full((threads, mr * k + pad), 1e-6, dtype=dt)
    b = np.full((threads, nr * k + pad), 1e-6, dtype=dt)
    c = np.zeros((threads, mr * nr + pad), dtype=dt)
    cdef float[:, ::1] sa, sb, sc
    cdef double[:, ::1] da, db, dc
    if dtype_code == 0:
        sa, sb, sc = a, b, c
        if threads == 1:
            with nogil:
                _spin_s(ks, kk, &sa[0, 0], &sb[0, 0], &sc[0, 0], rr)
        else:
            for t in prange(threads, nogil=True, num_threads=threads, schedule="static",
                            chunksize=1):
                _spin_s(ks, kk, &sa[t, 0], &sb[t, 0], &sc[t, 0], rr)
    else:
        da, db, dc = a, b, c
        if threads == 1:
            with nogil:
                _spin_d(ks, kk, &da[0, 0], &db[0, 0], &dc[0, 0], rr)
        else:
            for t in prange(threads, nogil=True, num_threads=threads, schedule="static",
                            chunksize=1):
                _spin_d(ks, kk, &da[t, 0], &db[t, 0], &dc[t, 0], rr)
    if not np.isfinite(c).all():
        raise FloatingPointError("peak loop produced non-finite values")
    return 2.0 * mr * nr * k * reps * threads
