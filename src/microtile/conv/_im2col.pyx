"""im2col and col2im: copying convolution windows into GEMM columns and adding them back.

The kernels work on a range of channels and a range of output positions of one image, so the
convolution driver can fill workspace-sized chunks and parallelise over images or channels.
Per row, the valid output columns of each kernel offset are computed once (no per-element
bounds test); the copies and the padding's zeros are plain loops the compiler vectorises.
"""
from microtile._common._mt_pool cimport pool_ranges

import numpy as np
cimport numpy as cnp

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport elem_stride, imax, imin

cnp.import_array()


cdef inline void _valid_range(idx_t off, idx_t stride, idx_t size, idx_t n_out,
                              idx_t* lo, idx_t* hi) noexcept nogil:
    """Output indices o in [lo, hi) with 0 <= o * stride + off < size."""
    cdef idx_t a = 0, b
    if off < 0:
        a = (-off + stride - 1) // stride
    if size - 1 - off < 0:
        b = 0
    else:
        b = (size - 1 - off) // stride + 1
    a = imin(a, n_out)
    b = imin(b, n_out)
    if b < a:
        b = a
    lo[0] = a
    hi[0] = b


cdef inline void _im2col_row(const conv_geom* g, const floating* x, idx_t xs_c, idx_t xs_h,
                             idx_t xs_w, idx_t k, idx_t pq0, idx_t pq1,
                             floating* dst) noexcept nogil:
    """Row k = (c * R + r) * S + s of the column matrix, columns [pq0, pq1), into dst."""
    cdef idx_t RS = g.R * g.S, c, r, s, pq, p, q, qend, ih, off_w, qa, qb, lo, hi, i, step, j
    cdef const floating* src
    c = k // RS
    r = (k - c * RS) // g.S
    s = k - c * RS - r * g.S
    off_w = s * g.dw - g.pw
    _valid_range(off_w, g.sw, g.W, g.Q, &qa, &qb)
    step = g.sw * xs_w
    pq = pq0
    j = 0
    # One division for the first output row; then row after row.  Rows of a 32x32 image
    # are 32 columns: a division per row, and memset/memcpy calls for a padding's one
    # element, were most of the time (perf of a ResNet-like training step).
    p = pq // g.Q
    q = pq - p * g.Q
    while pq < pq1:
        qend = imin(g.Q, q + (pq1 - pq))
        ih = p * g.sh - g.ph + r * g.dh
        if ih < 0 or ih >= g.H:
            for i in range(qend - q):
                dst[j + i] = 0
        else:
            lo = imax(q, qa)
            hi = imin(qend, qb)
            if hi < lo:
                lo = qend
                hi = qend
            for i in range(lo - q):
                dst[j + i] = 0
            src = x + c * xs_c + ih * xs_h + (lo * g.sw + off_w) * xs_w
            if step == 1:
                for i in range(hi - lo):
                    dst[j + (lo - q) + i] = src[i]
            elif step == 2:
                # A constant stride lets the compiler vectorize with shuffles.
                for i in range(hi - lo):
                    dst[j + (lo - q) + i] = src[2 * i]
            else:
                for i in range(hi - lo):
                    dst[j + (lo - q) + i] = src[i * step]
            for i in range(hi - q, qend - q):
                dst[j + i] = 0
        j += qend - q
        pq += qend - q
        p += 1
        q = 0


cdef void im2col_rows(const conv_geom* g, const floating* x, idx_t xs_c, idx_t xs_h,
                      idx_t xs_w, idx_t k0, idx_t k1, idx_t pq0, idx_t pq1,
                      floating* cols, idx_t ld) noexcept nogil:
    cdef idx_t k
    for k in range(k0, k1):
        _im2col_row(g, x, xs_c, xs_h, xs_w, k, pq0, pq1, cols + (k - k0) * ld)


cdef inline void _col2im_row(const conv_geom* g, const floating* src, idx_t k, idx_t pq0,
                             idx_t pq1, floating* dx, idx_t xs_c, idx_t xs_h,
                             idx_t xs_w) noexcept nogil:
    """Add row k = (c * R + r) * S + s of the column matrix, columns [pq0, pq1) (at src),
    into dx."""
    cdef idx_t RS = g.R * g.S, c, r, s, pq, p, q, qend, ih, off_w, qa, qb, lo, hi, i, step, j
    cdef floating* dst
    c = k // RS
    r = (k - c * RS) // g.S
    s = k - c * RS - r * g.S
    off_w = s * g.dw - g.pw
    _valid_range(off_w, g.sw, g.W, g.Q, &qa, &qb)
    step = g.sw * xs_w
    pq = pq0
    j = 0
    p = pq // g.Q               # one division, then row after row (as _im2col_row)
    q = pq - p * g.Q
    while pq < pq1:
        qend = imin(g.Q, q + (pq1 - pq))
        ih = p * g.sh - g.ph + r * g.dh
        if 0 <= ih < g.H:
            lo = imax(q, qa)
            hi = imin(qend, qb)
            if lo < hi:
                dst = dx + c * xs_c + ih * xs_h + (lo * g.sw + off_w) * xs_w
                # Constant strides let the compiler vectorize the common cases.
                if step == 1:
                    for i in range(hi - lo):
                        dst[i] += src[j + (lo - q) + i]
                elif step == 2:
                    for i in range(hi - lo):
                        dst[2 * i] += src[j + (lo - q) + i]
                else:
                    for i in range(hi - lo):
                        dst[i * step] += src[j + (lo - q) + i]
        j += qend - q
        pq += qend - q
        p += 1
        q = 0


cdef void col2im_rows(const conv_geom* g, const floating* cols, idx_t ld, idx_t k0, idx_t k1,
                      idx_t pq0, idx_t pq1, floating* dx, idx_t xs_c, idx_t xs_h,
                      idx_t xs_w) noexcept nogil:
    cdef idx_t k
    for k in range(k0, k1):
        _col2im_row(g, cols + (k - k0) * ld, k, pq0, pq1, dx, xs_c, xs_h, xs_w)


ctypedef struct _lower_job:
    const conv_geom* g
    bint dbl, up            # up: im2col (image to columns), else col2im
    const void* src
    void* dst
    idx_t s_n, s_c, s_h, s_w, C


cdef void _lower_planes(const _lower_job* j, idx_t u0, idx_t u1, const floating* src,
                        floating* dst) noexcept nogil:
    cdef const conv_geom* g = j.g
    cdef idx_t u, n, c, PQ = g.P * g.Q, RS = g.R * g.S, HW = g.H * g.W
    for u in range(u0, u1):
        n = u // j.C
        c = u - n * j.C
        if j.up:
            im2col_rows(g, src + n * j.s_n, j.s_c, j.s_h, j.s_w, c * RS, (c + 1) * RS, 0, PQ,
                        dst + (n * j.C + c) * RS * PQ, PQ)
        else:
            # One (image, channel) plane per index: planes are disjoint, so no two threads
            # ever add into the same element.
            col2im_rows(g, src + n * j.s_n + c * RS * j.s_c, j.s_c, c * RS, (c + 1) * RS, 0,
                        PQ, dst + n * j.C * HW, HW, g.W, 1)


cdef void _lower_range(void* ctx, idx_t u0, idx_t u1, int tid) noexcept nogil:
    cdef const _lower_job* j = <const _lower_job*> ctx
    if j.dbl:
        _lower_planes(j, u0, u1, <const double*> j.src, <double*> j.dst)
    else:
        _lower_planes(j, u0, u1, <const float*> j.src, <float*> j.dst)


cdef void _im2col_all(const conv_geom* g, const floating* x, idx_t xs_n, idx_t xs_c,
                      idx_t xs_h, idx_t xs_w, idx_t N, idx_t C, floating* cols,
                      int nt) noexcept nogil:
    cdef _lower_job j
    j.g = g
    j.dbl = floating is double
    j.up = True
    j.src = x
    j.dst = cols
    j.s_n = xs_n
    j.s_c = xs_c
    j.s_h = xs_h
    j.s_w = xs_w
    j.C = C
    pool_ranges(nt, N * C, 4 * nt, 1, _lower_range, &j)


cdef void _col2im_all(const conv_geom* g, const floating* cols, idx_t cs_n, idx_t cs_r,
                      idx_t N, idx_t C, floating* dx, int nt) noexcept nogil:
    cdef _lower_job j
    j.g = g
    j.dbl = floating is double
    j.up = False
    j.src = cols
    j.dst = dx
    j.s_n = cs_n
    j.s_c = cs_r
    j.C = C
    pool_ranges(nt, N * C, 4 * nt, 1, _lower_range, &j)


cdef conv_geom _geom(tuple gt):
    cdef conv_geom g
    g.H, g.W, g.R, g.S, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.P, g.Q = gt
    return g


def im2col_into(cnp.ndarray x, cnp.ndarray cols, tuple geom, int nt):
    """cols (N, C*R*S, P*Q), C-contiguous, of x's dtype  <-  windows of x (N, C, H, W)."""
    cdef conv_geom g = _geom(geom)
    cdef idx_t N = x.shape[0], C = x.shape[1]
    cdef idx_t s0 = elem_stride(x, 0), s1 = elem_stride(x, 1), s2 = elem_stride(x, 2), s3 = elem_stride(x, 3)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pc = cnp.PyArray_DATA(cols)
    if cols.size == 0:
        return
    if x.dtype == np.float32:
        with nogil:
            _im2col_all(&g, <const float*> px, s0, s1, s2, s3, N, C, <float*> pc, nt)
    else:
        with nogil:
            _im2col_all(&g, <const double*> px, s0, s1, s2, s3, N, C, <double*> pc, nt)


def col2im_into(cnp.ndarray cols, cnp.ndarray dx, tuple geom, int nt):
    """dx (N, C, H, W), C-contiguous and zeroed, += cols (N, C*R*S, P*Q) of dx's dtype."""
    cdef conv_geom g = _geom(geom)
    cdef idx_t N = dx.shape[0], C = dx.shape[1]
    cdef idx_t s0 = elem_stride(cols, 0), s1 = elem_stride(cols, 1)
    cdef void* pc = cnp.PyArray_DATA(cols)
    cdef void* px = cnp.PyArray_DATA(dx)
    if dx.size == 0 or cols.size == 0:
        return
    if cols.shape[2] > 1 and elem_stride(cols, 2) != 1:
        raise ValueError("col2im_into: columns must be contiguous")
    if dx.dtype == np.float32:
        with nogil:
            _col2im_all(&g, <const float*> pc, s0, s1, N, C, <float*> px, nt)
    else:
        with nogil:
            _col2im_all(&g, <const double*> pc, s0, s1, N, C, <double*> px, nt)
