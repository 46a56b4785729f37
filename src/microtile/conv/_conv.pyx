"""Convolution drivers: conv2d forward and backward as im2col + microtile's GEMM, per group.

Per image n and group g the forward pass is  Y[n, g] (Kg x PQ) = W[g] (Kg x CgRS) @ cols (CgRS
x PQ).  The column matrix of the whole batch is never built: work is cut into chunks whose
columns fit a per-thread share of the ``conv_workspace`` cap, either

* several whole images side by side (small output planes: one wide GEMM instead of several
  skinny ones; its result goes to a scratch block and is scattered into Y), or
* a slice of the output positions of one image (large planes: the GEMM writes Y in place),
* and when even one output position's column (CgRS elements) is over the cap, a slice of
  the depth as well: the GEMMs of successive depth slices add into the same block of Y.
  So the cap holds for every geometry.

The weights are read in place at their strides (a broadcast weight is never expanded).

A 1x1, stride-1, unpadded convolution whose input plane is one strided run needs no im2col at
all: the input plane already is the column matrix.  The bias rides along as one more column
of W against a row of ones in the column matrix, so it costs one step of GEMM depth instead of
a pass over Y.

Threads: when there are enough chunks, each thread takes whole chunks and runs the GEMM
serially (``gemm_serial``); otherwise chunks run one after another with the GEMM threaded and
im2col/col2im split over channels.  Either way at most ``n_threads`` threads run.  A grouped
layer's units are (group, chunk) pairs: its chunks are cut finer when that makes the units
share evenly, and its groups never run one after another on GEMMs too small to thread.
(Depthwise and small-group layers usually take the direct kernel, ``_direct``, instead.)

Backward: dW = sum over chunks of dY_chunk @ cols_chunk^T, accumulated in one partial per
thread and reduced at the end; dX = col2im(W^T @ dY_chunk).  A thread owns all chunks of an
image in the backward pass, so col2im never adds into the same element from two threads.
"""
from libc.stdint cimport int64_t
from microtile._common._interrupt cimport (signal_poll, caller_poll, open_poll, close_poll,
                                           raise_for_rc, poll_step, stop_before, interrupted,
                                           INTERRUPTED)

import threading

import numpy as np
cimport numpy as cnp

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport ceil_div, elem_stride, imax, imin
from microtile.linalg._gemm cimport gemm_params, gemm_run, gemm_serial
from microtile._config._params cimport current_params
from microtile._kernels._dispatch cimport kernel_set
from microtile._kernels._ukernel cimport kernel_set_t
from microtile.conv._im2col cimport conv_geom, im2col_rows, col2im_rows
from microtile._common._scratch cimport SCRATCH_KEEP_MAX
from microtile._common._mt_pool cimport pool_items, pool_ranges
from microtile._common._atomic64 cimport mt_atomic_add64

cnp.import_array()

# Workspaces are kept between calls: a fresh multi-megabyte buffer costs a page fault per
# 4 KiB on first touch, a few percent of a convolution.  At most _POOL_MAX are kept, none
# larger than the scratch layer's SCRATCH_KEEP_MAX (a huge layer's dW partials are freed
# when its call returns, not kept for the next).
_pool_lock = threading.Lock()
_pool = []
_POOL_MAX = 2


cdef cnp.ndarray _ws_get(idx_t n_elems, object dtype):
    # Best fit (the pool is sorted largest first): the backward pass holds two buffers at
    # once (columns and dW partials), and the small request must not take the large one.
    cdef idx_t nbytes = max(n_elems, 1) * dtype.itemsize
    cdef Py_ssize_t i
    with _pool_lock:
        for i in range(len(_pool) - 1, -1, -1):
            if _pool[i].nbytes >= nbytes:
                return _pool.pop(i)
    return np.empty(nbytes, dtype=np.uint8)


cdef void _ws_put(cnp.ndarray buf):
    if buf.nbytes > SCRATCH_KEEP_MAX:
        return
    with _pool_lock:
        _pool.append(buf)
        _pool.sort(key=lambda b: -b.nbytes)
        del _pool[_POOL_MAX:]


def release_workspace():
    """Free the workspaces kept between calls."""
    with _pool_lock:
        _pool.clear()


def take_workspace(idx_t nbytes):
    """A uint8 buffer of at least ``nbytes`` from the pool kept between calls (or a fresh
    one), for the other drivers (``_winograd``); hand it back with ``give_workspace``."""
    return _ws_get(nbytes, np.dtype(np.uint8))


def give_workspace(cnp.ndarray buf):
    """Return a buffer from ``take_workspace`` to the pool."""
    _ws_put(buf)


# The plan of this thread's last call, for tests (what the chunking chose, and the column
# workspace it used against the cap).
_last = threading.local()


cdef void _note_plan(const conv_plan* pl, idx_t ws_bytes):
    _last.plan = {"algorithm": "im2col", "images_per_chunk": pl.nb,
                  "chunks_per_image": pl.cpi, "ncols": pl.ncols,
                  "depth_slices": pl.n_dc, "threads_over_chunks": bool(pl.par),
                  "direct": bool(pl.direct), "workspace_bytes": ws_bytes}


def last_plan():
    """How this thread's last conv2d forward or backward call was cut up (a dict with its
    ``"algorithm"``), or None."""
    return getattr(_last, "plan", None)


def note_plan(dict plan):
    """Record the plan of a call another driver ran (``_direct``), for ``last_plan``."""
    _last.plan = plan

# Output planes at least this wide use the no-im2col path for 1x1 convolutions; narrower
# ones are batched over images by im2col (one copy) so the GEMM is not skinny.
cdef enum:
    DIRECT_MIN_PQ = 256

# Columns per GEMM when the depth is cut into slices (fewer columns than this fit the
# workspace budget whole): enough that the GEMM is not a matrix-vector product, few enough
# that the slices stay deep.
cdef enum:
    DEPTH_COLS = 16

# Below this many column elements, im2col/col2im of one chunk stay on the calling thread: a
# parallel region costs more than it brings (on a loaded 2-core machine, tens of us each).
cdef enum:
    LOWER_THREAD_MIN = 1 << 15

# The fewest columns a slice of an image may have when a grouped layer's images are cut
# only to share (group, chunk) units between threads: 8 panels of the 16-wide micro-tile,
# so the GEMMs stay wide.
cdef enum:
    SLICE_MIN_COLS = 128


ctypedef struct conv_plan:
    idx_t N, G, Cg, Kg, C, K
    idx_t CRS           # GEMM depth of one group (Cg * R * S)
    idx_t PQ, HW
    idx_t rs_w, cs_w    # element strides of the weight matrix (K x CRS, or CRS + 1 columns
                        # with a bias column), any values (0 for a broadcast weight)
    idx_t dk            # column-matrix rows per depth slice (CRS + bias_col when n_dc == 1)
    idx_t n_dc          # depth slices per chunk (1 unless one column is over the budget)
    idx_t nb            # whole images per chunk (1 when a chunk is a slice of one image)
    idx_t cpi           # chunks per image (1 when chunks hold whole images)
    idx_t ncols         # columns of the widest chunk
    idx_t n_chunks      # chunks per group
    idx_t ws_tmp        # offset of the Kg x ncols scratch block (the columns come first)
    idx_t ws_elems      # workspace elements per thread
    bint direct         # 1x1 path: columns read straight from x
    bint bias_col       # W carries the bias as column CRS; cols get a row of ones
    int nt              # threads
    bint par            # threads over chunks (gemm_serial) rather than inside the GEMM
    bint dw_trans       # backward accumulates dW^T (CRS x Kg) rather than dW (Kg x CRS)
    idx_t chunk         # column bytes one thread works on at a time, when the cap allows


cdef void _plan_chunks(conv_plan* pl, idx_t budget_elems, idx_t per_col_whole,
                       idx_t per_col_slice, idx_t want):
    """Choose images per chunk or chunks per image so one chunk's workspace fits the budget
    (elements per thread), with at least ``want`` chunks per group when images allow; when
    fewer than DEPTH_COLS columns (``per_col_slice`` elements each) fit, slices of the depth
    of DEPTH_COLS columns (of one column alone being over the budget, the cap would not
    hold; of a few, the GEMMs would be matrix-vector products and im2col rows a few
    elements long)."""
    cdef idx_t nb
    pl.nb = 1
    pl.cpi = 1
    pl.n_dc = 1
    pl.dk = 0
    if pl.PQ * per_col_whole > budget_elems and \
            per_col_slice * imin(pl.PQ, DEPTH_COLS) > budget_elems:
        pl.ncols = imin(imin(pl.PQ, DEPTH_COLS), budget_elems)
        pl.cpi = ceil_div(pl.PQ, pl.ncols)
        pl.ncols = ceil_div(pl.PQ, pl.cpi)
        pl.n_chunks = pl.N * pl.cpi
        pl.dk = budget_elems // pl.ncols
        pl.n_dc = ceil_div(per_col_slice, pl.dk)
        pl.dk = ceil_div(per_col_slice, pl.n_dc)
    elif pl.PQ * per_col_whole <= budget_elems:
        nb = budget_elems // (pl.PQ * per_col_whole) if per_col_whole > 0 else pl.N
        nb = imin(nb, ceil_div(pl.N, want))
        if nb < 1:
            nb = 1
        pl.n_chunks = ceil_div(pl.N, nb)
        pl.nb = ceil_div(pl.N, pl.n_chunks)
        pl.n_chunks = ceil_div(pl.N, pl.nb)
        pl.ncols = pl.nb * pl.PQ
    else:
        pl.ncols = budget_elems // per_col_slice if per_col_slice > 0 else pl.PQ
        if pl.ncols < 1:
            pl.ncols = 1
        if pl.ncols > pl.PQ:
            pl.ncols = pl.PQ
        pl.cpi = ceil_div(pl.PQ, pl.ncols)
        pl.ncols = ceil_div(pl.PQ, pl.cpi)
        pl.n_chunks = pl.N * pl.cpi


cdef inline bint _shares_evenly(idx_t units, int nt) noexcept nogil:
    """Whole units per thread keep every thread busy: a multiple of the threads, or enough
    that the last round's imbalance is small."""
    return units >= nt and (units % nt == 0 or units >= 4 * nt)


cdef inline idx_t _units(const conv_plan* pl, bint backward) noexcept nogil:
    # The backward hands a thread every chunk of an image (col2im stays race-free).
    return pl.G * (pl.N if (backward and pl.cpi > 1) else pl.n_chunks)


cdef void _more_chunks(conv_plan* pl, bint backward):
    """A grouped layer whose (group, chunk) units do not share evenly between the threads:
    cut its chunks finer until they do -- fewer images per chunk, then (forward only: the
    backward keeps an image's slices on one thread) slices of each image's positions of at
    least SLICE_MIN_COLS columns -- so that the groups run side by side on serial GEMMs
    instead of one after another on small threaded ones.  Finer chunks only shrink the
    workspace.  Leaves the plan as it was when no cut works."""
    cdef idx_t nb, c, cpi, ncols, n_chunks
    if pl.direct or pl.n_dc > 1:
        return
    for nb in range(pl.nb - 1, 0, -1):
        n_chunks = ceil_div(pl.N, nb)
        if _shares_evenly(pl.G * n_chunks, pl.nt):
            pl.nb = ceil_div(pl.N, n_chunks)
            pl.n_chunks = ceil_div(pl.N, pl.nb)
            pl.ncols = pl.nb * pl.PQ
            return
    if backward:
        if pl.nb > 1 and _shares_evenly(pl.G * pl.N, pl.nt):
            pl.nb = 1
            pl.n_chunks = pl.N
            pl.ncols = pl.PQ
        return
    for c in range(pl.cpi + 1, pl.PQ // SLICE_MIN_COLS + 1):
        ncols = ceil_div(pl.PQ, c)
        cpi = ceil_div(pl.PQ, ncols)
        if _shares_evenly(pl.G * pl.N * cpi, pl.nt):
            pl.nb = 1
            pl.cpi = cpi
            pl.ncols = ncols
            pl.n_chunks = pl.N * cpi
            return


cdef void _plan(conv_plan* pl, idx_t workspace, idx_t isz, idx_t per_col_whole,
                idx_t per_col_slice, bint backward, bint prefer_threaded, double thread_mnk):
    """Chunking and threading.  Whole chunks per thread (serial GEMMs, the cap shared between
    threads) when there are enough of them to share out evenly (for grouped layers, cutting
    chunks finer to get there); otherwise chunks one after another, each as large as the
    whole cap allows, with the GEMM threaded inside -- unless the layer is grouped and its
    GEMMs are too small to be threaded (``thread_mnk``), where an uneven share of whole units
    still beats a single thread."""
    cdef idx_t units
    if pl.direct:
        pl.nb = 1
        pl.cpi = 1
        pl.ncols = pl.PQ
        pl.n_chunks = pl.N
        pl.n_dc = 1
    if pl.nt > 1 and not prefer_threaded:
        if not pl.direct:
            _plan_chunks(pl, max(imin(workspace // pl.nt, pl.chunk) // isz, 1),
                         per_col_whole, per_col_slice, ceil_div(pl.nt, pl.G))
        units = _units(pl, backward)
        if not _shares_evenly(units, pl.nt) and pl.G > 1:
            _more_chunks(pl, backward)
            units = _units(pl, backward)
        if _shares_evenly(units, pl.nt) or (
                pl.G > 1 and units >= pl.nt
                and <double> pl.Kg * pl.CRS * pl.N * pl.PQ < thread_mnk):
            pl.par = True
            return
    pl.par = False
    if not pl.direct:
        _plan_chunks(pl, max(imin(workspace, pl.chunk * pl.nt) // isz, 1), per_col_whole,
                     per_col_slice, 1)


cdef inline int _gemm(bint threaded, const gemm_params* prm, idx_t m, idx_t n, idx_t k,
                      const floating* a, idx_t rs_a, idx_t cs_a,
                      const floating* b, idx_t rs_b, idx_t cs_b,
                      floating beta, floating* c, idx_t rs_c) noexcept nogil:
    if threaded:
        return gemm_run(prm, m, n, k, <floating> 1, a, rs_a, cs_a, b, rs_b, cs_b, beta,
                        c, rs_c, 1)
    return gemm_serial(prm, m, n, k, <floating> 1, a, rs_a, cs_a, b, rs_b, cs_b, beta,
                       c, rs_c, 1)


cdef void _lower_chunk(int kind, const conv_geom* g, const floating* src, const idx_t* xs,
                       idx_t k0, idx_t k1, idx_t pq0, idx_t pq1, floating* dst, idx_t ld,
                       int nt) noexcept nogil:
    """Rows [k0, k1) of one image's column matrix: written from the image ``src`` (strides
    ``xs``; kind CJ_IM2COL) or added from the columns ``src`` into dx (CJ_COL2IM).  Threads
    (nt > 1) take channels: disjoint rows of the columns and disjoint planes of dx."""
    cdef idx_t RS = g.R * g.S, c0 = k0 // RS, c1 = ceil_div(k1, RS)
    cdef _conv_job jb
    jb.kind = kind
    jb.dbl = floating is double
    jb.g = g
    jb.x = src
    jb.xs = xs
    jb.k0 = k0
    jb.k1 = k1
    jb.pq0 = pq0
    jb.pq1 = pq1
    jb.c0 = c0
    jb.ld = ld
    jb.out = dst
    if nt > 1 and c1 - c0 > 1 and (k1 - k0) * (pq1 - pq0) >= LOWER_THREAD_MIN:
        pool_ranges(nt, c1 - c0, 4 * nt, 1, _conv_range, &jb)
    else:
        _conv_lines(&jb, 0, c1 - c0, src, dst)


cdef inline void _chunk(const conv_plan* pl, idx_t ch, idx_t* n0, idx_t* nb, idx_t* pq0,
                        idx_t* pq1) noexcept nogil:
    cdef idx_t i
    if pl.cpi > 1:
        n0[0] = ch // pl.cpi
        i = ch - n0[0] * pl.cpi
        nb[0] = 1
        pq0[0] = i * pl.ncols
        pq1[0] = imin(pl.PQ, pq0[0] + pl.ncols)
    else:
        n0[0] = ch * pl.nb
        nb[0] = imin(pl.nb, pl.N - n0[0])
        pq0[0] = 0
        pq1[0] = pl.PQ


cdef const floating* _columns(const conv_plan* pl, const conv_geom* g, const floating* xg,
                              const idx_t* xs, idx_t n0, idx_t nb, idx_t pq0, idx_t pq1,
                              idx_t d0, idx_t d1, floating* cols, idx_t* rs,
                              idx_t* cs) noexcept nogil:
    """Rows [d0, d1) of the chunk's column matrix (CRS rows, plus a row of ones when
    bias_col; nb * (pq1 - pq0) columns), at strides rs/cs: x itself on the 1x1 path, else
    im2col into cols (plus the row of ones when d1 reaches it)."""
    cdef idx_t wcols = pq1 - pq0, ncur = nb * wcols, i, j
    if pl.direct:
        rs[0] = xs[1]
        cs[0] = xs[3]
        return xg + n0 * xs[0] + pq0 * xs[3] + d0 * xs[1]
    if d0 < pl.CRS:
        for i in range(nb):
            _lower_chunk(CJ_IM2COL, g, xg + (n0 + i) * xs[0], xs, d0, imin(d1, pl.CRS), pq0,
                         pq1, cols + i * wcols, ncur, 1 if pl.par else pl.nt)
    if pl.bias_col and d1 > pl.CRS:
        for j in range(ncur):
            cols[(pl.CRS - d0) * ncur + j] = 1
    rs[0] = ncur
    cs[0] = 1
    return cols


# ----------------------------------------------------------------------------- forward

cdef int _fwd_chunk(const conv_plan* pl, const conv_geom* g, const gemm_params* prm,
                    idx_t gi, idx_t ch, const floating* x, const idx_t* xs,
                    const floating* w, const floating* bias, floating* y,
                    floating* ws) noexcept nogil:
    cdef idx_t n0, nb, pq0, pq1, ncur, i, k, j, rs_b, cs_b, rs_c, dc, d0, d1
    cdef idx_t depth = pl.CRS + pl.bias_col
    cdef const floating* wg = w + gi * pl.Kg * pl.rs_w
    cdef const floating* b
    cdef floating* c
    cdef floating* yrow
    cdef floating bk
    cdef int rc
    _chunk(pl, ch, &n0, &nb, &pq0, &pq1)
    ncur = nb * (pq1 - pq0)
    if nb == 1:
        c = y + n0 * pl.K * pl.PQ + gi * pl.Kg * pl.PQ + pq0
        rs_c = pl.PQ
    else:
        c = ws + pl.ws_tmp
        rs_c = ncur
    for dc in range(pl.n_dc):
        # Depth slices (one unless a column is over the budget) add into the same block.
        d0 = dc * pl.dk if pl.n_dc > 1 else 0
        d1 = imin(depth, d0 + pl.dk) if pl.n_dc > 1 else depth
        b = _columns(pl, g, x + gi * pl.Cg * xs[1], xs, n0, nb, pq0, pq1, d0, d1, ws, &rs_b,
                     &cs_b)
        rc = _gemm(not pl.par, prm, pl.Kg, ncur, d1 - d0, wg + d0 * pl.cs_w, pl.rs_w,
                   pl.cs_w, b, rs_b, cs_b, <floating> (0 if dc == 0 else 1), c, rs_c)
        if rc != 0:
            return rc
    if bias != NULL and not pl.bias_col:
        for k in range(pl.Kg):
            bk = bias[gi * pl.Kg + k]
            for j in range(ncur):
                c[k * rs_c + j] += bk
    if nb > 1:
        for i in range(nb):
            for k in range(pl.Kg):
                yrow = y + (n0 + i) * pl.K * pl.PQ + (gi * pl.Kg + k) * pl.PQ
                for j in range(pl.PQ):
                    yrow[j] = c[k * rs_c + i * pl.PQ + j]
    return 0


cdef int _fwd_all(const conv_plan* pl, const conv_geom* g, const gemm_params* prm,
                  const floating* x, const idx_t* xs, const floating* w,
                  const floating* bias, floating* y, floating* ws) noexcept nogil:
    cdef idx_t u, units = pl.G * pl.n_chunks
    cdef int rc
    cdef signal_poll* poll = caller_poll()
    cdef _conv_job jb
    if pl.par:
        jb.kind = CJ_FWD
        jb.dbl = floating is double
        jb.pl = pl
        jb.g = g
        jb.prm = prm
        jb.x = x
        jb.xs = xs
        jb.w = w
        jb.bias = bias
        jb.out = y
        jb.ws = ws
        jb.poll = poll
        jb.fails = 0
        pool_items(pl.nt, units, _conv_item, &jb)
        if jb.fails:
            return -1
        return INTERRUPTED if interrupted(poll) else 0
    for u in range(units):
        if poll_step(poll, 0):
            return INTERRUPTED
        rc = _fwd_chunk(pl, g, prm, u // pl.n_chunks, u % pl.n_chunks, x, xs, w, bias, y, ws)
        if rc != 0:
            return rc
    return 0


cdef conv_plan _base_plan(cnp.ndarray x, cnp.ndarray y_or_dy, tuple geom, idx_t groups,
                          int nt):
    cdef conv_plan pl
    H, W, R, S, sh, sw, ph, pw, dh, dw, P, Q = geom
    pl.N = x.shape[0]
    pl.C = x.shape[1]
    pl.K = y_or_dy.shape[1]
    pl.G = groups
    pl.Cg = pl.C // groups
    pl.Kg = pl.K // groups
    pl.CRS = pl.Cg * R * S
    pl.PQ = P * Q
    pl.HW = H * W
    pl.nt = nt
    pl.bias_col = False
    pl.direct = (R == 1 and S == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0
                 and P == H and Q == W and pl.PQ >= DIRECT_MIN_PQ
                 and (H == 1 or elem_stride(x, 2) == W * elem_stride(x, 3)))
    return pl


cdef conv_geom _geom(tuple gt):
    cdef conv_geom g
    g.H, g.W, g.R, g.S, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.P, g.Q = gt
    return g


cdef int _dtype_code(cnp.ndarray a) except -1:
    return 0 if a.dtype == np.float32 else 1


def conv2d_forward(cnp.ndarray x, cnp.ndarray wm, object bias, cnp.ndarray y, tuple geom,
                   idx_t groups, bint bias_col, idx_t workspace, idx_t chunk):
    """y (N, K, P, Q), C-contiguous  <-  conv(x, W) (+ bias).

    x: (N, C, H, W) of y's dtype, any strides.  wm: (K, CRS) weights of y's dtype at any
    strides, or (K, CRS + 1) with the bias as column CRS when ``bias_col``.  bias: (K,)
    contiguous or None (used when not ``bias_col``).  workspace: bytes all threads together
    may use for columns, whatever the geometry; chunk: the column bytes one thread should
    work on at a time when the workspace allows more.
    """
    cdef gemm_params prm
    cdef conv_geom g = _geom(geom)
    cdef int code = _dtype_code(y)
    cdef conv_plan pl
    cdef idx_t xs[4]
    cdef idx_t isz = y.itemsize
    cdef cnp.ndarray wsbuf
    cdef void* pb = NULL
    cdef int rc
    current_params(code, &prm)
    pl = _base_plan(x, y, geom, groups, prm.n_threads)
    pl.chunk = max(chunk, 1)
    if y.size == 0:
        return
    pl.bias_col = bias_col and not pl.direct
    if bias_col and pl.direct:
        bias = np.ascontiguousarray(wm[:, pl.CRS])    # the 1x1 path adds it to the output
    pl.rs_w = elem_stride(wm, 0)
    pl.cs_w = elem_stride(wm, 1)
    _plan(&pl, workspace, isz, pl.CRS + 1 + pl.Kg, pl.CRS + 1, False, False, prm.thread_mnk)
    # Column rows held at once: the whole depth (with room for the row of ones), or a slice.
    pl.ws_tmp = (pl.dk if pl.n_dc > 1 else pl.CRS + 1) * pl.ncols
    if pl.direct:
        pl.ws_elems = 0
    else:
        pl.ws_elems = pl.ws_tmp + (pl.Kg * pl.ncols if pl.nb > 1 else 0)
    wsbuf = _ws_get(max(pl.ws_elems, 1) * (pl.nt if pl.par else 1), y.dtype)
    _note_plan(&pl, pl.ws_elems * (pl.nt if pl.par else 1) * isz)
    for i in range(4):
        xs[i] = elem_stride(x, i)
    if bias is not None and not pl.bias_col:
        pb = cnp.PyArray_DATA(<cnp.ndarray> bias)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pw_ = cnp.PyArray_DATA(wm)
    cdef void* py = cnp.PyArray_DATA(y)
    cdef void* pws = cnp.PyArray_DATA(wsbuf)
    cdef signal_poll poll
    open_poll(&poll)
    if code == 0:
        with nogil:
            rc = _fwd_all(&pl, &g, &prm, <const float*> px, xs, <const float*> pw_,
                          <const float*> pb, <float*> py, <float*> pws)
            close_poll()
    else:
        with nogil:
            rc = _fwd_all(&pl, &g, &prm, <const double*> px, xs, <const double*> pw_,
                          <const double*> pb, <double*> py, <double*> pws)
            close_poll()
    _ws_put(wsbuf)
    raise_for_rc(rc, &poll, "conv2d")


# ----------------------------------------------------------------------------- backward

cdef int _bwd_chunk(const conv_plan* pl, const conv_geom* g, const gemm_params* prm,
                    idx_t gi, idx_t ch, const floating* x, const idx_t* xs,
                    const floating* w, const floating* dy, floating* dx, floating* dwp,
                    floating* ws, bint need_w, bint need_x) noexcept nogil:
    cdef idx_t n0, nb, pq0, pq1, wcols, ncur, i, k, j, rs_a, rs_a2, cs_a2, dc, d0, d1, e1
    cdef idx_t rows = pl.CRS + pl.bias_col
    cdef int rc
    cdef const floating* wg = w + gi * pl.Kg * pl.rs_w
    cdef const floating* a
    cdef const floating* a2
    cdef const floating* src
    cdef floating* cols = ws
    cdef floating* tmp = ws + pl.ws_tmp
    cdef floating* dxg = dx + gi * pl.Cg * pl.HW
    _chunk(pl, ch, &n0, &nb, &pq0, &pq1)
    wcols = pq1 - pq0
    ncur = nb * wcols
    if nb == 1:
        a = dy + n0 * pl.K * pl.PQ + gi * pl.Kg * pl.PQ + pq0
        rs_a = pl.PQ
    else:
        for i in range(nb):
            for k in range(pl.Kg):
                src = dy + (n0 + i) * pl.K * pl.PQ + (gi * pl.Kg + k) * pl.PQ
                for j in range(pl.PQ):
                    tmp[k * ncur + i * pl.PQ + j] = src[j]
        a = tmp
        rs_a = ncur
    for dc in range(pl.n_dc):
        # Depth slices: one unless a column is over the budget; each slice's rows of dW and
        # of the columns for dX are independent of the others'.
        d0 = dc * pl.dk if pl.n_dc > 1 else 0
        d1 = imin(rows, d0 + pl.dk) if pl.n_dc > 1 else rows
        if need_w:
            # With few filters, dW^T (CRS x Kg) += cols (CRS x ncur) @ dY^T: the column
            # matrix is then the A operand, which the GEMM reads in place when Kg is narrow,
            # so it is never packed again.  Otherwise dW += dY @ cols^T (no transpose at the
            # end).  With a row of ones under cols, the last row/column collects db for free.
            a2 = _columns(pl, g, x + gi * pl.Cg * xs[1], xs, n0, nb, pq0, pq1, d0, d1, cols,
                          &rs_a2, &cs_a2)
            if pl.dw_trans:
                rc = _gemm(not pl.par, prm, d1 - d0, pl.Kg, ncur, a2, rs_a2, cs_a2,
                           a, 1, rs_a, <floating> 1, dwp + gi * rows * pl.Kg + d0 * pl.Kg,
                           pl.Kg)
            else:
                rc = _gemm(not pl.par, prm, pl.Kg, d1 - d0, ncur, a, rs_a, 1,
                           a2, cs_a2, rs_a2, <floating> 1, dwp + gi * rows * pl.Kg + d0, rows)
            if rc != 0:
                return rc
        e1 = imin(d1, pl.CRS)       # the row of ones has no dX
        if need_x and d0 < e1:
            if pl.direct:
                rc = _gemm(not pl.par, prm, pl.CRS, ncur, pl.Kg, wg, pl.cs_w, pl.rs_w, a, rs_a,
                           1, <floating> 0, dxg + n0 * pl.C * pl.HW + pq0, pl.HW)
                if rc != 0:
                    return rc
            else:
                # cols is free again once dW has used it.
                rc = _gemm(not pl.par, prm, e1 - d0, ncur, pl.Kg, wg + d0 * pl.cs_w, pl.cs_w,
                           pl.rs_w, a, rs_a, 1, <floating> 0, cols, ncur)
                if rc != 0:
                    return rc
                for i in range(nb):
                    _lower_chunk(CJ_COL2IM, g, cols + i * wcols, NULL, d0, e1, pq0, pq1,
                                 dxg + (n0 + i) * pl.C * pl.HW, ncur, 1 if pl.par else pl.nt)
    return 0


cdef int _bwd_unit(const conv_plan* pl, const conv_geom* g, const gemm_params* prm,
                   idx_t u, const floating* x, const idx_t* xs, const floating* w,
                   const floating* dy, floating* dx, floating* dwp, floating* ws,
                   bint need_w, bint need_x) noexcept nogil:
    """One group of one image (all its chunks, in order) or one multi-image chunk."""
    cdef idx_t per_g = pl.N if pl.cpi > 1 else pl.n_chunks
    cdef idx_t gi = u // per_g, v = u - gi * per_g, i
    cdef int rc
    if pl.cpi > 1:
        for i in range(pl.cpi):
            rc = _bwd_chunk(pl, g, prm, gi, v * pl.cpi + i, x, xs, w, dy, dx, dwp, ws,
                            need_w, need_x)
            if rc != 0:
                return rc
        return 0
    return _bwd_chunk(pl, g, prm, gi, v, x, xs, w, dy, dx, dwp, ws, need_w, need_x)


cdef int _bwd_all(const conv_plan* pl, const conv_geom* g, const gemm_params* prm,
                  const floating* x, const idx_t* xs, const floating* w,
                  const floating* dy, floating* dx, floating* dwp, floating* ws,
                  bint need_w, bint need_x) noexcept nogil:
    cdef idx_t u, units = pl.G * (pl.N if pl.cpi > 1 else pl.n_chunks)
    cdef int rc
    cdef signal_poll* poll = caller_poll()
    cdef _conv_job jb
    if pl.par:
        jb.kind = CJ_BWD
        jb.dbl = floating is double
        jb.pl = pl
        jb.g = g
        jb.prm = prm
        jb.x = x
        jb.xs = xs
        jb.w = w
        jb.dy = dy
        jb.out = dx
        jb.dwp = dwp
        jb.ws = ws
        jb.need_w = need_w
        jb.need_x = need_x
        jb.poll = poll
        jb.fails = 0
        pool_items(pl.nt, units, _conv_item, &jb)
        if jb.fails:
            return -1
        return INTERRUPTED if interrupted(poll) else 0
    for u in range(units):
        if poll_step(poll, 0):
            return INTERRUPTED
        rc = _bwd_unit(pl, g, prm, u, x, xs, w, dy, dx, dwp, ws, need_w, need_x)
        if rc != 0:
            return rc
    return 0


cdef void _bias_rows(const floating* dy, idx_t N, idx_t K, idx_t PQ, floating* db, idx_t k0,
                     idx_t k1) noexcept nogil:
    # Accumulated in double (a float32 sum over N*P*Q terms would lose digits), in four
    # independent chains so the adds overlap.
    cdef idx_t k, n, j, j4
    cdef double a0, a1, a2, a3
    cdef const floating* row
    for k in range(k0, k1):
        a0 = 0
        a1 = 0
        a2 = 0
        a3 = 0
        j4 = PQ - PQ % 4
        for n in range(N):
            row = dy + (n * K + k) * PQ
            for j in range(0, j4, 4):
                a0 = a0 + row[j]
                a1 = a1 + row[j + 1]
                a2 = a2 + row[j + 2]
                a3 = a3 + row[j + 3]
            for j in range(j4, PQ):
                a0 = a0 + row[j]
        db[k] = <floating> ((a0 + a1) + (a2 + a3))


cdef void _bias_grad(const floating* dy, idx_t N, idx_t K, idx_t PQ, floating* db,
                     int nt) noexcept nogil:
    cdef _conv_job jb
    jb.kind = CJ_BIAS
    jb.dbl = floating is double
    jb.dy = dy
    jb.k0 = N
    jb.k1 = K
    jb.pq0 = PQ
    jb.out = db
    pool_ranges(nt, K, 4 * nt, 1, _conv_range, &jb)


# -- the pool's entry points ------------------------------------------------------------------

cdef enum:
    CJ_FWD = 0
    CJ_BWD = 1
    CJ_IM2COL = 2
    CJ_COL2IM = 3
    CJ_BIAS = 4

ctypedef struct _conv_job:
    int kind
    bint dbl, need_w, need_x
    const conv_plan* pl
    const conv_geom* g
    const gemm_params* prm
    const void* x           # the input (im2col: the image; col2im: the columns)
    const idx_t* xs
    const void* w
    const void* bias
    const void* dy
    void* out               # y, dx, the columns (im2col) or db
    void* dwp
    void* ws
    idx_t k0, k1, pq0, pq1, c0, ld     # a lowering chunk (bias: N, K, PQ in k0, k1, pq0)
    signal_poll* poll
    int64_t fails           # atomic


cdef void _conv_unit(_conv_job* j, idx_t u, int tid, const floating* x, const floating* w,
                     const floating* bias, const floating* dy, floating* out, floating* dwp,
                     floating* ws) noexcept nogil:
    cdef const conv_plan* pl = j.pl
    cdef int rc
    if tid == 0:        # the caller polls for signals between its units
        poll_step(j.poll, 0)
    if stop_before(j.poll, 1):
        return
    if j.kind == CJ_FWD:
        rc = _fwd_chunk(pl, j.g, j.prm, u // pl.n_chunks, u % pl.n_chunks, x, j.xs, w, bias,
                        out, ws + tid * pl.ws_elems)
    else:
        rc = _bwd_unit(pl, j.g, j.prm, u, x, j.xs, w, dy, out,
                       dwp + tid * pl.K * (pl.CRS + pl.bias_col), ws + tid * pl.ws_elems,
                       j.need_w, j.need_x)
    if rc != 0 and rc != INTERRUPTED:
        mt_atomic_add64(&j.fails, 1)


cdef void _conv_item(void* ctx, idx_t u, int tid) noexcept nogil:
    """One unit of a convolution run with whole chunks per thread (plan ``par``)."""
    cdef _conv_job* j = <_conv_job*> ctx
    if j.dbl:
        _conv_unit(j, u, tid, <const double*> j.x, <const double*> j.w,
                   <const double*> j.bias, <const double*> j.dy, <double*> j.out,
                   <double*> j.dwp, <double*> j.ws)
    else:
        _conv_unit(j, u, tid, <const float*> j.x, <const float*> j.w,
                   <const float*> j.bias, <const float*> j.dy, <float*> j.out,
                   <float*> j.dwp, <float*> j.ws)


cdef void _conv_lines(const _conv_job* j, idx_t i0, idx_t i1, const floating* x,
                      floating* out) noexcept nogil:
    cdef idx_t RS, a, b
    if j.kind == CJ_BIAS:
        _bias_rows(<const floating*> j.dy, j.k0, j.k1, j.pq0, out, i0, i1)
        return
    # Channels c0 + i0 .. c0 + i1 of a lowering chunk: disjoint rows of the columns, and
    # disjoint planes of dx, so the split is race-free.
    RS = j.g.R * j.g.S
    a = imax(j.k0, (j.c0 + i0) * RS)
    b = imin(j.k1, (j.c0 + i1) * RS)
    if a >= b:
        return
    if j.kind == CJ_IM2COL:
        im2col_rows(j.g, x, j.xs[1], j.xs[2], j.xs[3], a, b, j.pq0, j.pq1,
                    out + (a - j.k0) * j.ld, j.ld)
    else:
        col2im_rows(j.g, x + (a - j.k0) * j.ld, j.ld, a, b, j.pq0, j.pq1, out,
                    j.g.H * j.g.W, j.g.W, 1)


cdef void _conv_range(void* ctx, idx_t i0, idx_t i1, int tid) noexcept nogil:
    cdef const _conv_job* j = <const _conv_job*> ctx
    if j.dbl:
        _conv_lines(j, i0, i1, <const double*> j.x, <double*> j.out)
    else:
        _conv_lines(j, i0, i1, <const float*> j.x, <float*> j.out)


def conv2d_backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray wm, tuple geom, idx_t groups,
                    bint need_w, bint need_x, bint need_b, idx_t workspace, idx_t chunk,
                    object dx_out=None, object dw_out=None, object db_out=None):
    """Gradients of a conv2d.  dy (N, K, P, Q) C-contiguous, x (N, C, H, W) any strides,
    wm (K, CRS) at any strides, all of one dtype.  Returns (dx or None, dw (K, CRS) or None,
    db or None).  ``dx_out`` / ``dw_out`` / ``db_out``, when given, are C-contiguous arrays
    of those shapes and dy's dtype that receive the results (a training loop reuses them)."""
    cdef gemm_params prm
    cdef conv_geom g = _geom(geom)
    cdef int code = _dtype_code(dy)
    cdef conv_plan pl
    cdef idx_t xs[4]
    cdef idx_t isz = dy.itemsize, per_col
    cdef const kernel_set_t* ks
    cdef cnp.ndarray wsbuf, dwpbuf, dwp, dx = None, db = None
    cdef int rc = 0, nt_parts, i
    cdef idx_t rows
    current_params(code, &prm)
    pl = _base_plan(x, dy, geom, groups, prm.n_threads)
    pl.chunk = max(chunk, 1)
    pl.rs_w = elem_stride(wm, 0)
    pl.cs_w = elem_stride(wm, 1)
    dt = dy.dtype
    if need_x:
        # col2im adds into dx, so a reused one is cleared first.
        if dx_out is None:
            dx = np.zeros((x.shape[0], x.shape[1], x.shape[2], x.shape[3]), dtype=dt)
        else:
            dx = dx_out
            dx.fill(0)
    if pl.N == 0 or pl.PQ == 0 or pl.K == 0 or pl.CRS == 0 or not (need_w or need_x):
        if need_b:
            db = np.zeros(pl.K, dtype=dt) if db_out is None else db_out
            db.fill(0)
            if dy.size:
                _bias_grad_any(dy, db, &pl)
        dw = None
        if need_w:
            dw = np.zeros((pl.K, pl.CRS), dtype=dt) if dw_out is None else dw_out
            dw.fill(0)
        return dx, dw, db
    # db rides in the dW GEMM (a row of ones under the columns) whenever that GEMM runs on
    # im2col columns; otherwise it is a sum of its own.
    pl.bias_col = need_b and need_w and not pl.direct
    # The same test as the GEMM driver's A-in-place rule, in the kernel's own nr.
    ks = kernel_set(prm.isa)
    pl.dw_trans = pl.Kg <= prm.nopack_a_panels * (ks.s.nr if code == 0 else ks.d.nr)
    per_col = pl.CRS + pl.bias_col
    # Per-thread dW partials cost a reduction of nt * K * CRS elements (CRS per group): when
    # that is large next to the columns, G * CRS * N * PQ (many filters per group, small
    # planes), thread inside the GEMMs instead -- unless the layer is grouped and those
    # GEMMs are too small to be threaded at all.
    _plan(&pl, workspace, isz, per_col + pl.Kg, per_col, True,
          need_w and pl.nt * pl.Kg * 8 > pl.N * pl.PQ
          and (pl.G == 1 or <double> pl.Kg * pl.CRS * pl.N * pl.PQ >= prm.thread_mnk),
          prm.thread_mnk)
    if pl.direct:
        pl.ws_elems = 0
        pl.ws_tmp = 0
    else:
        pl.ws_tmp = (pl.dk if pl.n_dc > 1 else per_col) * pl.ncols
        pl.ws_elems = pl.ws_tmp + (pl.Kg * pl.ncols if pl.nb > 1 else 0)
    nt_parts = pl.nt if pl.par else 1
    rows = pl.CRS + pl.bias_col
    wsbuf = _ws_get(max(pl.ws_elems, 1) * nt_parts, dt)
    _note_plan(&pl, pl.ws_elems * nt_parts * isz)
    # Per-thread partial dW (or dW^T), one block per group, reduced below; kept between
    # calls like the workspace, so it is cleared here rather than freshly allocated.
    cdef idx_t dwp_elems = nt_parts * pl.G * rows * pl.Kg if need_w else 1
    dwpbuf = _ws_get(dwp_elems, dt)
    dwp = dwpbuf[:dwp_elems * isz].view(dt)
    dwp.fill(0)
    if need_w:
        dwp = dwp.reshape((nt_parts, pl.G, rows, pl.Kg) if pl.dw_trans
                          else (nt_parts, pl.G, pl.Kg, rows))
    for i in range(4):
        xs[i] = elem_stride(x, i)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pw_ = cnp.PyArray_DATA(wm)
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* pdx = cnp.PyArray_DATA(dx) if dx is not None else NULL
    cdef void* pdw = cnp.PyArray_DATA(dwp)
    cdef void* pws = cnp.PyArray_DATA(wsbuf)
    cdef signal_poll poll
    open_poll(&poll)
    if code == 0:
        with nogil:
            rc = _bwd_all(&pl, &g, &prm, <const float*> px, xs, <const float*> pw_,
                          <const float*> pdy, <float*> pdx, <float*> pdw, <float*> pws,
                          need_w, need_x)
            close_poll()
    else:
        with nogil:
            rc = _bwd_all(&pl, &g, &prm, <const double*> px, xs, <const double*> pw_,
                          <const double*> pdy, <double*> pdx, <double*> pdw, <double*> pws,
                          need_w, need_x)
            close_poll()
    _ws_put(wsbuf)
    if rc != 0:
        _ws_put(dwpbuf)
        raise_for_rc(rc, &poll, "conv2d_backward")
    dw = None
    if need_w:
        # Reduced into the first partial (no temporary), then copied out of the blocks.
        tot = dwp[0]
        for i in range(1, nt_parts):
            np.add(tot, dwp[i], out=tot)
        if pl.dw_trans:
            tot = tot.transpose(0, 2, 1)
        dw = np.empty((pl.K, pl.CRS), dtype=dt) if dw_out is None else dw_out
        np.copyto(dw.reshape(pl.G, pl.Kg, pl.CRS), tot[:, :, :pl.CRS])
        if pl.bias_col:
            db = np.empty(pl.K, dtype=dt) if db_out is None else db_out
            np.copyto(db.reshape(pl.G, pl.Kg), tot[:, :, pl.CRS])
    _ws_put(dwpbuf)
    if need_b and not pl.bias_col:
        db = np.empty(pl.K, dtype=dt) if db_out is None else db_out
        _bias_grad_any(dy, db, &pl)
    return dx, dw, db


cdef void _bias_grad_any(cnp.ndarray dy, cnp.ndarray db, const conv_plan* pl):
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* pdb = cnp.PyArray_DATA(db)
    if dy.dtype == np.float32:
        with nogil:
            _bias_grad(<const float*> pdy, pl.N, pl.K, pl.PQ, <float*> pdb, pl.nt)
    else:
        with nogil:
            _bias_grad(<const double*> pdy, pl.N, pl.K, pl.PQ, <double*> pdb, pl.nt)
