"""Max and average pooling over (H, W) planes, forward and backward (PyTorch's semantics).

Every kernel works on one plane, and the drivers run ranges of planes as items on the thread
pool: planes are disjoint in both input and output, so the backward scatter-adds never race.

Max: the window's first maximum in row-major order wins a tie (a later element must be
strictly greater), a NaN always takes over (so NaN propagates, and the index is the last NaN
in the window, as on PyTorch's CPU), and the padding never wins (windows are clipped to the
plane; at most half a kernel of padding guarantees one real element).
Average: the divisor is kh*kw with ``count_include_pad``, else the number of real elements.
"""
from microtile._common._mt_pool cimport pool_ranges
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, int32_t, uint8_t

import numpy as np
cimport numpy as cnp

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport elem_stride, imax, imin

cnp.import_array()


ctypedef struct pool_geom:
    idx_t H, W, kh, kw, sh, sw, ph, pw, P, Q


cdef inline void _clip(idx_t i, idx_t stride, idx_t pad, idx_t k, idx_t size, idx_t* lo,
                       idx_t* hi) noexcept nogil:
    """[lo, hi): the real elements under window i along one axis."""
    cdef idx_t start = i * stride - pad
    lo[0] = imax(start, 0)
    hi[0] = imin(start + k, size)


cdef inline idx_t _count(const pool_geom* g, bint include_pad, idx_t h0, idx_t h1, idx_t w0,
                         idx_t w1) noexcept nogil:
    """The average's divisor."""
    return g.kh * g.kw if include_pad else (h1 - h0) * (w1 - w0)


cdef inline idx_t _argmax(const pool_geom* g, const floating* x, idx_t xs_h, idx_t xs_w,
                          idx_t h0, idx_t h1, idx_t w0, idx_t w1,
                          floating* best_out) noexcept nogil:
    """Flat index (h * W + w) of the window's winner; its value goes to best_out."""
    cdef idx_t ih, iw, best_i = h0 * g.W + w0
    cdef floating v, best = -INFINITY
    for ih in range(h0, h1):
        for iw in range(w0, w1):
            v = x[ih * xs_h + iw * xs_w]
            if v > best or v != v:
                best = v
                best_i = ih * g.W + iw
    best_out[0] = best
    return best_i


# Outputs of a row handled at once by the vectorised max (stack arrays of this many values
# and window offsets per thread).
cdef enum:
    MAX_BLOCK = 256


cdef inline void _max_taps(const floating* base, idx_t step, idx_t n, int32_t code,
                           floating* best, int32_t* arg) noexcept nogil:
    """One window tap for n outputs (the tap of output i at base[i * step]): a value greater
    than the best so far, or a NaN, takes over.  Branch-free selects, so the loop vectorises;
    step 1 and 2 are spelled out so that the compiler sees a constant stride (a branch per
    element on random data mispredicted half the time: 11 ns an output for 2x2 windows)."""
    cdef idx_t i
    cdef floating v, b
    cdef bint take
    if step == 1:
        for i in range(n):
            v = base[i]
            b = best[i]
            take = (v > b) | (v != v)
            best[i] = v if take else b
            arg[i] = code if take else arg[i]
    elif step == 2:
        for i in range(n):
            v = base[2 * i]
            b = best[i]
            take = (v > b) | (v != v)
            best[i] = v if take else b
            arg[i] = code if take else arg[i]
    else:
        for i in range(n):
            v = base[i * step]
            b = best[i]
            take = (v > b) | (v != v)
            best[i] = v if take else b
            arg[i] = code if take else arg[i]


cdef void _max_plane(const pool_geom* g, const floating* x, idx_t xs_h, idx_t xs_w,
                     floating* y, int64_t* idx, uint8_t* off) noexcept nogil:
    """y = window maxima of one plane; idx (or NULL) gets each winner's flat index h*W + w,
    off (or NULL) its offset r*kw + s in the window (kh*kw <= 256).  Outputs whose windows
    lie inside the width go through _max_taps a block of a row at a time, tap by tap in
    row-major order (so ties and NaN resolve as in _argmax); the few at the edges take
    _argmax."""
    cdef floating best[MAX_BLOCK]
    cdef int32_t arg[MAX_BLOCK]
    cdef idx_t p, q, h0, h1, w0, w1, best_i, hs, ws, q0, q1, nq, i, ih, s, qa, qb, r, c
    # Interior columns: q*sw - pw >= 0 and q*sw - pw + kw <= W.
    qa = (g.pw + g.sw - 1) // g.sw
    qb = (g.W - g.kw + g.pw) // g.sw + 1 if g.W >= g.kw - g.pw else 0
    if qb > g.Q:
        qb = g.Q
    if qa > qb:
        qa = qb
    for p in range(g.P):
        _clip(p, g.sh, g.ph, g.kh, g.H, &h0, &h1)
        hs = p * g.sh - g.ph
        for q in range(g.Q):
            if q == qa and qb > qa:
                continue
            if qa < q < qb:
                continue
            _clip(q, g.sw, g.pw, g.kw, g.W, &w0, &w1)
            best_i = _argmax(g, x, xs_h, xs_w, h0, h1, w0, w1, y + p * g.Q + q)
            if idx != NULL:
                idx[p * g.Q + q] = best_i
            if off != NULL:
                off[p * g.Q + q] = <uint8_t> ((best_i // g.W - hs) * g.kw
                                              + (best_i % g.W - (q * g.sw - g.pw)))
        q0 = qa
        while q0 < qb:
            q1 = imin(q0 + MAX_BLOCK, qb)
            nq = q1 - q0
            for i in range(nq):
                best[i] = -INFINITY
                arg[i] = <int32_t> ((h0 - hs) * g.kw)   # the first real tap, as _argmax
            for ih in range(h0, h1):
                for s in range(g.kw):
                    _max_taps(x + ih * xs_h + (q0 * g.sw - g.pw + s) * xs_w, g.sw * xs_w, nq,
                              <int32_t> ((ih - hs) * g.kw + s), best, arg)
            for i in range(nq):
                y[p * g.Q + q0 + i] = best[i]
            if off != NULL:
                for i in range(nq):
                    off[p * g.Q + q0 + i] = <uint8_t> arg[i]
            if idx != NULL:
                for i in range(nq):
                    r = arg[i] // g.kw
                    c = arg[i] - r * g.kw
                    idx[p * g.Q + q0 + i] = (hs + r) * g.W + (q0 + i) * g.sw - g.pw + c
            q0 = q1


cdef void _max_plane_backward_off(const pool_geom* g, const floating* dy, const uint8_t* off,
                                  floating* dx) noexcept nogil:
    """dx += dy at each window's winner, given as its offset in the window (see _max_plane):
    one byte read per output instead of an eight-byte index."""
    cdef idx_t delta[256]
    cdef idx_t p, q, r, c, start
    for r in range(g.kh):
        for c in range(g.kw):
            delta[r * g.kw + c] = r * g.W + c
    for p in range(g.P):
        start = (p * g.sh - g.ph) * g.W - g.pw
        for q in range(g.Q):
            dx[start + q * g.sw + delta[off[p * g.Q + q]]] += dy[p * g.Q + q]


cdef void _max_plane_backward(const pool_geom* g, const floating* dy, const int64_t* idx,
                              floating* dx) noexcept nogil:
    cdef idx_t j
    for j in range(g.P * g.Q):
        dx[idx[j]] += dy[j]


cdef void _max_plane_backward_x(const pool_geom* g, const floating* dy, const floating* x,
                                idx_t xs_h, idx_t xs_w, floating* dx) noexcept nogil:
    """The backward without saved indices: find each window's winner again."""
    cdef idx_t p, q, h0, h1, w0, w1
    cdef floating best
    for p in range(g.P):
        _clip(p, g.sh, g.ph, g.kh, g.H, &h0, &h1)
        for q in range(g.Q):
            _clip(q, g.sw, g.pw, g.kw, g.W, &w0, &w1)
            dx[_argmax(g, x, xs_h, xs_w, h0, h1, w0, w1, &best)] += dy[p * g.Q + q]


cdef void _avg_plane(const pool_geom* g, const floating* x, idx_t xs_h, idx_t xs_w,
                     floating* y, bint include_pad) noexcept nogil:
    cdef idx_t p, q, h0, h1, w0, w1, ih, iw
    cdef double acc     # a float32 sum would round at every step
    for p in range(g.P):
        _clip(p, g.sh, g.ph, g.kh, g.H, &h0, &h1)
        for q in range(g.Q):
            _clip(q, g.sw, g.pw, g.kw, g.W, &w0, &w1)
            acc = 0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    acc = acc + x[ih * xs_h + iw * xs_w]
            y[p * g.Q + q] = <floating> (acc / _count(g, include_pad, h0, h1, w0, w1))


cdef void _avg_plane_backward(const pool_geom* g, const floating* dy, floating* dx,
                              bint include_pad) noexcept nogil:
    # Clipped by hand: the same loop written with _clip and _count measured 5-10% slower
    # (gcc 12, float32, 3x3/2 windows).
    cdef idx_t p, q, h0, h1, w0, w1, ih, iw, hs, ws
    cdef floating share
    for p in range(g.P):
        hs = p * g.sh - g.ph
        h1 = imin(hs + g.kh, g.H)
        h0 = imax(hs, 0)
        for q in range(g.Q):
            ws = q * g.sw - g.pw
            w1 = imin(ws + g.kw, g.W)
            w0 = imax(ws, 0)
            if include_pad:
                share = dy[p * g.Q + q] / (g.kh * g.kw)
            else:
                share = dy[p * g.Q + q] / ((h1 - h0) * (w1 - w0))
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    dx[ih * g.W + iw] += share


# ------------------------------------------------------------------- plane-parallel drivers

cdef inline const floating* _plane(const floating* x, const idx_t* xs, idx_t u,
                                   idx_t C) noexcept nogil:
    """Plane u = n * C + c of an input with element strides xs (any layout)."""
    cdef idx_t n = u // C
    return x + n * xs[0] + (u - n * C) * xs[1]


cdef enum:
    PJ_MAX = 0
    PJ_AVG = 1
    PJ_MAX_BWD = 2
    PJ_AVG_BWD = 3

ctypedef struct _pool_job:
    int kind
    bint dbl, include_pad
    const pool_geom* g
    const void* x
    const idx_t* xs
    const void* dy
    int64_t* idx            # argmax indices (max forward: written; max backward: read)
    uint8_t* off            # or window offsets (the same, one byte each)
    void* out               # y (forward) or dx (backward)
    idx_t C


cdef void _pool_planes(const _pool_job* j, idx_t u0, idx_t u1, const floating* x,
                       const floating* dy, floating* out) noexcept nogil:
    cdef const pool_geom* g = j.g
    cdef idx_t u, PQ = g.P * g.Q, HW = g.H * g.W
    for u in range(u0, u1):
        if j.kind == PJ_MAX:
            _max_plane(g, _plane(x, j.xs, u, j.C), j.xs[2], j.xs[3], out + u * PQ,
                       j.idx + u * PQ if j.idx != NULL else NULL,
                       j.off + u * PQ if j.off != NULL else NULL)
        elif j.kind == PJ_AVG:
            _avg_plane(g, _plane(x, j.xs, u, j.C), j.xs[2], j.xs[3], out + u * PQ,
                       j.include_pad)
        elif j.kind == PJ_MAX_BWD:
            if j.off != NULL:
                _max_plane_backward_off(g, dy + u * PQ, j.off + u * PQ, out + u * HW)
            elif j.idx != NULL:
                _max_plane_backward(g, dy + u * PQ, j.idx + u * PQ, out + u * HW)
            else:
                _max_plane_backward_x(g, dy + u * PQ, _plane(x, j.xs, u, j.C), j.xs[2],
                                      j.xs[3], out + u * HW)
        else:
            _avg_plane_backward(g, dy + u * PQ, out + u * HW, j.include_pad)


cdef void _pool_range(void* ctx, idx_t u0, idx_t u1, int tid) noexcept nogil:
    cdef const _pool_job* j = <const _pool_job*> ctx
    if j.dbl:
        _pool_planes(j, u0, u1, <const double*> j.x, <const double*> j.dy, <double*> j.out)
    else:
        _pool_planes(j, u0, u1, <const float*> j.x, <const float*> j.dy, <float*> j.out)


cdef void _run_planes(int kind, const pool_geom* g, const void* x, const idx_t* xs,
                      const void* dy, int64_t* idx, void* out, idx_t planes, idx_t C,
                      bint include_pad, bint dbl, int nt, uint8_t* off=NULL) noexcept nogil:
    cdef _pool_job j
    j.off = off
    j.kind = kind
    j.dbl = dbl
    j.include_pad = include_pad
    j.g = g
    j.x = x
    j.xs = xs
    j.dy = dy
    j.idx = idx
    j.out = out
    j.C = C
    pool_ranges(nt, planes, 4 * nt, 1, _pool_range, &j)


cdef void _max_all(const pool_geom* g, const floating* x, const idx_t* xs, idx_t N, idx_t C,
                   floating* y, int64_t* idx, uint8_t* off, int nt) noexcept nogil:
    _run_planes(PJ_MAX, g, x, xs, NULL, idx, y, N * C, C, False, floating is double, nt, off)


cdef void _avg_all(const pool_geom* g, const floating* x, const idx_t* xs, idx_t N, idx_t C,
                   floating* y, bint include_pad, int nt) noexcept nogil:
    _run_planes(PJ_AVG, g, x, xs, NULL, NULL, y, N * C, C, include_pad, floating is double, nt)


cdef void _max_bwd_all(const pool_geom* g, const floating* dy, const int64_t* idx,
                       const uint8_t* off, const floating* x, const idx_t* xs, idx_t N,
                       idx_t C, floating* dx, int nt) noexcept nogil:
    _run_planes(PJ_MAX_BWD, g, x, xs, dy, <int64_t*> idx, dx, N * C, C, False,
                floating is double, nt, <uint8_t*> off)


cdef void _avg_bwd_all(const pool_geom* g, const floating* dy, idx_t planes, floating* dx,
                       bint include_pad, int nt) noexcept nogil:
    _run_planes(PJ_AVG_BWD, g, NULL, NULL, dy, NULL, dx, planes, 1, include_pad,
                floating is double, nt)


cdef pool_geom _geom(tuple gt):
    cdef pool_geom g
    g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.P, g.Q = gt
    return g


cdef inline void _strides(cnp.ndarray a, idx_t* out):
    cdef int i
    for i in range(4):
        out[i] = elem_stride(a, i)


def max_pool_into(cnp.ndarray x, cnp.ndarray y, object indices, tuple geom, int nt,
                  object offsets=None):
    """y (N, C, P, Q) C-contiguous; indices: int64 array of y's shape or None; offsets:
    uint8 array of y's shape or None, for windows of at most 256 elements (checked)."""
    cdef pool_geom g = _geom(geom)
    cdef idx_t xs[4]
    cdef idx_t N = x.shape[0], C = x.shape[1]
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    cdef int64_t* pi = NULL
    cdef uint8_t* po = NULL
    if offsets is not None:
        if (g.kh * g.kw > 256 or offsets.dtype != np.uint8 or offsets.size != y.size
                or not offsets.flags.c_contiguous):
            raise ValueError("max_pool_into: offsets need uint8 of y's size and at most "
                             "256 elements per window")
        po = <uint8_t*> cnp.PyArray_DATA(<cnp.ndarray> offsets)
    if y.size == 0:
        return
    _strides(x, xs)
    if indices is not None:
        pi = <int64_t*> cnp.PyArray_DATA(<cnp.ndarray> indices)
    if y.dtype == np.float32:
        with nogil:
            _max_all(&g, <const float*> px, xs, N, C, <float*> py, pi, po, nt)
    else:
        with nogil:
            _max_all(&g, <const double*> px, xs, N, C, <double*> py, pi, po, nt)


def avg_pool_into(cnp.ndarray x, cnp.ndarray y, bint include_pad, tuple geom, int nt):
    cdef pool_geom g = _geom(geom)
    cdef idx_t xs[4]
    cdef idx_t N = x.shape[0], C = x.shape[1]
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    if y.size == 0:
        return
    _strides(x, xs)
    if y.dtype == np.float32:
        with nogil:
            _avg_all(&g, <const float*> px, xs, N, C, <float*> py, include_pad, nt)
    else:
        with nogil:
            _avg_all(&g, <const double*> px, xs, N, C, <double*> py, include_pad, nt)


def max_pool_backward_into(cnp.ndarray dy, object indices, object x, cnp.ndarray dx,
                           tuple geom, int nt, object offsets=None):
    """dx (N, C, H, W) zeroed, C-contiguous += dy (C-contiguous) routed to each window's max:
    by ``offsets`` (uint8 window offsets as max_pool_into wrote them) or ``indices`` (int64,
    validated in range) when given, else found again in x."""
    cdef pool_geom g = _geom(geom)
    cdef idx_t xs[4]
    cdef idx_t N = dx.shape[0], C = dx.shape[1]
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* pdx = cnp.PyArray_DATA(dx)
    cdef void* px = NULL
    cdef int64_t* pi = NULL
    cdef uint8_t* po = NULL
    if dy.size == 0 or dx.size == 0:
        return
    if offsets is not None:
        if (g.kh * g.kw > 256 or offsets.dtype != np.uint8 or offsets.size != dy.size
                or not offsets.flags.c_contiguous):
            raise ValueError("max_pool_backward_into: offsets need uint8 of dy's size")
        po = <uint8_t*> cnp.PyArray_DATA(<cnp.ndarray> offsets)
    elif indices is not None:
        pi = <int64_t*> cnp.PyArray_DATA(<cnp.ndarray> indices)
    else:
        _strides(<cnp.ndarray> x, xs)
        px = cnp.PyArray_DATA(<cnp.ndarray> x)
    if dx.dtype == np.float32:
        with nogil:
            _max_bwd_all(&g, <const float*> pdy, pi, po, <const float*> px, xs, N, C,
                         <float*> pdx, nt)
    else:
        with nogil:
            _max_bwd_all(&g, <const double*> pdy, pi, po, <const double*> px, xs, N, C,
                         <double*> pdx, nt)


def avg_pool_backward_into(cnp.ndarray dy, cnp.ndarray dx, bint include_pad, tuple geom,
                           int nt):
    cdef pool_geom g = _geom(geom)
    cdef idx_t planes = dx.shape[0] * dx.shape[1]
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* pdx = cnp.PyArray_DATA(dx)
    if dy.size == 0 or dx.size == 0:
        return
    if dx.dtype == np.float32:
        with nogil:
            _avg_bwd_all(&g, <const float*> pdy, planes, <float*> pdx, include_pad, nt)
    else:
        with nogil:
            _avg_bwd_all(&g, <const double*> pdy, planes, <double*> pdx, include_pad, nt)

