"""Batch normalisation kernels: per-channel statistics, normalisation and its gradient.

Every array is viewed as (N, C, S): S is L for (N, C, L) inputs, H*W for (N, C, H, W) and 1
for (N, C), so a channel's data are N contiguous planes of S elements, C planes apart.
Threads take contiguous shares of the N*C planes, items on the thread pool (so the split works
for a small batch of large images and for a large batch of vectors alike); each share adds
its per-channel sums into its own float64 slice of ``work`` (no sharing, no atomics), and the
slices are reduced once every share has run.

Statistics are taken in one pass from sums of ``d = x - K`` and ``d*d`` in float64, where
``K`` is the channel's first element: shifting by a value of the channel keeps
``sum(d*d)/M - mean(d)^2`` free of the cancellation that raw moments suffer when the mean
is large against the spread.  The backward pass reads the data twice: once for the two sums
per channel it needs (sum(dy) and sum(dy * (x - mean))), once to write dx.

A ReLU that follows the layer in a Sequential is applied as the output is written, and its
derivative (from the kept output) as dy is read in both backward passes: Conv2d ->
BatchNorm2d -> ReLU then costs no pass of its own either way.

Private helpers of ``microtile.nn.BatchNorm*``: the callers check shapes and dtypes, and
own the buffers.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.math cimport sqrt

from microtile._common._mt_pool cimport pool_items, pool_ranges
from microtile.nn._bn_loops cimport (bn_table_t, mt_bn_sums_f, mt_bn_sums_d, mt_bn_affine_f,
                                     mt_bn_affine_d)

from microtile._common._typedefs cimport idx_t, floating
from microtile.linalg._gemm cimport gemm_params
from microtile._config._params cimport current_params

# Below this many elements a second thread costs more than it saves (a pass over ~256 KiB).
cdef idx_t PAR_MIN = 1 << 15

# Rows of the ``saved`` array the forward fills for the backward: the mean and 1/std used,
# then the scale and shift of the normalisation.
cdef enum:
    MEAN = 0
    INVSTD = 1
    SCALE = 2
    SHIFT = 3
    SAVED_ROWS = 4
# Rows of the backward's ``coef`` array: the two sums, then dx = A*dy + B*(x - mean) + C0.
cdef enum:
    SUM_DY = 0
    SUM_DYX = 1
    COEF_A = 2
    COEF_B = 3
    COEF_C = 4
    COEF_ROWS = 5


cdef int _max_threads() except -1:
    cdef gemm_params prm
    current_params(0, &prm)
    return prm.n_threads if prm.n_threads > 1 else 1


cdef int _threads_for(idx_t elems, idx_t planes) except -1:
    """Threads for a pass over ``elems`` elements in ``planes`` planes."""
    cdef int nt
    if elems < PAR_MIN or planes < 2:
        return 1
    nt = _max_threads()
    return <int> planes if planes < nt else nt


def work_size(idx_t channels):
    """Length of the float64 ``work`` array the kernels need for all threads."""
    return 2 * channels * _max_threads()


# The per-plane loops (_bn_loops.pxd): float32 from the table of the ISA in use (the GEMM's,
# read on every call: ``MICROTILE_ISA=generic`` and ``config_context`` choose it), float64
# from this module's baseline build.
cdef bn_table_t _tables[2]
_tables[0].sums_f = mt_bn_sums_f
_tables[0].affine_f = mt_bn_affine_f
_tables[1] = _tables[0]


def _load_avx2():
    from microtile._kernels._dispatch import available_isas
    if "avx2-fma" not in available_isas():
        return
    from microtile.nn import _norm_avx2
    _tables[1] = (<bn_table_t*> PyCapsule_GetPointer(_norm_avx2.table(),
                                                     b"microtile.bn_f32"))[0]


_load_avx2()


cdef const bn_table_t* _table() except NULL:
    cdef gemm_params prm
    current_params(0, &prm)
    return &_tables[1] if prm.isa == 1 else &_tables[0]


cdef void _sums_part(const bn_table_t* tab, const floating* x, const floating* u,
                     const floating* g, const double* shift, double* acc, idx_t p0, idx_t p1,
                     idx_t nc, idx_t s) noexcept nogil:
    """Planes [p0, p1): with d = x - shift[c], acc[c] += sum(d) and acc[nc + c] += sum(d*d)
    when u is NULL, else acc[c] += sum(u) and acc[nc + c] += sum(u*d).  With g (a fused
    ReLU's output), u is taken as 0 where g <= 0 (torch's threshold_backward)."""
    cdef idx_t p, i, c = p0 % nc
    cdef idx_t off
    cdef double s0, s1
    for i in range(2 * nc):
        acc[i] = 0
    for p in range(p0, p1):
        off = p * s
        if floating is float:
            tab.sums_f(x + off, NULL if u == NULL else u + off,
                       NULL if g == NULL else g + off, shift[c], s, &s0, &s1)
        else:
            mt_bn_sums_d(x + off, NULL if u == NULL else u + off,
                         NULL if g == NULL else g + off, shift[c], s, &s0, &s1)
        acc[c] += s0
        acc[nc + c] += s1
        c += 1
        if c == nc:
            c = 0


ctypedef struct _norm_job:
    const bn_table_t* tab
    bint sums, dbl, relu
    const void* x
    const void* u
    const void* g
    void* out
    const double* shift
    const double* mean
    const double* ca
    const double* cb
    const double* cc
    double* work
    idx_t per, planes, nc, s


cdef void _norm_share(const _norm_job* j, idx_t t, const floating* x, const floating* u,
                      const floating* g, floating* out) noexcept nogil:
    cdef idx_t p0 = t * j.per, p1 = p0 + j.per
    if p1 > j.planes:
        p1 = j.planes
    if p0 > j.planes:
        p0 = j.planes
    if j.sums:
        _sums_part(j.tab, x, u, g, j.shift, j.work + 2 * j.nc * t, p0, p1, j.nc, j.s)
    elif p0 < p1:
        _affine_part(j.tab, x, u, g, out, j.mean, j.ca, j.cb, j.cc, j.relu, p0, p1, j.nc,
                     j.s)


cdef void _norm_item(void* ctx, idx_t t, int tid) noexcept nogil:
    """Share t of the planes (each share an item on the pool)."""
    cdef const _norm_job* j = <const _norm_job*> ctx
    if j.dbl:
        _norm_share(j, t, <const double*> j.x, <const double*> j.u, <const double*> j.g,
                    <double*> j.out)
    else:
        _norm_share(j, t, <const float*> j.x, <const float*> j.u, <const float*> j.g,
                    <float*> j.out)


cdef void _sums(const bn_table_t* tab, const floating* x, const floating* u, const floating* g,
                const double* shift, double* out0, double* out1, double* work, idx_t n,
                idx_t nc, idx_t s, int nt) noexcept nogil:
    """Per-channel sums of _sums_part over all N*C planes into out0[c] and out1[c], on nt
    threads (each with 2*nc doubles of ``work``)."""
    cdef idx_t planes = n * nc, c
    cdef int t
    cdef double a, b
    cdef _norm_job j
    if nt == 1:
        _sums_part(tab, x, u, g, shift, work, 0, planes, nc, s)
    else:
        # Every share runs (an empty one zeroes its sums), whichever thread takes it.
        j.tab = tab
        j.sums = True
        j.dbl = floating is double
        j.x = x
        j.u = u
        j.g = g
        j.shift = shift
        j.work = work
        j.per = (planes + nt - 1) // nt
        j.planes = planes
        j.nc = nc
        j.s = s
        pool_items(nt, nt, _norm_item, &j)
    for c in range(nc):
        a = 0
        b = 0
        for t in range(nt):
            a = a + work[2 * nc * t + c]
            b = b + work[2 * nc * t + nc + c]
        out0[c] = a
        out1[c] = b


cdef void _affine_part(const bn_table_t* tab, const floating* x, const floating* u,
                       const floating* g, floating* out, const double* mean, const double* ca,
                       const double* cb, const double* cc, bint relu, idx_t p0, idx_t p1,
                       idx_t nc, idx_t s) noexcept nogil:
    """Planes [p0, p1): out = cb[c]*(x - mean[c]) + cc[c], plus ca[c]*u when u is given
    (u taken as 0 where g <= 0 when g is given, as in _sums_part); with ``relu`` (forward
    only) the result goes through ReLU as it is written (NaN kept, as torch.relu)."""
    cdef idx_t p, c = p0 % nc, off
    cdef double a
    for p in range(p0, p1):
        off = p * s
        a = ca[c] if u != NULL else 0
        if floating is float:
            tab.affine_f(x + off, NULL if u == NULL else u + off,
                         NULL if g == NULL else g + off, out + off, mean[c], a, cb[c],
                         cc[c], relu, s)
        else:
            mt_bn_affine_d(x + off, NULL if u == NULL else u + off,
                           NULL if g == NULL else g + off, out + off, mean[c], a, cb[c],
                           cc[c], relu, s)
        c += 1
        if c == nc:
            c = 0


cdef void _affine(const bn_table_t* tab, const floating* x, const floating* u,
                  const floating* g, floating* out, const double* mean, const double* ca,
                  const double* cb, const double* cc, bint relu, idx_t n, idx_t nc, idx_t s,
                  int nt) noexcept nogil:
    """_affine_part over all N*C planes on nt threads."""
    cdef idx_t planes = n * nc
    cdef _norm_job j
    if nt == 1:
        _affine_part(tab, x, u, g, out, mean, ca, cb, cc, relu, 0, planes, nc, s)
        return
    j.tab = tab
    j.sums = False
    j.dbl = floating is double
    j.x = x
    j.u = u
    j.g = g
    j.out = out
    j.mean = mean
    j.ca = ca
    j.cb = cb
    j.cc = cc
    j.relu = relu
    j.per = (planes + nt - 1) // nt
    j.planes = planes
    j.nc = nc
    j.s = s
    pool_items(nt, nt, _norm_item, &j)


# -- channel by channel ------------------------------------------------------------------------
# When there are channels enough for every thread, each channel is finished by one thread:
# its sums over its N planes, its coefficients, then its output planes, while those planes
# are still in L2 or L3 (one channel of a (32, 64, 56, 56) batch is 392 KiB).  Passing over
# the whole batch twice instead read it from memory twice: BatchNorm2d forward+backward on
# (32, 64, 56, 56) moved 8 passes' worth of bytes for 5 passes of data.

# Channels per thread below which the whole-batch passes split by planes are used instead
# (a thread then would wait for another's last channel), and the smallest plane taken
# channel by channel (smaller planes are rows of a BatchNorm1d batch: one call per element).
cdef idx_t CHAN_PER_THREAD = 2
cdef idx_t CHAN_MIN_PLANE = 16

ctypedef struct _chan_job:
    const bn_table_t* tab
    bint dbl, fwd, batch_stats, update, relu, acc_w, acc_b
    const void* x
    const void* u           # backward: dy
    const void* g           # backward: the fused ReLU's output, or NULL
    void* out               # y or dx (NULL: no dx)
    const void* w           # weight (or NULL)
    const void* b           # forward: bias (or NULL)
    void* rm                # forward: running mean / var (or NULL)
    void* rv
    void* gw                # backward: weight / bias gradients (or NULL)
    void* gb
    double factor, eps
    double* saved           # (SAVED_ROWS, nc)
    double* coef            # backward: (COEF_ROWS, nc)
    idx_t n, nc, s


cdef void _chan_sums(const bn_table_t* tab, const floating* x, const floating* u,
                     const floating* g, double k, idx_t n, idx_t nc, idx_t s, idx_t c,
                     double* s0, double* s1) noexcept nogil:
    """_sums_part's two sums for channel c alone (its N planes, in order)."""
    cdef idx_t i, off
    cdef double a, b
    s0[0] = 0
    s1[0] = 0
    for i in range(n):
        off = (i * nc + c) * s
        if floating is float:
            tab.sums_f(x + off, NULL if u == NULL else u + off,
                       NULL if g == NULL else g + off, k, s, &a, &b)
        else:
            mt_bn_sums_d(x + off, NULL if u == NULL else u + off,
                         NULL if g == NULL else g + off, k, s, &a, &b)
        s0[0] += a
        s1[0] += b


cdef void _chan_affine(const bn_table_t* tab, const floating* x, const floating* u,
                       const floating* g, floating* out, double m, double a, double b,
                       double k, bint relu, idx_t n, idx_t nc, idx_t s,
                       idx_t c) noexcept nogil:
    """_affine_part's write for channel c alone."""
    cdef idx_t i, off
    for i in range(n):
        off = (i * nc + c) * s
        if floating is float:
            tab.affine_f(x + off, NULL if u == NULL else u + off,
                         NULL if g == NULL else g + off, out + off, m, a, b, k, relu, s)
        else:
            mt_bn_affine_d(x + off, NULL if u == NULL else u + off,
                           NULL if g == NULL else g + off, out + off, m, a, b, k, relu, s)


cdef void _chan_fwd(const _chan_job* j, idx_t c, const floating* x, floating* y,
                    const floating* w, const floating* bias, floating* rm,
                    floating* rv) noexcept nogil:
    """batch_norm_forward for channel c: the same formulas, applied to one channel."""
    cdef double m = <double> j.n * <double> j.s, mu, var, inv, k, s0, s1
    cdef double* sv = j.saved
    if j.batch_stats:
        k = x[c * j.s]          # the shift K: the channel's first element
        _chan_sums(j.tab, x, <const floating*> NULL, <const floating*> NULL, k, j.n, j.nc,
                   j.s, c, &s0, &s1)
        mu = s0 / m
        var = s1 / m - mu * mu
        if var < 0:
            var = 0
        mu = mu + k
        if j.update:
            rm[c] = <floating> ((1 - j.factor) * rm[c] + j.factor * mu)
            rv[c] = <floating> ((1 - j.factor) * rv[c]
                                + j.factor * var * (m / (m - 1) if m > 1 else 1))
    else:
        mu = rm[c]
        var = rv[c]
    inv = 1 / sqrt(var + j.eps)
    sv[MEAN * j.nc + c] = mu
    sv[INVSTD * j.nc + c] = inv
    sv[SCALE * j.nc + c] = inv * (w[c] if w != NULL else 1)
    sv[SHIFT * j.nc + c] = bias[c] if bias != NULL else 0
    _chan_affine(j.tab, x, <const floating*> NULL, <const floating*> NULL, y, mu, 0,
                 sv[SCALE * j.nc + c], sv[SHIFT * j.nc + c], j.relu, j.n, j.nc, j.s, c)


cdef void _chan_bwd(const _chan_job* j, idx_t c, const floating* x, const floating* dy,
                    const floating* g, floating* dx, const floating* w, floating* gw,
                    floating* gb) noexcept nogil:
    """batch_norm_backward for channel c: the same formulas, applied to one channel."""
    cdef double m = <double> j.n * <double> j.s, wc, inv, sdy, sdyx, ca, cb, cc
    cdef double mean = j.saved[MEAN * j.nc + c]
    inv = j.saved[INVSTD * j.nc + c]
    _chan_sums(j.tab, x, dy, g, mean, j.n, j.nc, j.s, c, &sdy, &sdyx)
    if gw != NULL:
        gw[c] = <floating> ((gw[c] if j.acc_w else 0) + sdyx * inv)
    if gb != NULL:
        gb[c] = <floating> ((gb[c] if j.acc_b else 0) + sdy)
    wc = w[c] if w != NULL else 1
    ca = wc * inv
    if j.batch_stats:
        cb = -wc * inv * inv * inv * sdyx / m
        cc = -wc * inv * sdy / m
    else:
        cb = 0
        cc = 0
    j.coef[SUM_DY * j.nc + c] = sdy
    j.coef[SUM_DYX * j.nc + c] = sdyx
    j.coef[COEF_A * j.nc + c] = ca
    j.coef[COEF_B * j.nc + c] = cb
    j.coef[COEF_C * j.nc + c] = cc
    if dx != NULL:
        _chan_affine(j.tab, x, dy, g, dx, mean, ca, cb, cc, False, j.n, j.nc, j.s, c)


cdef void _chan_range(void* ctx, idx_t c0, idx_t c1, int tid) noexcept nogil:
    cdef const _chan_job* j = <const _chan_job*> ctx
    cdef idx_t c
    for c in range(c0, c1):
        if j.dbl and j.fwd:
            _chan_fwd(j, c, <const double*> j.x, <double*> j.out, <const double*> j.w,
                      <const double*> j.b, <double*> j.rm, <double*> j.rv)
        elif j.fwd:
            _chan_fwd(j, c, <const float*> j.x, <float*> j.out, <const float*> j.w,
                      <const float*> j.b, <float*> j.rm, <float*> j.rv)
        elif j.dbl:
            _chan_bwd(j, c, <const double*> j.x, <const double*> j.u, <const double*> j.g,
                      <double*> j.out, <const double*> j.w, <double*> j.gw, <double*> j.gb)
        else:
            _chan_bwd(j, c, <const float*> j.x, <const float*> j.u, <const float*> j.g,
                      <float*> j.out, <const float*> j.w, <float*> j.gw, <float*> j.gb)


cdef int _team(idx_t n, idx_t nc, idx_t s, idx_t work_len) except -1:
    """Threads for a forward or backward pass: ``_threads_for`` the planes, and no more than
    the float64 work array (``work_len`` elements, two per channel per thread) has room for."""
    cdef int nt = _threads_for(n * nc * s, n * nc)
    if nt > work_len // (2 * nc):
        nt = <int> (work_len // (2 * nc))
    return nt


cdef bint _by_channel(idx_t n, idx_t nc, idx_t s, int nt) noexcept nogil:
    """Whether a pass goes channel by channel (see above)."""
    return nt > 1 and n > 0 and s >= CHAN_MIN_PLANE and nc >= CHAN_PER_THREAD * nt


cdef bint _wrong_length(object arr, idx_t n):
    """A per-channel array (None allowed) whose length is not n."""
    return arr is not None and len(arr) != n


def batch_norm_forward(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                       const floating[::1] weight, const floating[::1] bias,
                       floating[::1] running_mean, floating[::1] running_var,
                       bint batch_stats, bint update, double factor, double eps,
                       double[:, ::1] saved, double[::1] work, bint relu=False):
    """y = (x - mean) / sqrt(var + eps) * weight + bias per channel.

    With ``batch_stats`` the mean and biased variance are the batch's (and, with
    ``update``, the running estimates move by ``factor`` towards the mean and the
    unbiased variance); otherwise the running estimates are used.  ``weight``/``bias``
    may be None (1 and 0).  ``saved`` (4, C) receives the mean and 1/std for the backward
    pass.  A batch statistic over no elements leaves the running estimates alone, as torch.
    With ``relu`` the output goes through ReLU in the same pass (a fused ReLU layer).
    """
    cdef idx_t n = x.shape[0], nc = x.shape[1], s = x.shape[2], c
    cdef double m = <double> n * <double> s, mu, var, inv
    if (y.shape[0] != n or y.shape[1] != nc or y.shape[2] != s or saved.shape[0] != SAVED_ROWS
            or saved.shape[1] != nc or work.shape[0] < 2 * nc):
        raise ValueError("batch_norm_forward: inconsistent shapes")
    if (_wrong_length(weight, nc) or _wrong_length(bias, nc)
            or _wrong_length(running_mean, nc) or _wrong_length(running_var, nc)):
        raise ValueError("batch_norm_forward: per-channel arrays must have C elements")
    if not batch_stats and (running_mean is None or running_var is None):
        raise ValueError("batch_norm_forward: running statistics needed")
    if update and (running_mean is None or running_var is None):
        raise ValueError("batch_norm_forward: running statistics needed")
    if nc == 0:
        return
    cdef const floating* px = &x[0, 0, 0] if m > 0 else NULL
    cdef floating* py = &y[0, 0, 0] if m > 0 else NULL
    cdef const floating* pw = &weight[0] if weight is not None else NULL
    cdef const floating* pb = &bias[0] if bias is not None else NULL
    cdef floating* prm = &running_mean[0] if running_mean is not None else NULL
    cdef floating* prv = &running_var[0] if running_var is not None else NULL
    cdef double* sv = &saved[0, 0]
    cdef double* mean = sv + MEAN * nc
    cdef double* invstd = sv + INVSTD * nc
    cdef double* scale = sv + SCALE * nc
    cdef double* shift = sv + SHIFT * nc
    cdef int nt = _team(n, nc, s, work.shape[0])
    cdef const bn_table_t* tab = _table()
    cdef _chan_job cj
    if _by_channel(n, nc, s, nt):
        cj.tab = tab
        cj.dbl = floating is double
        cj.fwd = True
        cj.batch_stats = batch_stats
        cj.update = update
        cj.relu = relu
        cj.x = px
        cj.out = py
        cj.w = pw
        cj.b = pb
        cj.rm = prm
        cj.rv = prv
        cj.factor = factor
        cj.eps = eps
        cj.saved = sv
        cj.n = n
        cj.nc = nc
        cj.s = s
        with nogil:
            pool_ranges(nt, nc, 4 * nt, 1, _chan_range, &cj)
        return
    with nogil:
        if batch_stats:
            # The shift K of each channel: its first element (see the module docstring).
            for c in range(nc):
                scale[c] = x[0, c, 0] if m > 0 else 0
            _sums(tab, px, <const floating*> NULL, <const floating*> NULL, scale, mean, invstd,
                  &work[0], n, nc, s, nt)
            for c in range(nc):
                if m > 0:
                    mu = mean[c] / m
                    var = invstd[c] / m - mu * mu
                    if var < 0:     # rounding; the variance itself never is
                        var = 0
                    mu = mu + scale[c]
                else:
                    mu = 0
                    var = 0
                if update and m > 0:
                    prm[c] = <floating> ((1 - factor) * prm[c] + factor * mu)
                    # torch's running variance is unbiased; with one element per channel
                    # training raises before getting here.
                    prv[c] = <floating> ((1 - factor) * prv[c]
                                         + factor * var * (m / (m - 1) if m > 1 else 1))
                mean[c] = mu
                invstd[c] = var
        else:
            for c in range(nc):
                mean[c] = prm[c]
                invstd[c] = prv[c]
        for c in range(nc):
            inv = 1 / sqrt(invstd[c] + eps)
            invstd[c] = inv
            scale[c] = inv * (pw[c] if pw != NULL else 1)
            shift[c] = pb[c] if pb != NULL else 0
        if m > 0:
            _affine(tab, px, <const floating*> NULL, <const floating*> NULL, py, mean,
                    <const double*> NULL, scale, shift, relu, n, nc, s, nt)


def batch_norm_backward(const floating[:, :, ::1] x, const floating[:, :, ::1] dy,
                        const floating[:, :, ::1] relu_output, floating[:, :, ::1] dx, const floating[::1] weight,
                        const double[:, ::1] saved, bint batch_stats,
                        floating[::1] grad_weight, floating[::1] grad_bias,
                        bint accumulate_weight, bint accumulate_bias,
                        double[:, ::1] coef, double[::1] work):
    """Gradients of batch_norm_forward (with the ``saved`` it filled).

    grad_weight (+)= sum(dy * xhat) and grad_bias (+)= sum(dy) per channel (either may be
    None); dx (None: not computed) as torch: with batch statistics the mean and variance
    depend on x too, so dx = w*invstd * (dy - mean(dy) - xhat * mean(dy * xhat)); with the
    running statistics dx = w*invstd * dy.  ``coef`` is (5, C) scratch.  ``relu_output``
    (None when no ReLU was fused) is the forward's output after a fused ReLU: dy is then the
    gradient of that output, cut where it is <= 0 as it is read.
    """
    cdef idx_t n = x.shape[0], nc = x.shape[1], s = x.shape[2], c
    cdef double m = <double> n * <double> s, w, inv
    if (dy.shape[0] != n or dy.shape[1] != nc or dy.shape[2] != s
            or saved.shape[0] != SAVED_ROWS or saved.shape[1] != nc
            or coef.shape[0] != COEF_ROWS or coef.shape[1] != nc
            or work.shape[0] < 2 * nc):
        raise ValueError("batch_norm_backward: inconsistent shapes")
    if dx is not None and (dx.shape[0] != n or dx.shape[1] != nc or dx.shape[2] != s):
        raise ValueError("batch_norm_backward: dx has the wrong shape")
    if relu_output is not None and (relu_output.shape[0] != n or relu_output.shape[1] != nc
                                    or relu_output.shape[2] != s):
        raise ValueError("batch_norm_backward: relu_output has the wrong shape")
    if (_wrong_length(weight, nc) or _wrong_length(grad_weight, nc)
            or _wrong_length(grad_bias, nc)):
        raise ValueError("batch_norm_backward: per-channel arrays must have C elements")
    if nc == 0:
        return
    cdef const floating* px = &x[0, 0, 0] if m > 0 else NULL
    cdef const floating* pdy = &dy[0, 0, 0] if m > 0 else NULL
    cdef floating* pdx = &dx[0, 0, 0] if (dx is not None and m > 0) else NULL
    cdef const floating* pg = &relu_output[0, 0, 0] if (relu_output is not None
                                                         and m > 0) else NULL
    cdef const floating* pw = &weight[0] if weight is not None else NULL
    cdef floating* pgw = &grad_weight[0] if grad_weight is not None else NULL
    cdef floating* pgb = &grad_bias[0] if grad_bias is not None else NULL
    cdef const double* mean = &saved[MEAN, 0]
    cdef const double* invstd = &saved[INVSTD, 0]
    cdef double* sdy = &coef[SUM_DY, 0]
    cdef double* sdyx = &coef[SUM_DYX, 0]
    cdef double* ca = &coef[COEF_A, 0]
    cdef double* cb = &coef[COEF_B, 0]
    cdef double* cc = &coef[COEF_C, 0]
    cdef int nt = _team(n, nc, s, work.shape[0])
    cdef const bn_table_t* tab = _table()
    cdef _chan_job cj
    if _by_channel(n, nc, s, nt):
        cj.tab = tab
        cj.dbl = floating is double
        cj.fwd = False
        cj.batch_stats = batch_stats
        cj.acc_w = accumulate_weight
        cj.acc_b = accumulate_bias
        cj.x = px
        cj.u = pdy
        cj.g = pg
        cj.out = pdx
        cj.w = pw
        cj.gw = pgw
        cj.gb = pgb
        cj.saved = <double*> &saved[0, 0]
        cj.coef = &coef[0, 0]
        cj.n = n
        cj.nc = nc
        cj.s = s
        with nogil:
            pool_ranges(nt, nc, 4 * nt, 1, _chan_range, &cj)
        return
    with nogil:
        if m > 0:
            _sums(tab, px, pdy, pg, mean, sdy, sdyx, &work[0], n, nc, s, nt)
        else:
            for c in range(nc):
                sdy[c] = 0
                sdyx[c] = 0
        for c in range(nc):
            inv = invstd[c]
            if pgw != NULL:
                pgw[c] = <floating> ((pgw[c] if accumulate_weight else 0) + sdyx[c] * inv)
            if pgb != NULL:
                pgb[c] = <floating> ((pgb[c] if accumulate_bias else 0) + sdy[c])
            w = pw[c] if pw != NULL else 1
            ca[c] = w * inv
            if batch_stats and m > 0:
                cb[c] = -w * inv * inv * inv * sdyx[c] / m
                cc[c] = -w * inv * sdy[c] / m
            else:
                cb[c] = 0
                cc[c] = 0
        if pdx != NULL:
            _affine(tab, px, pdy, pg, pdx, mean, ca, cb, cc, False, n, nc, s, nt)
