"""Adaptive average pooling kernels (torch's bins) over (planes, H, W) arrays.

Output cell (i, j) of a (P, Q) result averages rows [floor(i*H/P), ceil((i+1)*H/P)) and
columns [floor(j*W/Q), ceil((j+1)*W/Q)) of its plane: bins cover the input, neighbouring
bins may overlap by one row or column when P does not divide H.  Planes are independent,
so threads take contiguous ranges of planes (items on the pool) and never write the same
element (the backward's overlapping bins stay within one plane, hence one thread).  Sums are
in float64.
"""
from microtile._common._typedefs cimport idx_t, floating
from microtile.linalg._gemm cimport gemm_params
from microtile._config._params cimport current_params
from microtile._common._mt_pool cimport pool_ranges

# Below this many input elements a second thread costs more than it saves.
cdef idx_t PAR_MIN = 1 << 15


cdef inline idx_t _start(idx_t i, idx_t n_in, idx_t n_out) noexcept nogil:
    return (i * n_in) // n_out


cdef inline idx_t _end(idx_t i, idx_t n_in, idx_t n_out) noexcept nogil:
    return ((i + 1) * n_in + n_out - 1) // n_out


cdef void _forward_planes(const floating* x, floating* y, idx_t p0, idx_t p1, idx_t h,
                          idx_t w, idx_t ph, idx_t pw) noexcept nogil:
    cdef idx_t p, i, j, r, c, r0, r1, c0, c1
    cdef const floating* xp
    cdef floating* yp
    cdef double s
    for p in range(p0, p1):
        xp = x + p * h * w
        yp = y + p * ph * pw
        for i in range(ph):
            r0 = _start(i, h, ph)
            r1 = _end(i, h, ph)
            for j in range(pw):
                c0 = _start(j, w, pw)
                c1 = _end(j, w, pw)
                s = 0
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        s += xp[r * w + c]
                yp[i * pw + j] = <floating> (s / ((r1 - r0) * (c1 - c0)))


cdef void _backward_planes(const floating* dy, floating* dx, idx_t p0, idx_t p1, idx_t h,
                           idx_t w, idx_t ph, idx_t pw) noexcept nogil:
    cdef idx_t p, i, j, r, c, r0, r1, c0, c1
    cdef const floating* dyp
    cdef floating* dxp
    cdef floating g
    for p in range(p0, p1):
        dyp = dy + p * ph * pw
        dxp = dx + p * h * w
        for i in range(h * w):
            dxp[i] = 0
        for i in range(ph):
            r0 = _start(i, h, ph)
            r1 = _end(i, h, ph)
            for j in range(pw):
                c0 = _start(j, w, pw)
                c1 = _end(j, w, pw)
                g = <floating> (dyp[i * pw + j] / <double> ((r1 - r0) * (c1 - c0)))
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        dxp[r * w + c] += g


ctypedef struct _planes_job:
    bint dbl, backward
    const void* x
    void* y
    idx_t h, w, ph, pw


cdef void _planes_range(void* ctx, idx_t p0, idx_t p1, int tid) noexcept nogil:
    cdef const _planes_job* j = <const _planes_job*> ctx
    if j.dbl:
        if j.backward:
            _backward_planes(<const double*> j.x, <double*> j.y, p0, p1, j.h, j.w, j.ph, j.pw)
        else:
            _forward_planes(<const double*> j.x, <double*> j.y, p0, p1, j.h, j.w, j.ph, j.pw)
    elif j.backward:
        _backward_planes(<const float*> j.x, <float*> j.y, p0, p1, j.h, j.w, j.ph, j.pw)
    else:
        _forward_planes(<const float*> j.x, <float*> j.y, p0, p1, j.h, j.w, j.ph, j.pw)


def adaptive_avg_pool2d(const floating[:, :, ::1] x, floating[:, :, ::1] y, bint backward):
    """Forward (``backward`` False): y (planes, P, Q) = bin means of x (planes, H, W).
    Backward: x is dy (planes, P, Q) and y is dx (planes, H, W), overwritten.
    H and W must be positive when P and Q are."""
    cdef idx_t planes = x.shape[0], h, w, ph, pw, p0
    cdef int nt = 1
    cdef gemm_params prm
    cdef _planes_job j
    if backward:
        ph, pw, h, w = x.shape[1], x.shape[2], y.shape[1], y.shape[2]
    else:
        h, w, ph, pw = x.shape[1], x.shape[2], y.shape[1], y.shape[2]
    if y.shape[0] != planes or ((h == 0 or w == 0) and ph * pw > 0):
        raise ValueError("adaptive_avg_pool2d: inconsistent shapes")
    if planes == 0 or ph == 0 or pw == 0:
        if backward and planes * h * w > 0:
            with nogil:
                for p0 in range(planes * h * w):
                    (&y[0, 0, 0])[p0] = 0
        return
    if planes * h * w >= PAR_MIN and planes > 1:
        current_params(0, &prm)
        nt = prm.n_threads if prm.n_threads > 1 else 1
        if nt > planes:
            nt = <int> planes
    cdef const floating* px = &x[0, 0, 0]
    cdef floating* py = &y[0, 0, 0]
    if nt == 1:
        with nogil:
            if backward:
                _backward_planes(px, py, 0, planes, h, w, ph, pw)
            else:
                _forward_planes(px, py, 0, planes, h, w, ph, pw)
        return
    j.dbl = floating is double
    j.backward = backward
    j.x = px
    j.y = py
    j.h = h
    j.w = w
    j.ph = ph
    j.pw = pw
    with nogil:
        pool_ranges(nt, planes, 4 * nt, 1, _planes_range, &j)
