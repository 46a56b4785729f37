"""Direct convolution without im2col or the GEMM: depthwise, small-group and few-channel layers.

Layout.  For one (image, group) the group's Cg input planes are copied, one band of output
rows at a time, into the calling thread's scratch: zero padding around them, and each padded
row split by column phase, padded column ``j*sw + f`` stored at ``f*Lp + j``, so that the
inputs of consecutive outputs are consecutive in memory whatever the stride.  Every filter
tap (c, r, s) is then a single offset into that scratch,

    off = c*plane + r*dh*L + ((s*dw) % sw)*Lp + (s*dw) // sw        (L = nph*Lp),

and output row p of the band reads scratch row p*sh.  The kernels (``conv_rows`` and
``conv_taps`` of the ISA modules, see ``_ukernel.pxd``) see only offsets and strides: no
boundary test in their loops, and any stride, padding and dilation.  Only the phases the
taps read are stored (``nph = min(sw, (S-1)*dw + 1)``), so a huge stride costs no memory.

* forward: y[k] = bias[k] + sum_t w[k, t] * scratch shifted by off[t], Kg outputs per call;
* dw: the same taps dotted with dy (``conv_taps``), summed in double per thread;
* dx: the transposed convolution, split by the phase (ih % sh, iw % sw) of dx.  Row
  ih = alpha + sh*a receives tap r only when sh divides alpha + pt - r*dh, from dy row
  a + e_r with e_r = (alpha + pt - r*dh) / sh, and likewise along the columns; so each
  phase of dx is a stride-1 correlation of dy with that phase's taps (none: zeros), and
  the work is the forward's.  dy's band is copied into scratch (zero outside dy), one plane
  per output channel of the group, and the taps (k, r, s) are offsets into it; a phase is
  written straight into dx when sw == 1, else through scratch.  Taps reaching past dy read
  the scratch's zeros, products col2im never forms: with an Inf or NaN weight they would
  be NaN where torch has a number, so the caller sends such weights to im2col
  (``all_finite``).

Threads take (image, group, band) units, each with its own scratch: the forward and dx
write disjoint parts of y and dx; dw and db go to one double partial per thread, summed in
thread order at the end.  The schedule is static, so a result does not depend on timing.
"""
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.math cimport isfinite
from libc.string cimport memset

import numpy as np
cimport numpy as cnp

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport ceil_div, elem_stride, imax, imin
from microtile._common._interrupt cimport (signal_poll, caller_poll, open_poll, close_poll,
                                           raise_for_rc, poll_step, stop_before, interrupted,
                                           INTERRUPTED)
from microtile._common._scratch cimport scratch_get, scratch_trim, SCRATCH_EXTRA
from microtile._common._mt_pool cimport pool_items
from microtile._common._atomic64 cimport mt_atomic_add64
from microtile._config._params cimport current_params
from microtile._kernels._dispatch cimport kernel_set
from microtile._kernels._ukernel cimport (kernel_set_t, ukr_conv_rows, ukr_conv_taps,
                                          CONV_PAD)
from microtile.linalg._gemm cimport gemm_params

from microtile.conv._conv import note_plan

cnp.import_array()

# Scratch bytes one band of a unit may take: well inside a 512 KiB L2, where the kernels
# read each element R*S times.  A whole 112x112 float32 plane (58 KiB) is one band.
cdef enum:
    BAND_BYTES = 1 << 17
    ALIGN = 64

# Forward shares per thread (see ``_all``).
cdef enum:
    FWD_SHARES = 8


ctypedef struct dplan:
    idx_t N, C, K, G, Cg, Kg
    idx_t H, W, R, S, sh, sw, pt, pl, dh, dw, P, Q
    idx_t T             # taps per output: Cg * R * S
    idx_t nph, Lp, L    # a forward scratch row: nph column phases of Lp elements
    idx_t wn            # padded columns the convolution reads: (Q-1)*sw + (S-1)*dw + 1
    idx_t nb            # bands per (image, group)
    idx_t bp            # output rows per forward band
    idx_t fplane        # scratch elements per input plane of a forward band
    # dx (backward only)
    idx_t ha            # rows of dx's first row phase: ceil(H / sh)
    idx_t ba            # phase rows per dx band
    idx_t emin, emax    # least and greatest dy row offset e_r of any tap
    idx_t fmin, fmax    # the same along the columns
    idx_t nalpha, nbeta # row and column phases of dx that hold elements
    idx_t wbmax         # columns of dx's first column phase: ceil(W / sw)
    idx_t ldy, dplane   # dy scratch row length and plane size
    idx_t tmp           # scratch elements for a phase of dx on its way to dx (sw > 1)
    bint need_w, need_x, need_b
    int nt


cdef inline idx_t _div_up(idx_t a, idx_t b) noexcept nogil:
    """a / b rounded up, for any a and b > 0 (C division truncates toward zero)."""
    if a <= 0:
        return -((-a) // b)
    return (a + b - 1) // b


cdef inline idx_t _aligned(idx_t nbytes) noexcept nogil:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


cdef void _fill(const floating* x, idx_t xs_h, idx_t xs_w, idx_t H, idx_t W, idx_t row0,
                idx_t rows, idx_t col0, idx_t sw, idx_t nph, idx_t Lp, idx_t ncols,
                floating* dst, idx_t L) noexcept nogil:
    """dst[i*L + f*Lp + j] = x[row0 + i, col0 + j*sw + f] for i < rows, f < nph, j < Lp (x at
    element strides xs_h, xs_w): the input under padded column j*sw + f of padded row i;
    zero where that lies outside x or at or past padded column ``ncols`` (columns the
    convolution never reads stay zero, whatever x holds there)."""
    cdef idx_t i, f, j, lo, hi
    cdef idx_t i0 = imin(rows, imax(0, -row0)), i1 = imax(i0, imin(rows, H - row0))
    cdef const floating* xr
    cdef floating* d
    # Rows [i0, i1) lie in x; the padding rows around them are zeros.
    for i in range(i0):
        memset(dst + i * L, 0, nph * Lp * sizeof(floating))
    for i in range(i1, rows):
        memset(dst + i * L, 0, nph * Lp * sizeof(floating))
    # Phase by phase, so that the bounds (three divisions) are worked out once per phase,
    # not once per row: they were a third of the fill of 14x14 planes.
    for f in range(nph):
        lo = imax(0, _div_up(-col0 - f, sw))
        hi = imin(imin(Lp, _div_up(W - col0 - f, sw)), _div_up(ncols - f, sw))
        if hi < lo:
            hi = lo
        for i in range(i0, i1):
            xr = x + (row0 + i) * xs_h
            d = dst + i * L + f * Lp
            # The margins are a padding's few elements: a loop, not a call to memset.
            for j in range(lo):
                d[j] = 0
            if sw == 1 and xs_w == 1:
                for j in range(lo, hi):
                    d[j] = xr[col0 + j]
            elif sw == 2 and xs_w == 1:
                # A literal stride: the compiler de-interleaves with shuffles.  Read through
                # a run-time stride this copy was 30 % of a stride-2 depthwise forward
                # (C144 56x56, batch 8, one thread; perf), one scalar load per element.
                for j in range(lo, hi):
                    d[j] = xr[col0 + f + 2 * j]
            else:
                for j in range(lo, hi):
                    d[j] = xr[(col0 + j * sw + f) * xs_w]
            for j in range(hi, Lp):
                d[j] = 0


cdef inline idx_t _fwd_rows(const dplan* d, idx_t bands_rows) noexcept nogil:
    """Scratch rows a forward band of ``bands_rows`` output rows reads."""
    return (bands_rows - 1) * d.sh + (d.R - 1) * d.dh + 1


cdef void _fill_x(const dplan* d, const floating* x, const idx_t* xs, idx_t n, idx_t g,
                  idx_t p0, idx_t p1, floating* scr) noexcept nogil:
    cdef idx_t c
    for c in range(d.Cg):
        _fill(x + n * xs[0] + (g * d.Cg + c) * xs[1], xs[2], xs[3], d.H, d.W, p0 * d.sh - d.pt,
              _fwd_rows(d, p1 - p0), -d.pl, d.sw, d.nph, d.Lp, d.wn, scr + c * d.fplane, d.L)


# ----------------------------------------------------------------------------- forward

cdef int _fwd_unit(const dplan* d, const kernel_set_t* ks, idx_t u, const floating* x,
                   const idx_t* xs, const floating* w, const idx_t* off,
                   const floating* bias, floating* y) noexcept nogil:
    cdef idx_t i = u % d.nb, ng = u // d.nb
    cdef idx_t n = ng // d.G, g = ng % d.G
    cdef idx_t p0 = i * d.bp, p1 = imin(d.P, p0 + d.bp)
    cdef floating* scr
    if p0 >= d.P:
        return 0
    scr = <floating*> scratch_get(SCRATCH_EXTRA, d.Cg * d.fplane * sizeof(floating))
    if scr == NULL:
        return -1
    _fill_x(d, x, xs, n, g, p0, p1, scr)
    ukr_conv_rows(ks, p1 - p0, d.Q, d.T, off, w + g * d.Kg * d.T, d.Kg,
                  NULL if bias == NULL else bias + g * d.Kg, scr, d.sh * d.L,
                  y + ((n * d.K + g * d.Kg) * d.P + p0) * d.Q, d.Q, d.P * d.Q)
    scratch_trim()
    return 0


# ----------------------------------------------------------------------------- backward

cdef void _db_band(const dplan* d, const floating* dy, idx_t n, idx_t g, idx_t p0, idx_t p1,
                   double* dbp) noexcept nogil:
    # Four independent chains, in double: a float32 sum over a whole plane would lose digits.
    cdef idx_t k, j, m = (p1 - p0) * d.Q, m4 = m - m % 4
    cdef double a0, a1, a2, a3
    cdef const floating* r
    for k in range(d.Kg):
        r = dy + ((n * d.K + g * d.Kg + k) * d.P + p0) * d.Q
        a0 = a1 = a2 = a3 = 0
        for j in range(0, m4, 4):
            a0 += r[j]
            a1 += r[j + 1]
            a2 += r[j + 2]
            a3 += r[j + 3]
        for j in range(m4, m):
            a0 += r[j]
        dbp[g * d.Kg + k] += (a0 + a1) + (a2 + a3)


cdef void _dx_band(const dplan* d, const kernel_set_t* ks, const idx_t* rtab,
                   const idx_t* stab, const floating* w, idx_t n, idx_t g, idx_t a0,
                   idx_t a1, const floating* scr, floating* tmp, idx_t* offp,
                   floating* wph, floating* dx) noexcept nogil:
    """Rows a0 <= a < a1 of every phase of dx for (n, g), from dy's band in ``scr``.
    rtab: per kernel row r its phase alpha and dy row offset e_r (2R entries); stab: the same
    per kernel column (2S)."""
    cdef idx_t alpha, beta, pa, wb, k, r, s, c, t, tph, a, b, RS = d.R * d.S, nr, ns
    cdef floating* o
    cdef floating* dxc
    cdef idx_t ors, oks
    cdef bint direct = d.sw == 1 or d.W == 1
    for alpha in range(d.nalpha):
        pa = imin(a1, _div_up(d.H - alpha, d.sh)) - a0
        if pa <= 0:
            continue
        nr = 0
        for r in range(d.R):
            nr += rtab[2 * r] == alpha
        for beta in range(d.nbeta):
            wb = _div_up(d.W - beta, d.sw)
            ns = 0
            for s in range(d.S):
                ns += stab[2 * s] == beta
            # This phase's taps: (k, r, s) with r in phase alpha and s in phase beta; the
            # weights as (input channel) x (tap) rows, the layout conv_rows reads.
            tph = d.Kg * nr * ns
            t = 0
            for k in range(d.Kg):
                for r in range(d.R):
                    if rtab[2 * r] != alpha:
                        continue
                    for s in range(d.S):
                        if stab[2 * s] != beta:
                            continue
                        offp[t] = (k * d.dplane + (rtab[2 * r + 1] - d.emin) * d.ldy
                                   + stab[2 * s + 1] - d.fmin)
                        for c in range(d.Cg):
                            wph[c * tph + t] = w[((g * d.Kg + k) * d.Cg + c) * RS
                                                 + r * d.S + s]
                        t += 1
            dxc = dx + (n * d.C + g * d.Cg) * d.H * d.W
            if direct:
                o = dxc + (alpha + d.sh * a0) * d.W + beta
                ors = d.sh * d.W
                oks = d.H * d.W
            else:
                o = tmp
                ors = wb
                oks = pa * wb
            ukr_conv_rows(ks, pa, wb, tph, offp, wph, d.Cg, NULL, scr, d.ldy, o, ors, oks)
            if not direct:
                for c in range(d.Cg):
                    for a in range(pa):
                        for b in range(wb):
                            dxc[c * d.H * d.W + (alpha + d.sh * (a0 + a)) * d.W + beta
                                + d.sw * b] = tmp[c * oks + a * wb + b]


cdef int _bwd_unit(const dplan* d, const kernel_set_t* ks, idx_t u, const floating* x,
                   const idx_t* xs, const floating* w, const idx_t* off, const idx_t* rtab,
                   const idx_t* stab, const floating* dy, floating* dx, double* dwp,
                   double* dbp) noexcept nogil:
    cdef idx_t i = u % d.nb, ng = u // d.nb
    cdef idx_t n = ng // d.G, g = ng % d.G, k
    cdef idx_t p0 = i * d.bp, p1 = imin(d.P, p0 + d.bp)
    cdef idx_t a0 = i * d.ba, a1 = imin(d.ha, a0 + d.ba)
    cdef idx_t buf = 0, nbytes, at_tmp, at_off, at_w
    cdef char* base
    if d.need_w and p0 < d.P:
        buf = d.Cg * d.fplane
    if d.need_x and a0 < a1:
        buf = imax(buf, d.Kg * d.dplane)
    at_tmp = _aligned(buf * sizeof(floating))
    at_off = at_tmp + _aligned(d.tmp * sizeof(floating))
    at_w = at_off + _aligned(d.Kg * d.R * d.S * sizeof(idx_t))
    nbytes = at_w + d.Cg * d.Kg * d.R * d.S * sizeof(floating)
    base = <char*> scratch_get(SCRATCH_EXTRA, nbytes)
    if base == NULL:
        return -1
    if p0 < d.P:
        if d.need_b:
            _db_band(d, dy, n, g, p0, p1, dbp)
        if d.need_w:
            _fill_x(d, x, xs, n, g, p0, p1, <floating*> base)
            for k in range(d.Kg):
                ukr_conv_taps(ks, p1 - p0, d.Q, d.T, off, <floating*> base, d.sh * d.L,
                              dy + ((n * d.K + g * d.Kg + k) * d.P + p0) * d.Q, d.Q,
                              dwp + (g * d.Kg + k) * d.T)
    if d.need_x and a0 < a1:
        for k in range(d.Kg):
            _fill(dy + (n * d.K + g * d.Kg + k) * d.P * d.Q, d.Q, 1, d.P, d.Q, a0 + d.emin,
                  a1 - a0 + d.emax - d.emin, d.fmin, 1, 1, d.ldy, d.ldy,
                  <floating*> base + k * d.dplane, d.ldy)
        _dx_band(d, ks, rtab, stab, w, n, g, a0, a1, <floating*> base,
                 <floating*> (base + at_tmp), <idx_t*> (base + at_off),
                 <floating*> (base + at_w), dx)
    scratch_trim()
    return 0


ctypedef struct _all_job:
    const dplan* d
    const kernel_set_t* ks
    bint backward, dbl
    const void* x
    const idx_t* xs
    const void* w
    const idx_t* off
    const void* bias
    const idx_t* rtab
    const idx_t* stab
    const void* dy
    void* out
    double* dwp
    double* dbp
    idx_t units, per
    signal_poll* poll
    int64_t fails           # atomic


cdef void _all_share(_all_job* j, idx_t t, int tid, const floating* x, const floating* w,
                     const floating* bias, const floating* dy, floating* out) noexcept nogil:
    cdef const dplan* d = j.d
    cdef idx_t u, u1 = imin(j.units, (t + 1) * j.per)
    cdef int rc
    for u in range(t * j.per, u1):
        if tid == 0:        # the caller polls for signals between its units
            poll_step(j.poll, 0)
        if stop_before(j.poll, 1):
            return
        if j.backward:
            rc = _bwd_unit(d, j.ks, u, x, j.xs, w, j.off, j.rtab, j.stab, dy, out,
                           j.dwp + t * d.K * d.T, j.dbp + t * d.K)
        else:
            rc = _fwd_unit(d, j.ks, u, x, j.xs, w, j.off, bias, out)
        if rc != 0:
            mt_atomic_add64(&j.fails, 1)
            return


cdef void _all_item(void* ctx, idx_t t, int tid) noexcept nogil:
    cdef _all_job* j = <_all_job*> ctx
    if j.dbl:
        _all_share(j, t, tid, <const double*> j.x, <const double*> j.w,
                   <const double*> j.bias, <const double*> j.dy, <double*> j.out)
    else:
        _all_share(j, t, tid, <const float*> j.x, <const float*> j.w,
                   <const float*> j.bias, <const float*> j.dy, <float*> j.out)


cdef int _all(const dplan* d, const kernel_set_t* ks, bint backward, const floating* x,
              const idx_t* xs, const floating* w, const idx_t* off, const floating* bias,
              const idx_t* rtab, const idx_t* stab, const floating* dy, floating* out,
              double* dwp, double* dbp) noexcept nogil:
    """Every (image, group, band) unit of the forward (into ``out`` = y) or the backward
    (``out`` = dx, and each thread's dw/db partials)."""
    cdef idx_t u, units = d.N * d.G * d.nb
    cdef int rc
    cdef signal_poll* poll = caller_poll()
    cdef _all_job j
    cdef idx_t shares
    if d.nt > 1:
        # Shares of consecutive units, items on the pool.  Backward: nt shares, share t
        # summing its units into partial t in the same order every call, whichever thread
        # takes it, so dw and db are the same bits on every run.  Forward (nothing summed
        # across units): FWD_SHARES per thread, so that a thread that runs takes over the
        # units of one the system has descheduled instead of waiting for it.
        j.d = d
        j.ks = ks
        j.backward = backward
        j.dbl = floating is double
        j.x = x
        j.xs = xs
        j.w = w
        j.off = off
        j.bias = bias
        j.rtab = rtab
        j.stab = stab
        j.dy = dy
        j.out = out
        j.dwp = dwp
        j.dbp = dbp
        j.units = units
        shares = d.nt if backward else imin(units, FWD_SHARES * d.nt)
        j.per = ceil_div(units, shares)
        j.poll = poll
        j.fails = 0
        pool_items(d.nt, ceil_div(units, j.per), _all_item, &j)
        if j.fails:
            return -1
        return INTERRUPTED if interrupted(poll) else 0
    for u in range(units):
        if poll_step(poll, 0):
            return INTERRUPTED
        if backward:
            rc = _bwd_unit(d, ks, u, x, xs, w, off, rtab, stab, dy, out, dwp, dbp)
        else:
            rc = _fwd_unit(d, ks, u, x, xs, w, off, bias, out)
        if rc != 0:
            return -1
    return 0


cdef void _reduce(const double* parts, idx_t n, int nt, floating* out) noexcept nogil:
    """out[j] = sum over threads t (in order) of parts[t*n + j]."""
    cdef idx_t j
    cdef int t
    cdef double s
    for j in range(n):
        s = parts[j]
        for t in range(1, nt):
            s += parts[t * n + j]
        out[j] = <floating> s


cdef int _bwd_run(const dplan* d, const kernel_set_t* ks, const floating* x, const idx_t* xs,
                  const floating* w, const idx_t* off, const idx_t* rtab, const idx_t* stab,
                  const floating* dy, floating* dx, floating* dw, floating* db, double* dwp,
                  double* dbp) noexcept nogil:
    """The backward's units, then dw and db from the threads' partials."""
    cdef int rc = _all(d, ks, True, x, xs, w, off, NULL, rtab, stab, dy, dx, dwp, dbp)
    if rc == 0 and d.need_w:
        _reduce(dwp, d.K * d.T, d.nt, dw)
    if rc == 0 and d.need_b:
        _reduce(dbp, d.K, d.nt, db)
    return rc


# ----------------------------------------------------------------------------- planning

cdef dplan _plan(cnp.ndarray x, idx_t K, tuple geom, idx_t groups, int n_threads,
                 bint backward, idx_t isz):
    cdef dplan d
    d.N = x.shape[0]
    d.C = x.shape[1]
    d.K = K
    d.G = groups
    d.Cg = d.C // groups
    d.Kg = K // groups
    d.H, d.W, d.R, d.S, d.sh, d.sw, d.pt, d.pl, d.dh, d.dw, d.P, d.Q = geom
    d.T = d.Cg * d.R * d.S
    d.nph = imin(d.sw, (d.S - 1) * d.dw + 1)
    d.Lp = d.Q + (d.S - 1) * d.dw // d.sw + CONV_PAD
    d.L = d.nph * d.Lp
    d.wn = (d.Q - 1) * d.sw + (d.S - 1) * d.dw + 1
    # Forward bands: as many output rows as keep the Cg planes' rows within BAND_BYTES.
    cdef idx_t rows = BAND_BYTES // max(d.Cg * d.L * isz, 1)
    cdef idx_t bp = max(1, (rows - (d.R - 1) * d.dh - 1) // d.sh + 1)
    cdef idx_t nb = ceil_div(d.P, imin(bp, d.P))
    d.ha = ceil_div(d.H, d.sh)
    if backward:
        _plan_dx(&d, isz)
        nb = max(nb, ceil_div(d.ha, max(1, BAND_BYTES // max(d.Kg * d.ldy * isz, 1)
                                        - (d.emax - d.emin))))
    # Enough units for the threads even with a single image and group.
    cdef idx_t units = d.N * d.G
    if units < n_threads:
        nb = max(nb, imin(ceil_div(n_threads, units), max(d.P, d.ha) if backward else d.P))
    d.nb = nb
    d.bp = ceil_div(d.P, nb)
    d.fplane = _fwd_rows(&d, d.bp) * d.L
    d.nt = <int> imin(n_threads, units * nb)
    if backward:
        d.ba = ceil_div(d.ha, nb)
        d.dplane = (d.ba + d.emax - d.emin) * d.ldy
        d.tmp = 0 if (d.sw == 1 or d.W == 1) else d.Cg * d.ba * d.wbmax
    return d


cdef void _plan_dx(dplan* d, idx_t isz):
    """The dy offsets of the taps (through their extremes) and dy's scratch row."""
    cdef idx_t r, s, e, f
    d.emin = d.fmin = 1 << 62
    d.emax = d.fmax = -(1 << 62)
    for r in range(d.R):
        e = _tap_shift(r * d.dh, d.pt, d.sh)
        d.emin = imin(d.emin, e)
        d.emax = imax(d.emax, e)
    for s in range(d.S):
        f = _tap_shift(s * d.dw, d.pl, d.sw)
        d.fmin = imin(d.fmin, f)
        d.fmax = imax(d.fmax, f)
    d.nalpha = imin(d.sh, d.H)
    d.nbeta = imin(d.sw, d.W)
    d.wbmax = ceil_div(d.W, d.sw)
    d.ldy = d.wbmax + d.fmax - d.fmin + CONV_PAD


cdef inline idx_t _tap_phase(idx_t reach, idx_t pad, idx_t stride) noexcept nogil:
    """The phase (input index mod stride) of the inputs a tap reaching ``reach`` past the
    window's start touches: (reach - pad) mod stride, in [0, stride)."""
    cdef idx_t m = (reach - pad) % stride
    return m + stride if m < 0 else m


cdef inline idx_t _tap_shift(idx_t reach, idx_t pad, idx_t stride) noexcept nogil:
    """For input index phase + stride*a, the output index a + shift this tap reads it from."""
    return (_tap_phase(reach, pad, stride) + pad - reach) // stride


cdef void _tap_offsets(const dplan* d, idx_t* off) noexcept nogil:
    """off[(c*R + r)*S + s]: where tap (c, r, s) of output row 0 reads the forward scratch."""
    cdef idx_t c, r, s, i = 0
    for c in range(d.Cg):
        for r in range(d.R):
            for s in range(d.S):
                off[i] = (c * d.fplane + r * d.dh * d.L + (s * d.dw) % d.sw * d.Lp
                          + s * d.dw // d.sw)
                i += 1


cdef void _note(const dplan* d, bint backward):
    note_plan({"algorithm": "direct", "units": d.N * d.G * d.nb, "bands": d.nb,
               "threads": d.nt, "pass": "backward" if backward else "forward"})


# ----------------------------------------------------------------------------- entry points

cdef bint _finite(const floating* a, idx_t n) noexcept nogil:
    cdef idx_t i
    for i in range(n):
        if not isfinite(a[i]):
            return False
    return True


def all_finite(cnp.ndarray w):
    """Whether every element of the C-contiguous float32/float64 array ``w`` is finite
    (without the temporary array of ``numpy.isfinite(w).all()``)."""
    cdef idx_t n = w.size
    cdef void* p = cnp.PyArray_DATA(w)
    cdef bint single = w.itemsize == 4, ok
    with nogil:
        if single:
            ok = _finite(<const float*> p, n)
        else:
            ok = _finite(<const double*> p, n)
    return ok


def forward(cnp.ndarray x, cnp.ndarray w, object bias, cnp.ndarray y, tuple geom,
            idx_t groups):
    """y (N, K, P, Q) C-contiguous  <-  the direct convolution of x with w (+ bias).

    x: (N, C, H, W) of y's dtype at any strides; w: (K, Cg*R*S) C-contiguous; bias: (K,)
    contiguous or None.  No size may be zero."""
    cdef gemm_params prm
    cdef int code = 0 if y.dtype == np.float32 else 1
    current_params(code, &prm)
    cdef dplan d = _plan(x, y.shape[1], geom, groups, prm.n_threads, False, y.itemsize)
    cdef const kernel_set_t* ks = kernel_set(prm.isa)
    cdef idx_t xs[4]
    cdef int i
    for i in range(4):
        xs[i] = elem_stride(x, i)
    cdef idx_t* off = <idx_t*> malloc(d.T * sizeof(idx_t))
    if off == NULL:
        raise MemoryError("microtile: out of memory in conv2d")
    _tap_offsets(&d, off)
    _note(&d, False)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pw = cnp.PyArray_DATA(w)
    cdef void* pb = NULL if bias is None else cnp.PyArray_DATA(<cnp.ndarray> bias)
    cdef void* py = cnp.PyArray_DATA(y)
    cdef signal_poll poll
    cdef int rc
    open_poll(&poll)
    with nogil:
        if code == 0:
            rc = _all(&d, ks, False, <const float*> px, xs, <const float*> pw, off,
                      <const float*> pb, NULL, NULL, NULL, <float*> py, NULL, NULL)
        else:
            rc = _all(&d, ks, False, <const double*> px, xs, <const double*> pw, off,
                      <const double*> pb, NULL, NULL, NULL, <double*> py, NULL, NULL)
        close_poll()
        scratch_trim()
    free(off)
    raise_for_rc(rc, &poll, "conv2d")


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray w, tuple geom, idx_t groups,
             bint need_w, bint need_x, bint need_b, object dx, object dw, object db):
    """Gradients of the direct convolution, into the arrays given (None: not wanted).

    dy (N, K, P, Q) C-contiguous; x (N, C, H, W) at any strides; w (K, Cg*R*S)
    C-contiguous; dx (N, C, H, W), dw (K, Cg*R*S) and db (K,) C-contiguous, all of one
    dtype; every element of each is written.  No size may be zero."""
    cdef gemm_params prm
    cdef int code = 0 if dy.dtype == np.float32 else 1
    current_params(code, &prm)
    cdef dplan d = _plan(x, dy.shape[1], geom, groups, prm.n_threads, True, dy.itemsize)
    d.need_w = need_w
    d.need_x = need_x
    d.need_b = need_b
    cdef const kernel_set_t* ks = kernel_set(prm.isa)
    cdef idx_t xs[4]
    cdef idx_t i, r, s
    for i in range(4):
        xs[i] = elem_stride(x, i)
    # One block: the forward offsets, the tap tables of dx, and the per-thread partials.
    cdef idx_t n_idx = d.T + 2 * d.R + 2 * d.S
    cdef idx_t n_part = <idx_t> d.nt * (d.K * d.T + d.K)
    cdef char* block = <char*> calloc(1, _aligned(n_idx * sizeof(idx_t))
                                      + n_part * sizeof(double))
    if block == NULL:
        raise MemoryError("microtile: out of memory in conv2d_backward")
    cdef idx_t* off = <idx_t*> block
    cdef idx_t* rtab = off + d.T
    cdef idx_t* stab = rtab + 2 * d.R
    cdef double* dwp = <double*> (block + _aligned(n_idx * sizeof(idx_t)))
    cdef double* dbp = dwp + <idx_t> d.nt * d.K * d.T
    _tap_offsets(&d, off)
    for r in range(d.R):
        rtab[2 * r] = _tap_phase(r * d.dh, d.pt, d.sh)
        rtab[2 * r + 1] = _tap_shift(r * d.dh, d.pt, d.sh)
    for s in range(d.S):
        stab[2 * s] = _tap_phase(s * d.dw, d.pl, d.sw)
        stab[2 * s + 1] = _tap_shift(s * d.dw, d.pl, d.sw)
    _note(&d, True)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pw = cnp.PyArray_DATA(w)
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* pdx = NULL if dx is None else cnp.PyArray_DATA(<cnp.ndarray> dx)
    cdef void* pdw = NULL if dw is None else cnp.PyArray_DATA(<cnp.ndarray> dw)
    cdef void* pdb = NULL if db is None else cnp.PyArray_DATA(<cnp.ndarray> db)
    cdef signal_poll poll
    cdef int rc
    open_poll(&poll)
    with nogil:
        if code == 0:
            rc = _bwd_run(&d, ks, <const float*> px, xs, <const float*> pw, off, rtab, stab,
                          <const float*> pdy, <float*> pdx, <float*> pdw, <float*> pdb, dwp,
                          dbp)
        else:
            rc = _bwd_run(&d, ks, <const double*> px, xs, <const double*> pw, off, rtab, stab,
                          <const double*> pdy, <double*> pdx, <double*> pdw, <double*> pdb,
                          dwp, dbp)
        close_poll()
        scratch_trim()
    free(block)
    raise_for_rc(rc, &poll, "conv2d_backward")
