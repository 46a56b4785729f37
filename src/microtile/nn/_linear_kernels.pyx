"""A Linear layer's two backward GEMMs run side by side on the OpenMP team.

dW = dYᵀ·X and dX = dY·W read the same dY, share nothing else, and cost the same number of
multiply-adds.  Instead of two threaded GEMMs one after the other (each synchronising its
threads on shared packed panels), half the team computes row blocks of dW and the other half
row blocks of dX, each thread with the single-threaded driver (``gemm_serial``) on its own
block.  Both products are read in place through their strides: no transposed copies.
"""
from cython.parallel cimport prange

import numpy as np
cimport numpy as cnp

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport elem_stride, imin
from microtile.linalg._gemm cimport gemm_params, gemm_serial
from microtile._config._params cimport current_params

cnp.import_array()

cdef object F32 = np.dtype(np.float32)
cdef object F64 = np.dtype(np.float64)


cdef int _pair(const gemm_params* prm, int nt, idx_t batch, idx_t n_in, idx_t n_out,
               const floating* dz, const floating* x, idx_t rs_x, idx_t cs_x,
               const floating* w, floating* gw, floating* dx, floating beta_w) noexcept nogil:
    """gw = dzᵀ·x + beta_w·gw and dx = dz·w; dz (batch, n_out), w and gw (n_out, n_in) and
    dx (batch, n_in) C-contiguous.  Threads [0, nw) take dW rows, the rest dX rows."""
    cdef int nw = nt // 2, nx = nt - nw, t, fails = 0
    cdef idx_t per_w = ((n_out + nw - 1) // nw + 15) & ~(<idx_t> 15)
    cdef idx_t per_x = ((batch + nx - 1) // nx + 15) & ~(<idx_t> 15)
    cdef idx_t r0, r1
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        if t < nw:
            r0 = t * per_w
            r1 = imin(n_out, r0 + per_w)
            if r0 < r1:
                # A = dzᵀ: row i of A is column i of dz (row stride 1, column stride n_out).
                fails += gemm_serial(prm, r1 - r0, n_in, batch, <floating> 1, dz + r0, 1, n_out,
                                     x, rs_x, cs_x, beta_w, gw + r0 * n_in, n_in, 1) != 0
        else:
            r0 = (t - nw) * per_x
            r1 = imin(batch, r0 + per_x)
            if r0 < r1:
                fails += gemm_serial(prm, r1 - r0, n_in, n_out, <floating> 1, dz + r0 * n_out,
                                     n_out, 1, w, n_in, 1, <floating> 0, dx + r0 * n_in,
                                     n_in, 1) != 0
    return -1 if fails else 0


def linear_weight_and_input_grads(cnp.ndarray dz, cnp.ndarray x, cnp.ndarray w,
                                  cnp.ndarray gw, cnp.ndarray dx, bint accumulate):
    """``gw = dzᵀ·x (+ gw when accumulate)`` and ``dx = dz·w`` concurrently.

    Returns False (doing nothing) when fewer than two threads are available, so that the
    caller runs the two threaded GEMMs in turn instead.  All arrays share one float dtype;
    dz, w, gw and dx are C-contiguous, x may have any strides.
    """
    cdef gemm_params prm
    cdef int code, rc
    cdef idx_t batch = dz.shape[0], n_out = dz.shape[1], n_in = w.shape[1]
    if dz.ndim != 2 or x.ndim != 2 or w.ndim != 2 or gw.ndim != 2 or dx.ndim != 2:
        raise ValueError("linear_weight_and_input_grads: 2-D arrays expected")
    dt = dz.dtype
    if not (dt is F32 or dt is F64) or any(a.dtype is not dt for a in (x, w, gw, dx)):
        raise TypeError("linear_weight_and_input_grads: one float dtype expected")
    if (x.shape[0] != batch or x.shape[1] != n_in or w.shape[0] != n_out
            or gw.shape[0] != n_out or gw.shape[1] != n_in or dx.shape[0] != batch
            or dx.shape[1] != n_in):
        raise ValueError("linear_weight_and_input_grads: inconsistent shapes")
    for a in (dz, w, gw, dx):
        if not cnp.PyArray_IS_C_CONTIGUOUS(a):
            raise ValueError("linear_weight_and_input_grads: dz, w, gw, dx must be C-contiguous")
    if not (gw.flags.writeable and dx.flags.writeable):
        raise ValueError("linear_weight_and_input_grads: outputs must be writeable")
    if not cnp.PyArray_ISALIGNED(x):
        raise ValueError("linear_weight_and_input_grads: x must be aligned")
    code = 0 if dt is F32 else 1
    current_params(code, &prm)
    if prm.n_threads < 2 or batch == 0 or n_in == 0 or n_out == 0:
        return False
    cdef int nt = prm.n_threads
    cdef idx_t rs_x = elem_stride(x, 0), cs_x = elem_stride(x, 1)
    cdef void* pdz = cnp.PyArray_DATA(dz)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pw = cnp.PyArray_DATA(w)
    cdef void* pgw = cnp.PyArray_DATA(gw)
    cdef void* pdx = cnp.PyArray_DATA(dx)
    if code == 0:
        with nogil:
            rc = _pair(&prm, nt, batch, n_in, n_out, <const float*> pdz, <const float*> px,
                       rs_x, cs_x, <const float*> pw, <float*> pgw, <float*> pdx,
                       <float> (1 if accumulate else 0))
    else:
        with nogil:
            rc = _pair(&prm, nt, batch, n_in, n_out, <const double*> pdz, <const double*> px,
                       rs_x, cs_x, <const double*> pw, <double*> pgw, <double*> pdx,
                       <double> (1 if accumulate else 0))
    if rc != 0:
        raise MemoryError("microtile: could not allocate GEMM packing buffers")
    return True
