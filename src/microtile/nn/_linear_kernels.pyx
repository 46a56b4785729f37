"""A Linear layer's two backward GEMMs run side by side on the thread pool.

dW = dYᵀ·X and dX = dY·W read the same dY, share nothing else, and cost the same number of
multiply-adds.  Instead of two threaded GEMMs one after the other, row blocks of dW and of
dX are work items that the running threads claim, each computed with the single-threaded
driver (``gemm_serial``).  Both products are read in place through their strides: no transposed copies.
"""
from libc.stdint cimport int64_t

import numpy as np
cimport numpy as cnp

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport elem_stride, imin
from microtile._common._mt_pool cimport mt_share
from microtile._common._mt_pool cimport pool_items
from microtile._common._atomic64 cimport mt_atomic_add64
from microtile.linalg._gemm cimport gemm_params, gemm_serial
from microtile._config._params cimport current_params

cnp.import_array()

cdef object F32 = np.dtype(np.float32)
cdef object F64 = np.dtype(np.float64)


ctypedef struct _pair_job:
    const gemm_params* prm
    bint dbl
    idx_t batch, n_in, n_out, rs_x, cs_x, per_w, per_x, n_w
    const void* dz
    const void* x
    const void* w
    void* gw
    void* dx
    double beta_w
    int64_t fails      # atomic


cdef int _pair_block(_pair_job* jb, idx_t item, const floating* dz, const floating* x,
                     const floating* w, floating* gw, floating* dx) noexcept nogil:
    cdef idx_t r0, r1
    if item < jb.n_w:
        r0 = item * jb.per_w
        r1 = imin(jb.n_out, r0 + jb.per_w)
        if r0 >= r1:
            return 0
        # A = dzᵀ: row i of A is column i of dz (row stride 1, column stride n_out).
        return gemm_serial(jb.prm, r1 - r0, jb.n_in, jb.batch, <floating> 1, dz + r0, 1,
                           jb.n_out, x, jb.rs_x, jb.cs_x, <floating> jb.beta_w,
                           gw + r0 * jb.n_in, jb.n_in, 1)
    r0 = (item - jb.n_w) * jb.per_x
    r1 = imin(jb.batch, r0 + jb.per_x)
    if r0 >= r1:
        return 0
    return gemm_serial(jb.prm, r1 - r0, jb.n_in, jb.n_out, <floating> 1, dz + r0 * jb.n_out,
                       jb.n_out, 1, w, jb.n_in, 1, <floating> 0, dx + r0 * jb.n_in, jb.n_in, 1)


cdef void _pair_item(void* ctx, idx_t item, int tid) noexcept nogil:
    cdef _pair_job* jb = <_pair_job*> ctx
    cdef int rc
    if jb.dbl:
        rc = _pair_block(jb, item, <const double*> jb.dz, <const double*> jb.x,
                         <const double*> jb.w, <double*> jb.gw, <double*> jb.dx)
    else:
        rc = _pair_block(jb, item, <const float*> jb.dz, <const float*> jb.x,
                         <const float*> jb.w, <float*> jb.gw, <float*> jb.dx)
    if rc != 0:
        mt_atomic_add64(&jb.fails, 1)


cdef int _pair(const gemm_params* prm, int nt, idx_t batch, idx_t n_in, idx_t n_out,
               const floating* dz, const floating* x, idx_t rs_x, idx_t cs_x,
               const floating* w, floating* gw, floating* dx, floating beta_w) noexcept nogil:
    """gw = dzᵀ·x + beta_w·gw and dx = dz·w; dz (batch, n_out), w and gw (n_out, n_in) and
    dx (batch, n_in) C-contiguous.  Each product is cut into row blocks, items on the pool,
    so a thread that is not running leaves its blocks to the others."""
    cdef _pair_job jb
    jb.prm = prm
    jb.dbl = floating is double
    jb.batch = batch
    jb.n_in = n_in
    jb.n_out = n_out
    jb.rs_x = rs_x
    jb.cs_x = cs_x
    # Four blocks per thread and product: when a helper starts late or loses its core, the
    # caller's share of the tail is a small block, not half the work.
    jb.per_w = mt_share(n_out, 4 * nt)
    jb.per_x = mt_share(batch, 4 * nt)
    jb.n_w = (n_out + jb.per_w - 1) // jb.per_w
    jb.dz = dz
    jb.x = x
    jb.w = w
    jb.gw = gw
    jb.dx = dx
    jb.beta_w = beta_w
    jb.fails = 0
    pool_items(nt, jb.n_w + (batch + jb.per_x - 1) // jb.per_x, _pair_item, &jb)
    return -1 if jb.fails else 0


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
