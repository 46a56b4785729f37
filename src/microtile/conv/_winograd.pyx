"""Winograd convolution F(m x m, 3 x 3) for 3x3, stride-1, undilated, ungrouped layers.

The output is cut into m x m tiles (m = 2 or 4; alpha = m + 2); tile (n, i, j) reads the
alpha x alpha window of x whose corner is (i*m - pt, j*m - pl), zero outside x, so any
padding (and the crops of the transposed convolution that dx is) is just an offset.  With
the matrices of ``_cook_toom``:

* filter transform  U[xi] (K x C)   = (G w[k, c] GT)[xi]
* input transform   V[xi] (C x T)   = (BT d[c, t] B)[xi]           for the T tiles of a chunk
* alpha**2 GEMMs    M[xi] (K x T)   = U[xi] @ V[xi]                (microtile's GEMM)
* output transform  y[k, tile t]    = (AT M[., k, t] A) + bias[k]  (edge tiles clipped)

for the alpha**2 transform points xi.  Tiles of all images are numbered in one sequence and
processed in chunks of T, so a small plane (or a single image) still gives wide GEMMs.

Memory beyond x, w and y: U for a block of filters, V and M for one chunk, and a small
per-thread scratch (two alpha**2 x TB blocks); ``_plan`` sizes them to the caller's
``conv_workspace`` cap (when U of all filters would take more than half of it, the filters
are done in blocks, each repeating the input transforms).  Layers for which not even one
filter and one tile fit are reported as not fitting, and the caller falls back to another
algorithm.

Threads (microtile's pool only): each phase of a chunk is split over the pool -- filters for
the filter and output transforms, (tile block, channel group) pairs for the input transform, and
(point, column block) pairs for the GEMMs, each run by ``gemm_serial`` -- so a batch-1 layer
with a single chunk keeps every thread busy.  Phases write disjoint parts of U, V, M and y.

The transforms (``_winograd_transforms.pxi`` over ``_winograd_apply.h``) work on blocks of TB
tiles laid out tile-minor, so every step is a small matrix applied to rows of TB contiguous
values, which the compiler vectorises for any point set; only the gather of the input window
and the scatter of the output tile are scalar.  The matrices are the exact ones of
``_cook_toom`` rounded once to the working precision.

Non-finite values: one Inf in a tile's input reaches every transform point of the tile, and
the output transform's sums of them give NaN where the direct sum has Inf or a number.
The input transform and the output transform therefore note any non-finite value they make
(an overflow of huge finite inputs included); the call then reports it and the caller
recomputes that layer on im2col, so IEEE propagation is as for the other algorithms.
"""
from libc.stdint cimport int64_t

from cpython.pycapsule cimport PyCapsule_GetPointer
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
from microtile._config._params cimport current_params, gemm_params
from microtile.linalg._gemm cimport gemm_serial, ACT_NONE, ACT_RELU

from microtile.conv._conv import give_workspace, note_plan, take_workspace
from microtile.conv._cook_toom import matrices
from microtile._kernels._dispatch import available_isas, isa_id

include "_winograd_transforms.pxi"

cnp.import_array()

cdef enum:
    # Returned by the driver when a transform made a non-finite value.
    NONFINITE = 1

# Tile sizes implemented (output tile m x m), and their matrices, built once (exactly, in
# fractions: ~1 ms of Python, a fifth of a batch-1 layer).
TILES = (2, 4)
_MATRICES = {m: matrices(m) for m in TILES}

# The transforms per kernel set: the baseline build of this module, and the AVX2/FMA one
# when the CPU has it (imported only then).
cdef wino_kernels_t _generic_table
_fill_table(&_generic_table)
cdef const wino_kernels_t* _avx2_table = NULL
cdef int _avx2_id = -1
if "avx2-fma" in available_isas():
    from microtile.conv import _winograd_avx2
    _avx2_table = <const wino_kernels_t*> PyCapsule_GetPointer(_winograd_avx2.table(),
                                                              b"microtile.wino_kernels")
    _avx2_id = isa_id("avx2-fma")


cdef const wino_kernels_t* _kernels(int isa) noexcept nogil:
    if isa == _avx2_id and _avx2_table != NULL:
        return _avx2_table
    return &_generic_table


cdef bint _plan(wplan* p, idx_t isz, idx_t cap, idx_t chunk) noexcept:
    """Filter blocks and tiles per chunk within ``cap`` bytes (all threads together), the
    chunk near ``chunk`` bytes of V and M per thread.  False when nothing fits."""
    cdef idx_t scr = <idx_t> p.nt * (2 * p.a2 + 1) * WINO_TB * isz
    cdef idx_t per_filter = p.a2 * p.C * isz, per_tile, rem, T, want, nsb
    p.alpha = p.m + 2
    p.tc = ceil_div(p.Q, p.m)
    p.tpi = ceil_div(p.P, p.m) * p.tc
    p.ntiles = p.N * p.tpi
    if p.ntiles == 0 or p.K == 0 or p.C == 0:
        return False
    # U takes at most half the cap; the rest is V and M.
    p.kb = p.K
    if per_filter * p.K > cap // 2:
        p.kb = (cap // 2) // per_filter
        if p.kb > 16:
            p.kb -= p.kb % 16
        if p.kb < 1:
            return False
    p.nkb = ceil_div(p.K, p.kb)
    p.kb = ceil_div(p.K, p.nkb)
    per_tile = p.a2 * (p.C + p.kb) * isz
    rem = cap - scr - per_filter * p.kb - 256      # 256: alignment of U, V, M
    T = rem // per_tile if rem > 0 else 0
    if T < 1:
        return False
    want = max(WINO_TB, (chunk * p.nt) // per_tile)
    T = imin(imin(T, want), p.ntiles)
    p.nch = ceil_div(p.ntiles, T)
    p.T = ceil_div(p.ntiles, p.nch)
    # Column blocks per point so that the (point, block) items share evenly: alpha**2 is
    # 16 or 36, a multiple of 2 and 4 threads already.
    p.ncs = 1
    while p.a2 * p.ncs < 2 * p.nt and p.T >= 32 * p.ncs:
        p.ncs += 1
    # Channels per input item: all of them when the tile blocks alone give every thread
    # several items, else fewer (a batch-1 layer may have a single block).
    nsb = ceil_div(p.T, WINO_TB)
    p.cg = p.C
    if nsb < 4 * p.nt:
        p.cg = max(1, ceil_div(p.C, ceil_div(4 * p.nt, nsb)))
    p.ws_bytes = scr + per_filter * p.kb + per_tile * p.T + 256
    return True


ctypedef struct wjob:
    int phase
    bint dbl
    const wplan* p
    const gemm_params* prm
    const wino_kernels_t* ker
    const void* x
    const void* w
    const void* bias
    void* y
    void* U
    void* V
    void* M
    idx_t k0, kcur, t0, tcur, nsb, ncgi
    signal_poll* poll
    int64_t fails           # atomic: no scratch
    int64_t nonfinite       # atomic: a transform made Inf or NaN


cdef enum:
    PH_FILTER = 0
    PH_INPUT = 1
    PH_GEMM = 2
    PH_OUTPUT = 3


cdef void _item(wjob* j, idx_t u, const floating* x, const floating* w,
                const floating* bias, floating* y, floating* U, floating* V,
                floating* M) noexcept nogil:
    cdef const wplan* p = j.p
    cdef idx_t sb, b0, nb, xi, cs, w0, w1, wcols, cgi
    cdef floating* scr
    cdef bint bad = False
    cdef int rc
    if j.phase == PH_GEMM:
        # The GEMM polls on the calling thread itself, and returns INTERRUPTED (not a
        # failure) when a handler raised.
        xi = u // p.ncs
        cs = u - xi * p.ncs
        wcols = ceil_div(ceil_div(j.tcur, p.ncs), 16) * 16
        w0 = cs * wcols
        w1 = imin(j.tcur, w0 + wcols)
        if w0 >= w1:
            return
        rc = gemm_serial(j.prm, j.kcur, w1 - w0, p.C, <floating> 1,
                         U + xi * j.kcur * p.C, p.C, 1,
                         V + xi * p.C * p.T + w0, p.T, 1,
                         <floating> 0, M + xi * j.kcur * p.T + w0, p.T, 1)
        if rc != 0 and rc != INTERRUPTED:
            mt_atomic_add64(&j.fails, 1)
        return
    scr = <floating*> scratch_get(SCRATCH_EXTRA, (2 * p.a2 + 1) * WINO_TB * sizeof(floating))
    if scr == NULL:
        mt_atomic_add64(&j.fails, 1)
        return
    if j.phase == PH_FILTER:
        if floating is float:
            j.ker.s_filter(p, w, j.k0 + u, u, j.kcur, U, scr)
        else:
            j.ker.d_filter(p, w, j.k0 + u, u, j.kcur, U, scr)
        return
    if j.phase == PH_INPUT:
        # (tile block, channel group) pairs.
        sb = u // j.ncgi
        cgi = u - sb * j.ncgi
        b0 = sb * WINO_TB
        nb = imin(WINO_TB, j.tcur - b0)
        if floating is float:
            bad = j.ker.s_input(p, x, cgi * p.cg, imin(p.C, (cgi + 1) * p.cg), j.t0, b0, nb,
                                V, scr)
        else:
            bad = j.ker.d_input(p, x, cgi * p.cg, imin(p.C, (cgi + 1) * p.cg), j.t0, b0, nb,
                                V, scr)
    else:
        # PH_OUTPUT: one filter over every tile block of the chunk.
        for sb in range(j.nsb):
            b0 = sb * WINO_TB
            nb = imin(WINO_TB, j.tcur - b0)
            if floating is float:
                bad |= j.ker.s_output(p, M, j.k0, u, u + 1, j.kcur, j.t0, b0, nb, bias, y,
                                      scr)
            else:
                bad |= j.ker.d_output(p, M, j.k0, u, u + 1, j.kcur, j.t0, b0, nb, bias, y,
                                      scr)
    if bad:
        mt_atomic_add64(&j.nonfinite, 1)


cdef void _pool_item(void* ctx, idx_t u, int tid) noexcept nogil:
    cdef wjob* j = <wjob*> ctx
    if tid == 0:        # the caller polls for signals between its items
        poll_step(j.poll, 0)
    if stop_before(j.poll, 1):
        return
    if j.dbl:
        _item(j, u, <const double*> j.x, <const double*> j.w, <const double*> j.bias,
              <double*> j.y, <double*> j.U, <double*> j.V, <double*> j.M)
    else:
        _item(j, u, <const float*> j.x, <const float*> j.w, <const float*> j.bias,
              <float*> j.y, <float*> j.U, <float*> j.V, <float*> j.M)


cdef int _run(const wplan* p, const gemm_params* prm, bint dbl, const void* x,
              const void* w, const void* bias, void* y, void* U, void* V,
              void* M) noexcept nogil:
    """Every filter block and chunk.  0, INTERRUPTED, NONFINITE, or -1 (no scratch)."""
    cdef wjob j
    cdef idx_t kbi, ch
    cdef signal_poll* poll = caller_poll()
    j.dbl = dbl
    j.p = p
    j.prm = prm
    j.ker = _kernels(prm.isa)
    j.x = x
    j.w = w
    j.bias = bias
    j.y = y
    j.U = U
    j.V = V
    j.M = M
    j.poll = poll
    j.fails = 0
    j.nonfinite = 0
    j.ncgi = ceil_div(p.C, p.cg)
    for kbi in range(p.nkb):
        j.k0 = kbi * p.kb
        j.kcur = imin(p.kb, p.K - j.k0)
        j.phase = PH_FILTER
        pool_items(p.nt, j.kcur, _pool_item, &j)
        for ch in range(p.nch):
            if poll_step(poll, 0) or interrupted(poll):
                return INTERRUPTED
            j.t0 = ch * p.T
            j.tcur = imin(p.T, p.ntiles - j.t0)
            j.nsb = ceil_div(j.tcur, WINO_TB)
            j.phase = PH_INPUT
            pool_items(p.nt, j.nsb * j.ncgi, _pool_item, &j)
            j.phase = PH_GEMM
            pool_items(p.nt, p.a2 * p.ncs, _pool_item, &j)
            j.phase = PH_OUTPUT
            pool_items(p.nt, j.kcur, _pool_item, &j)
            if j.fails:
                return -1
    if interrupted(poll):
        return INTERRUPTED
    if j.nonfinite:
        return NONFINITE
    return 0


cdef bint _setup(wplan* p, tuple geom, idx_t N, idx_t C, idx_t K, idx_t m, idx_t isz,
                 idx_t cap, idx_t chunk, int nt):
    H, W, pt, pl, P, Q = geom
    p.N = N
    p.C = C
    p.K = K
    p.H = H
    p.W = W
    p.pt = pt
    p.pl = pl
    p.P = P
    p.Q = Q
    p.m = m
    p.alpha = m + 2
    p.a2 = p.alpha * p.alpha
    p.nt = nt
    p.act = ACT_NONE
    return _plan(p, isz, cap, chunk)


def fits(tuple geom, idx_t N, idx_t C, idx_t K, idx_t m, idx_t itemsize, idx_t workspace,
         idx_t chunk, int threads):
    """Whether F(m x m, 3 x 3) of this layer fits ``workspace`` bytes.  geom: (H, W, pt, pl,
    P, Q)."""
    cdef wplan p
    if m not in TILES:
        return False
    return _setup(&p, geom, N, C, K, m, itemsize, workspace, chunk, threads)


# forward's results.
OK, NOT_FINITE, NO_FIT = 0, 1, 2


cdef idx_t _al(idx_t nbytes) noexcept nogil:
    return (nbytes + 63) // 64 * 64


def forward(cnp.ndarray x, cnp.ndarray w, object bias, cnp.ndarray y, tuple geom, idx_t m,
            idx_t workspace, idx_t chunk, int act=ACT_NONE):
    """y (N, K, P, Q) C-contiguous  <-  the correlation of x with the 3x3 filters w (+ bias,
    then the activation ``act``: ACT_NONE or ACT_RELU).

    x: (N, C, H, W) and w: (K, C, 3, 3) of y's dtype at any strides (w may be a flipped or
    transposed view); bias: (K,) contiguous or None; geom: (H, W, pt, pl, P, Q), pt and pl
    any integers (negative: a crop).  Returns OK; NOT_FINITE when a transform made a value
    that is not finite (y is then undefined: the caller recomputes on another algorithm);
    NO_FIT, without touching y, when the layer does not fit ``workspace`` bytes.
    """
    cdef gemm_params prm
    cdef int code = 0 if y.dtype == np.float32 else 1
    cdef wplan p
    cdef int i, rc
    cdef idx_t isz = y.itemsize, ub, vb, mb
    if act != ACT_NONE and act != ACT_RELU:
        raise ValueError(f"winograd: activation code {act} is not supported")
    if m not in TILES:
        raise ValueError(f"winograd: tile {m} is not one of {TILES}")
    current_params(code, &prm)
    if not _setup(&p, geom, x.shape[0], x.shape[1], w.shape[0], m, isz, workspace, chunk,
                  prm.n_threads):
        return NO_FIT
    p.act = act
    BT, G, AT = _MATRICES[m]
    for i in range(p.a2):
        p.bt[i] = BT.flat[i]
    for i in range(p.alpha * 3):
        p.g[i] = G.flat[i]
    for i in range(p.m * p.alpha):
        p.at[i] = AT.flat[i]
    for i in range(4):
        p.xs[i] = elem_stride(x, i)
        p.ws[i] = elem_stride(w, i)
    note_plan({"algorithm": "winograd", "tile": int(m), "tiles_per_chunk": int(p.T),
               "chunks": int(p.nch), "filter_blocks": int(p.nkb),
               "workspace_bytes": int(p.ws_bytes)})
    # U, V and M in one buffer kept between calls (a fresh one costs a page fault per
    # 4 KiB: about 1 ms of a 3 ms batch-1 layer here).
    ub = _al(p.a2 * p.kb * p.C * isz)
    vb = _al(p.a2 * p.C * p.T * isz)
    mb = _al(p.a2 * p.kb * p.T * isz)
    buf = take_workspace(ub + vb + mb + 64)
    cdef char* base = <char*> cnp.PyArray_DATA(buf)
    base = base + (64 - (<size_t> base) % 64) % 64
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pw = cnp.PyArray_DATA(w)
    cdef void* pb = NULL if bias is None else cnp.PyArray_DATA(<cnp.ndarray> bias)
    cdef void* py = cnp.PyArray_DATA(y)
    cdef signal_poll poll
    open_poll(&poll)
    with nogil:
        rc = _run(&p, &prm, code == 1, px, pw, pb, py, base, base + ub, base + ub + vb)
        close_poll()
        scratch_trim()
    give_workspace(buf)
    if rc == NONFINITE:
        return NOT_FINITE
    raise_for_rc(rc, &poll, "conv2d")
    return OK
