"""Time loops of the recurrent layers (RNN, LSTM, GRU), forward and backward, without the GIL.

The layer (``_rnn.py``) does what is done once per sequence: the input projection of all
steps as one GEMM before the loop, and after the backward loop the weight gradients of all
steps as one GEMM per weight and the input gradient as one more.  What is left is
sequential, and runs here in one nogil call per layer so that no step goes back to Python.

LSTM and GRU: one pool job per step, whose items are blocks of nr hidden units (the
micro-kernel's width) by blocks of rows.  An item forms its part of the step's product with
the micro-kernel on W_hh packed once per call (``gemm_pack_b_full``) and applies the whole
cell to it while it is in L1: forward, the product's gate tiles go straight into the
nonlinearities and the state update; backward, the tile of dh for step t-1 goes straight
into step t-1's gate derivatives.  So a step is one pass over the gates and one job.  For
this the forward packing puts the gate panels of one block of units side by side (i, f, g, o
of units j..j+nr), which is what lets one item see every gate of its units.  A partial last
row group runs as the whole group that ends at the last row; a batch below the micro-tile's
rows (batch 1) takes dot products on the weight's rows instead (``dot4``: four outputs share
the loads of the state), since a padded panel would multiply its work by mr.  The cells
themselves are compiled for the baseline ISA and for AVX2 (``_rnn_cells``).

Layout (time-major, C-contiguous, rows of N samples per step):

* ``G`` (T*N, k*H): a step's gate block, rows ``t*N .. t*N+N``.  Forward: on entry the input
  projection (with the biases the layer folded in), on exit the gate *activations* (LSTM
  i, f, g, o; GRU r, z, n), which is what the backward pass needs.
* ``Hb`` ((T+1)*N, H): the hidden states, step 0 being h0 (zeros when there is none), so
  ``Hb[N:]`` is the output sequence and ``Hb[:T*N]`` the previous state of every step (what
  the recurrent weight's gradient is one GEMM with).  ``Cb`` likewise for the LSTM's cells.
* ``dG`` (T*N, k*H): the backward pass's gradients with respect to the gate pre-activations,
  stacked over the steps for the weight-gradient GEMMs.
* ``dh`` and ``dc`` (N, H): on return dh0 (when ``need_dh0``: otherwise step 0's recurrent
  product, which nothing but dh0 reads, is skipped) and dc0.  The GRU carries dh z in dh
  between steps.
* GRU: ``HN`` (T*N, H) keeps each step's h W_hn^T + b_hn (what r multiplied), and backward
  writes two gradient arrays, ``dGx`` for the input side and ``dGh`` for the hidden side
  (they differ in the n block, by the factor r).  RNN: no ``G``; the projection goes into
  ``Hb[N:]`` and each step's GEMM applies the activation in its write-back.
* ``work``: the packed weight (and for backward with rows outside whole micro-panels, W_hh
  transposed), sized by ``work_size``; the layer keeps it between calls.

The gate passes use numerically safe sigmoid and tanh (no overflow for any input).
"""
from cpython.pycapsule cimport PyCapsule_GetPointer

from microtile._common._mt_pool cimport pool_ranges, pool_items, pool_items_ends, pool_item

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport ceil_div, imin
from microtile._common._interrupt cimport (signal_poll, open_poll, close_poll, raise_for_rc,
                                           caller_poll, poll_step, INTERRUPTED)
from microtile._config._params cimport current_params
from microtile._kernels._ukernel cimport kernel_set_t, ukr_mr, ukr_nr
from microtile._kernels._dispatch cimport kernel_set
from microtile._kernels._dispatch import available_isas, isa_id
from microtile.linalg._gemm cimport (gemm_params, gemm_run, gemm_run_ep, gemm_epilogue,
                                     gemm_pack_b_full, gemm_packed_b_size,
                                     ACT_NONE, ACT_RELU, ACT_TANH)
from microtile.nn._rnn_cells cimport (_step, _loop, LSTM_FWD, LSTM_BWD, GRU_FWD, GRU_BWD,
                                      DH0, MAX_ITEM_GROUPS)
from microtile.nn import _rnn_cells


# The step item function per kernel set id (``gemm_params.isa``): the cells compiled for
# that ISA (see ``_rnn_cells.pxd``); the baseline one where no other was loaded.
cdef pool_item _item_fn[2]


cdef _load_items():
    cdef int i
    for i in range(2):
        _item_fn[i] = <pool_item> PyCapsule_GetPointer(_rnn_cells.item_task(),
                                                       b"microtile.rnn_item")
    if "avx2-fma" in available_isas():
        from microtile.nn import _rnn_cells_avx2
        _item_fn[isa_id("avx2-fma")] = <pool_item> PyCapsule_GetPointer(
            _rnn_cells_avx2.item_task(), b"microtile.rnn_item")


_load_items()


# A step's gate pass goes to more than one thread from this many gate elements (N * k * H)
# on: below it the team's start costs more than the pass (the element-wise kernels' bound).
cdef idx_t PAR_MIN = 1 << 15
# A fused LSTM/GRU step goes to the pool from this many multiply-adds (N * k*H * H) on.
cdef double STEP_PAR_MIN = 65536
# Items per thread in a step's job, where the units and rows allow: the caller ends each
# step waiting for the last item a helper took.  At 64 a 128->256 batch-32 step has one row
# group (6 rows) per item, 96 items, where 4 gave all 32 rows per item, 16 items: the
# caller's end-of-step wait fell from 1.0 to 0.7 ms per forward+backward and its time by
# 4.5 / 6.3 % (two runs, 2 threads, the two settings alternating in one process, medians
# of 40); the 2-layer 512-unit LSTM at batch 64 by 6 % (forward 10 %); GRU and batch 1
# unchanged.  Each item reads its gate panels of W_hh again (from L2).
cdef int ITEMS_PER_THREAD = 64
cdef int _plan(_loop* L, const gemm_params* prm, int kind, int nq, idx_t N, idx_t H,
               idx_t k, bint dbl) noexcept nogil:
    """Fill the loop's fixed fields; return the steps' thread count."""
    cdef int mr, nr, nt = prm.n_threads
    cdef idx_t want, n_items
    L.ks = kernel_set(prm.isa)
    L.item = _item_fn[prm.isa if 0 <= prm.isa < 2 else 0]
    mr = L.ks.d.mr if dbl else L.ks.s.mr
    nr = L.ks.d.nr if dbl else L.ks.s.nr
    L.kind = kind
    L.dbl = dbl
    L.nq = nq
    L.N = N
    L.H = H
    L.k = k
    L.kc = prm.kc if prm.kc > 0 else k
    L.n_blocks = ceil_div(H, nr)
    L.n_groups = ceil_div(N, mr)
    if nt > 1 and <double> N * <double> k * <double> H * nq < STEP_PAR_MIN:
        nt = 1
    want = ITEMS_PER_THREAD * nt if nt > 1 else 1
    L.groups_per_item = ceil_div(L.n_groups, imin(L.n_groups, ceil_div(want, L.n_blocks)))
    if L.groups_per_item > MAX_ITEM_GROUPS:
        L.groups_per_item = MAX_ITEM_GROUPS
    n_items = L.n_blocks * ceil_div(L.n_groups, L.groups_per_item)
    return nt if nt < n_items else <int> n_items


cdef inline void _step_job(_loop* L, int nt) noexcept nogil:
    pool_items_ends(nt, L.n_blocks * ceil_div(L.n_groups, L.groups_per_item), L.item, L)


cdef inline idx_t _mr(const gemm_params* prm, bint dbl) noexcept nogil:
    cdef const kernel_set_t* ks = kernel_set(prm.isa)
    return ks.d.mr if dbl else ks.s.mr


cdef idx_t _work_size(const gemm_params* prm, idx_t N, idx_t H, int nq, bint backward,
                      bint dbl) noexcept nogil:
    """Elements of ``work``: the packed weight when there is a whole row group; else (batch
    below mr) nothing forward and W_hh transposed backward, for the dot products."""
    cdef float ft = 0
    cdef double dt = 0
    cdef idx_t k = nq * H if backward else H
    if N >= _mr(prm, dbl):
        # Forward packs each gate's blocks separately: every gate's columns round up.
        return (gemm_packed_b_size(prm, k, H, &dt) if dbl else
                gemm_packed_b_size(prm, k, H, &ft)) * (1 if backward else nq)
    return nq * H * H if backward else 0


def work_size(str kind, idx_t N, idx_t H, bint backward, bint dbl):
    """Elements of the ``work`` array the LSTM or GRU (``kind``) time loop needs for batch N
    and hidden size H (at least 1), with the current parameters."""
    cdef gemm_params prm
    current_params(1 if dbl else 0, &prm)
    return max(1, _work_size(&prm, N, H, 4 if kind == "LSTM" else 3, backward, dbl))


cdef void _pack_forward(_loop* L, const gemm_params* prm, const floating* W,
                        floating* work) noexcept nogil:
    """W_hh^T's panels with the gates of each block of units side by side (see _loop.bp)
    when there is a whole row group; else (batch below mr) the dot products read W_hh's rows
    (gate q, unit j: row q*H + j) in place."""
    cdef int mr = ukr_mr(L.ks, W), nr = ukr_nr(L.ks, W)
    cdef idx_t H = L.H, b, q, j0
    L.e = W
    L.bp = work
    if L.N < mr:
        return
    for b in range(L.n_blocks):
        j0 = b * nr
        for q in range(L.nq):
            # Columns q*H + j0 .. of B = W_hh^T: rows of W_hh, so B's rows are contiguous
            # down W_hh's columns (rs 1) and its columns H apart.
            gemm_pack_b_full(prm, H, imin(nr, H - j0), W + (q * H + j0) * H, 1, H,
                             work + (b * L.nq + q) * H * nr)


cdef void _pack_backward(_loop* L, const gemm_params* prm, const floating* W,
                         floating* work) noexcept nogil:
    """W_hh (k*H x H) as panels of nr columns when there is a whole row group; else W_hh^T,
    whose rows the dot products read."""
    cdef int mr = ukr_mr(L.ks, W)
    cdef idx_t H = L.H, K = L.k, i, j
    L.bp = work
    L.e = work
    if L.N >= mr:
        gemm_pack_b_full(prm, K, H, W, H, 1, work)
        return
    for j in range(H):
        for i in range(K):
            work[j * K + i] = W[i * H + j]


cdef inline int _poll() noexcept nogil:
    return INTERRUPTED if poll_step(caller_poll(), 0) else 0


cdef inline void _clear(floating* p, idx_t n) noexcept nogil:
    cdef idx_t i
    for i in range(n):
        p[i] = 0


def _check(cond, what):
    if not cond:
        raise ValueError(f"_rnn_kernels: {what}")


cdef int _check_dy(const floating[:, :, :] dY) except -1:
    """The output gradient, indexed (T, N, H), may have any step and sample strides (a
    batch-first array is read in place) but its rows must be contiguous."""
    if dY.shape[2] > 1 and dY.strides[2] != sizeof(floating):
        raise ValueError("_rnn_kernels: the output gradient's rows must be contiguous")
    return 0


cdef int _check_work(const gemm_params* prm, idx_t size, idx_t N, idx_t H, int nq,
                     bint backward, bint dbl) except -1:
    if size < _work_size(prm, N, H, nq, backward, dbl):
        raise ValueError("_rnn_kernels: work is too small (see work_size)")
    return 0


# -- LSTM and GRU forward ----------------------------------------------------------------------

cdef int _fwd_loop(_loop* L, int nt, idx_t T, floating* G, floating* Hb, floating* Cb,
                   floating* HN, bint has_h0) noexcept nogil:
    cdef idx_t N = L.N, H = L.H, t
    cdef int gates = L.nq
    for t in range(T):
        L.s.g = G + t * N * gates * H
        L.s.hprev = Hb + t * N * H
        L.s.h = Hb + (t + 1) * N * H
        if Cb != NULL:
            L.s.cprev = Cb + t * N * H
            L.s.c = Cb + (t + 1) * N * H
        if HN != NULL:
            L.s.hn = HN + t * N * H
        # No initial state: step 0's product is zero (its tiles are zeros).
        L.a = NULL if (t == 0 and not has_h0) else L.s.hprev
        L.lda = H
        _step_job(L, nt)
        if _poll() != 0:
            return INTERRUPTED
    return 0


cdef int _forward(_loop* L, int kind, int nq, idx_t T, idx_t N, idx_t H, const floating* W,
                  floating* work, idx_t work_len, floating* G, floating* Hb, floating* Cb,
                  floating* HN, bint has_h0) except -1:
    """What the forward wrappers share once their shapes are checked: the plan, W_hh's
    packing and the loop, without the GIL (``L.s.b_hh`` set by the caller)."""
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc, nt
    cdef bint dbl = floating is double
    current_params(1 if dbl else 0, &prm)
    _check_work(&prm, work_len, N, H, nq, False, dbl)
    nt = _plan(L, &prm, kind, nq, N, H, H, dbl)
    L.s.H = H
    open_poll(&poll)
    with nogil:
        _pack_forward(L, &prm, W, work)
        rc = _fwd_loop(L, nt, T, G, Hb, Cb, HN, has_h0)
        close_poll()
    return raise_for_rc(rc, &poll, "a recurrent layer")


def lstm_forward(floating[:, ::1] G, floating[:, ::1] Hb, floating[:, ::1] Cb,
                 const floating[:, ::1] W_hh, idx_t N, bint has_h0, floating[::1] work):
    """Run the LSTM's steps.  G (T*N, 4H) holds x W_ih^T + b_ih + b_hh on entry and the gate
    activations on exit; Hb and Cb ((T+1)*N, H) hold the initial state in their first N rows
    (zeros when ``has_h0`` is False) and get every step's h and c after it.  ``work`` has
    ``work_size("LSTM", N, H, False, ...)`` elements."""
    cdef idx_t H = W_hh.shape[1], T
    cdef _loop L
    _check(H > 0 and N > 0 and W_hh.shape[0] == 4 * H and G.shape[1] == 4 * H
           and G.shape[0] % N == 0, "LSTM gate shapes")
    T = G.shape[0] // N
    _check(Hb.shape[0] == (T + 1) * N and Hb.shape[1] == H and Cb.shape[0] == Hb.shape[0]
           and Cb.shape[1] == H, "LSTM state shapes")
    if T == 0:
        return
    L.s.b_hh = NULL
    _forward(&L, LSTM_FWD, 4, T, N, H, &W_hh[0, 0], &work[0], work.shape[0], &G[0, 0],
             &Hb[0, 0], &Cb[0, 0], <floating*> NULL, has_h0)


def gru_forward(floating[:, ::1] G, floating[:, ::1] Hb, floating[:, ::1] HN,
                const floating[:, ::1] W_hh, const floating[::1] b_hh, bint use_bias,
                idx_t N, bint has_h0, floating[::1] work):
    """Run the GRU's steps.  G (T*N, 3H) holds x W_ih^T + b_ih on entry and the gate
    activations r, z, n on exit; Hb ((T+1)*N, H) as for the LSTM; HN (T*N, H) gets each
    step's h W_hn^T + b_hn (backward needs it).  ``b_hh`` (3H,) is read only when
    ``use_bias``.  ``work`` has ``work_size("GRU", N, H, False, ...)`` elements."""
    cdef idx_t H = W_hh.shape[1], T
    cdef _loop L
    _check(H > 0 and N > 0 and W_hh.shape[0] == 3 * H and G.shape[1] == 3 * H
           and G.shape[0] % N == 0 and b_hh.shape[0] == 3 * H, "GRU gate shapes")
    T = G.shape[0] // N
    _check(Hb.shape[0] == (T + 1) * N and Hb.shape[1] == H and HN.shape[0] == T * N
           and HN.shape[1] == H, "GRU state shapes")
    if T == 0:
        return
    # b_hh goes in with the product (its n part is multiplied by r, so it cannot be folded
    # into the input projection as the other biases are).
    L.s.b_hh = &b_hh[0] if use_bias else NULL
    _forward(&L, GRU_FWD, 3, T, N, H, &W_hh[0, 0], &work[0], work.shape[0], &G[0, 0],
             &Hb[0, 0], <floating*> NULL, &HN[0, 0], has_h0)


# -- LSTM and GRU backward ---------------------------------------------------------------------

cdef int _bwd_loop(_loop* L, int nt, idx_t T, const floating* G, const floating* Hb,
                   const floating* Cb, const floating* HN, const floating* dy, idx_t dy_ts,
                   floating* dGx, floating* dGh, bint need_dh0) noexcept nogil:
    """Step T-1's cell with no product, then per step t-1 the product dG_t W_hh (GRU: dGh_t)
    with step t-1's cell in its write-back, and last (for dh0) dG_0 W_hh alone."""
    cdef idx_t N = L.N, H = L.H, gh = L.k, t
    cdef int kind = L.kind
    for t in range(T - 1, -1, -1):
        L.s.g = <void*> (G + t * N * gh)
        if Cb != NULL:
            L.s.cprev = <void*> (Cb + t * N * H)
            L.s.c = <void*> (Cb + (t + 1) * N * H)
        else:
            L.s.hprev = <void*> (Hb + t * N * H)
            L.s.hn = <void*> (HN + t * N * H)
        L.s.dy = <void*> (dy + t * dy_ts)
        L.s.dgx = dGx + t * N * gh
        L.s.dgh = dGh + t * N * gh
        L.a = NULL if t == T - 1 else <const void*> (dGh + (t + 1) * N * gh)
        L.lda = gh
        _step_job(L, nt)
        if _poll() != 0:
            return INTERRUPTED
    if need_dh0:
        L.kind = DH0
        L.a = dGh
        _step_job(L, nt)
        L.kind = kind
    return 0


cdef int _backward(_loop* L, int kind, int nq, idx_t T, idx_t N, idx_t H, const floating* W,
                   floating* work, idx_t work_len, const floating* G, const floating* Hb,
                   const floating* Cb, const floating* HN, const floating[:, :, :] dY,
                   floating* dGx, floating* dGh, floating* dh, floating* dc,
                   bint need_dh0) except -1:
    """What the backward wrappers share once their shapes are checked: the plan, W_hh's
    packing, the carried gradients cleared and the loop, without the GIL."""
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc, nt
    cdef idx_t isz = sizeof(floating)
    cdef bint dbl = floating is double
    current_params(1 if dbl else 0, &prm)
    _check_work(&prm, work_len, N, H, nq, True, dbl)
    nt = _plan(L, &prm, kind, 1, N, H, nq * H, dbl)
    L.s.H = H
    L.s.dy_rs = dY.strides[1] // isz
    L.s.dh = dh
    L.s.dc = dc
    open_poll(&poll)
    with nogil:
        _pack_backward(L, &prm, W, work)
        _clear(dh, N * H)
        if dc != NULL:
            _clear(dc, N * H)
        rc = _bwd_loop(L, nt, T, G, Hb, Cb, HN, &dY[0, 0, 0], dY.strides[0] // isz, dGx, dGh,
                       need_dh0)
        close_poll()
    return raise_for_rc(rc, &poll, "a recurrent layer")


def lstm_backward(const floating[:, ::1] G, const floating[:, ::1] Cb,
                  const floating[:, :, :] dY, const floating[:, ::1] W_hh,
                  floating[:, ::1] dG, floating[:, ::1] dh, floating[:, ::1] dc,
                  bint need_dh0, floating[::1] work):
    """Back through the LSTM's steps, from the forward's G (activations) and Cb.  dY is the
    output gradient indexed (T, N, H) (any strides but the last).  Writes dG (T*N, 4H); dh
    and dc (N, H) end as dh0 (when ``need_dh0``) and dc0.  ``work`` has
    ``work_size("LSTM", N, H, True, ...)`` elements."""
    cdef idx_t H = W_hh.shape[1], N = dY.shape[1], T = dY.shape[0]
    cdef _loop L
    _check(H > 0 and W_hh.shape[0] == 4 * H and G.shape[0] == T * N and G.shape[1] == 4 * H
           and dG.shape[0] == T * N and dG.shape[1] == 4 * H and dY.shape[2] == H
           and Cb.shape[0] == (T + 1) * N and Cb.shape[1] == H and dh.shape[0] == N
           and dh.shape[1] == H and dc.shape[0] == N and dc.shape[1] == H,
           "LSTM backward shapes")
    _check_dy(dY)
    if T == 0 or N == 0:
        dh[:, :] = 0
        dc[:, :] = 0
        return
    _backward(&L, LSTM_BWD, 4, T, N, H, &W_hh[0, 0], &work[0], work.shape[0], &G[0, 0],
              <floating*> NULL, &Cb[0, 0], <floating*> NULL, dY, &dG[0, 0], &dG[0, 0],
              &dh[0, 0], &dc[0, 0], need_dh0)


def gru_backward(const floating[:, ::1] G, const floating[:, ::1] Hb,
                 const floating[:, ::1] HN, const floating[:, :, :] dY,
                 const floating[:, ::1] W_hh, floating[:, ::1] dGx, floating[:, ::1] dGh,
                 floating[:, ::1] dh, bint need_dh0, floating[::1] work):
    """Back through the GRU's steps.  Writes the input-side gate gradients dGx and the
    hidden-side ones dGh (T*N, 3H); dh (N, H) ends as dh0 when ``need_dh0``.  ``work`` has
    ``work_size("GRU", N, H, True, ...)`` elements."""
    cdef idx_t H = W_hh.shape[1], N = dY.shape[1], T = dY.shape[0]
    cdef _loop L
    _check(H > 0 and W_hh.shape[0] == 3 * H and G.shape[0] == T * N and G.shape[1] == 3 * H
           and dGx.shape[0] == T * N and dGx.shape[1] == 3 * H and dGh.shape[0] == T * N
           and dGh.shape[1] == 3 * H and dY.shape[2] == H and Hb.shape[0] == (T + 1) * N
           and Hb.shape[1] == H and HN.shape[0] == T * N and HN.shape[1] == H
           and dh.shape[0] == N and dh.shape[1] == H, "GRU backward shapes")
    _check_dy(dY)
    if T == 0 or N == 0:
        dh[:, :] = 0
        return
    _backward(&L, GRU_BWD, 3, T, N, H, &W_hh[0, 0], &work[0], work.shape[0], &G[0, 0],
              &Hb[0, 0], <floating*> NULL, &HN[0, 0], dY, &dGx[0, 0], &dGh[0, 0], &dh[0, 0],
              <floating*> NULL, need_dh0)


# -- the RNN's gate pass (its forward needs none: the GEMM's write-back applies the
# activation) -----------------------------------------------------------------------------------

cdef void _rnn_bwd(const _step* s, idx_t r0, idx_t r1, floating tag) noexcept nogil:
    """da = (dy + carried dh) * act'(h), the derivative written through the output h
    (tanh: 1 - h^2; ReLU: 0 where h <= 0, as torch's threshold_backward)."""
    cdef idx_t H = s.H, r, j
    cdef const floating* h
    cdef const floating* dy
    cdef const floating* dhc
    cdef floating* dg
    cdef floating dh, hv
    for r in range(r0, r1):
        h = <const floating*> s.h + r * H
        dy = <const floating*> s.dy + r * s.dy_rs
        dhc = <const floating*> s.dh + r * H
        dg = <floating*> s.dgx + r * H
        if s.act == ACT_RELU:
            for j in range(H):
                dh = dy[j] + dhc[j]
                hv = h[j]
                dg[j] = 0 if hv <= 0 else dh
        else:
            for j in range(H):
                dh = dy[j] + dhc[j]
                hv = h[j]
                dg[j] = dh * (1 - hv * hv)


ctypedef struct _rows_job:
    const _step* s
    bint dbl


cdef void _rows_range(void* ctx, idx_t r0, idx_t r1, int tid) noexcept nogil:
    cdef const _rows_job* j = <const _rows_job*> ctx
    if j.dbl:
        _rnn_bwd(j.s, r0, r1, <double> 0)
    else:
        _rnn_bwd(j.s, r0, r1, <float> 0)


cdef void _rows(const _step* s, idx_t n, int nt, floating tag) noexcept nogil:
    """The RNN's gate pass over the step's n rows, on nt threads (each a contiguous block of
    rows).  ``tag`` only selects the dtype."""
    cdef _rows_job j
    if nt <= 1:
        _rnn_bwd(s, 0, n, tag)
        return
    j.s = s
    j.dbl = floating is double
    pool_ranges(nt, n, 4 * nt, 1, _rows_range, &j)


cdef int _threads(int dtype_code, idx_t n, idx_t width, gemm_params* prm) except -1:
    """Fill ``prm`` (the GEMM's parameters) and return the gate pass's thread count."""
    current_params(dtype_code, prm)
    if n < 2 or n * width < PAR_MIN or prm.n_threads < 2:
        return 1
    return prm.n_threads if prm.n_threads < n else <int> n


# -- RNN (tanh or ReLU) ----------------------------------------------------------------------

cdef int _rnn_fwd_loop(const gemm_params* prm, idx_t T, idx_t N, idx_t H, floating* Hb,
                       const floating* W, int act, bint has_h0) noexcept nogil:
    cdef gemm_epilogue ep
    cdef idx_t t
    cdef int rc
    cdef floating alpha
    ep.bias = NULL
    ep.bias_inc = 0
    ep.bias_axis = 1
    ep.act = act
    for t in range(T):
        # h_t = act(h_{t-1} W_hh^T + (the projection already in h_t's rows)): the whole
        # cell is the GEMM with its activation applied in the write-back.
        alpha = 0 if (t == 0 and not has_h0) else 1
        rc = gemm_run_ep(prm, N, H, H, alpha, Hb + t * N * H, H, 1, W, 1, H, <floating> 1,
                         Hb + (t + 1) * N * H, H, 1, &ep)
        if rc != 0:
            return rc
    return 0


cdef int _rnn_bwd_loop(const gemm_params* prm, int nt, idx_t T, idx_t N, idx_t H,
                       const floating* Hb, const floating* dy, idx_t dy_ts, idx_t dy_rs,
                       const floating* W, floating* dG, floating* dh, int act,
                       bint need_dh0) noexcept nogil:
    cdef _step s
    cdef idx_t t
    cdef int rc
    s.H = H
    s.act = act
    s.dy_rs = dy_rs
    s.dh = dh
    _clear(dh, N * H)
    for t in range(T - 1, -1, -1):
        s.h = <void*> (Hb + (t + 1) * N * H)
        s.dy = <void*> (dy + t * dy_ts)
        s.dgx = dG + t * N * H
        _rows(&s, N, nt, <floating> 0)
        if t > 0 or need_dh0:
            rc = gemm_run(prm, N, H, H, <floating> 1, <const floating*> s.dgx, H, 1, W, H, 1,
                          <floating> 0, dh, H, 1)
            if rc != 0:
                return rc
    return 0


def rnn_forward(floating[:, ::1] Hb, const floating[:, ::1] W_hh, idx_t N, int act,
                bint has_h0):
    """Run the Elman RNN's steps in Hb ((T+1)*N, H): rows from N on hold x W_ih^T + b_ih +
    b_hh on entry and h_1..h_T on exit; the first N rows the initial state (or zeros).
    ``act`` is the GEMM epilogue's ACT_TANH or ACT_RELU."""
    cdef idx_t H = W_hh.shape[1], T
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc
    _check(H > 0 and N > 0 and W_hh.shape[0] == H and Hb.shape[1] == H
           and Hb.shape[0] % N == 0 and Hb.shape[0] >= N, "RNN shapes")
    _check(act == ACT_TANH or act == ACT_RELU, "RNN activation")
    T = Hb.shape[0] // N - 1
    if T == 0:
        return
    current_params(0 if floating is float else 1, &prm)
    open_poll(&poll)
    with nogil:
        rc = _rnn_fwd_loop(&prm, T, N, H, &Hb[0, 0], &W_hh[0, 0], act, has_h0)
        close_poll()
    raise_for_rc(rc, &poll, "a recurrent layer's GEMM")


def rnn_backward(const floating[:, ::1] Hb, const floating[:, :, :] dY,
                 const floating[:, ::1] W_hh, floating[:, ::1] dG, floating[:, ::1] dh,
                 int act, bint need_dh0):
    """Back through the RNN's steps: dG (T*N, H) gets the pre-activation gradients, dh (N, H)
    ends as dh0 when ``need_dh0``."""
    cdef idx_t H = W_hh.shape[1], N = dY.shape[1], T = dY.shape[0]
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc, nt
    cdef idx_t isz = sizeof(floating)
    _check(H > 0 and W_hh.shape[0] == H and dY.shape[2] == H and Hb.shape[0] == (T + 1) * N
           and Hb.shape[1] == H and dG.shape[0] == T * N and dG.shape[1] == H
           and dh.shape[0] == N and dh.shape[1] == H, "RNN backward shapes")
    _check_dy(dY)
    _check(act == ACT_TANH or act == ACT_RELU, "RNN activation")
    if T == 0 or N == 0:
        dh[:, :] = 0
        return
    nt = _threads(0 if floating is float else 1, N, H, &prm)
    open_poll(&poll)
    with nogil:
        rc = _rnn_bwd_loop(&prm, nt, T, N, H, &Hb[0, 0], &dY[0, 0, 0], dY.strides[0] // isz,
                           dY.strides[1] // isz, &W_hh[0, 0], &dG[0, 0], &dh[0, 0], act,
                           need_dh0)
        close_poll()
    raise_for_rc(rc, &poll, "a recurrent layer's GEMM")
