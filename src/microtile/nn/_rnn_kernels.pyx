"""Time loops of the recurrent layers (RNN, LSTM, GRU), forward and backward, without the GIL.

The layer (``_rnn.py``) does what is done once per sequence: the input projection of all
steps as one GEMM before the loop, and after the backward loop the weight gradients of all
steps as one GEMM per weight and the input gradient as one more.  What is left is
sequential, and runs here in one nogil call per layer so that no step goes back to Python:
per step, the recurrent product on microtile's GEMM, then one pass over the gates.

Layout (time-major, C-contiguous, rows of N samples per step):

* ``G`` (T*N, k*H): a step's gate block, rows ``t*N .. t*N+N``.  Forward: on entry the input
  projection (with the biases the layer folded in), on exit the gate *activations* (LSTM
  i, f, g, o; GRU r, z, n), which is what the backward pass needs.
* ``Hb`` ((T+1)*N, H): the hidden states, step 0 being h0 (zeros when there is none), so
  ``Hb[N:]`` is the output sequence and ``Hb[:T*N]`` the previous state of every step (what
  the recurrent weight's gradient is one GEMM with).  ``Cb`` likewise for the LSTM's cells.
* ``dG`` (T*N, k*H): the backward pass's gradients with respect to the gate pre-activations,
  stacked over the steps for the weight-gradient GEMMs.
* ``dh`` and ``dc`` (N, H): the gradients carried from step t to step t-1; on return they
  hold dh0 and dc0 (dh0 only when ``need_dh0``: otherwise step 0's recurrent product,
  which nothing but dh0 reads, is skipped).
* GRU: ``HN`` (T*N, H) keeps each step's h W_hn^T + b_hn (what r multiplied), and backward
  writes two gradient arrays, ``dGx`` for the input side and ``dGh`` for the hidden side
  (they differ in the n block, by the factor r).  RNN: no ``G``; the projection goes into
  ``Hb[N:]`` and each step's GEMM applies the activation in its write-back.

The gate passes use numerically safe sigmoid and tanh (no overflow for any input).  Rows are
split over threads when a step has enough elements to pay for a second thread.
"""
from microtile._common._mt_pool cimport pool_ranges

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._interrupt cimport signal_poll, open_poll, close_poll, raise_for_rc
from microtile._config._params cimport current_params
from microtile.linalg._gemm cimport (gemm_params, gemm_run, gemm_run_ep, gemm_epilogue,
                                     ACT_NONE, ACT_RELU, ACT_TANH)
from microtile.nn._act_math cimport sigmoid, tanh_


# A step's gate pass goes to more than one thread from this many gate elements (N * k * H)
# on: below it the team's start costs more than the pass (the element-wise kernels' bound).
cdef idx_t PAR_MIN = 1 << 15

# Which pass ``_rows`` runs.
cdef enum:
    LSTM_FWD = 0
    LSTM_BWD = 1
    GRU_FWD = 2
    GRU_BWD = 3
    RNN_BWD = 4

# The operands of one step's gate pass (row 0 of each block; rows are ``H`` or ``k*H`` long).
# Untyped so that one struct serves both dtypes; the row functions cast to theirs.
ctypedef struct _step:
    void* g         # gate block (N, k*H): pre-activations in, activations out (forward)
    void* s         # GRU: the hidden projection h W_hh^T + b_hh (N, 3H)
    void* hn        # GRU: its n part, kept for backward (N, H)
    void* hprev     # h_{t-1} (N, H)
    void* h         # h_t (N, H)
    void* cprev     # LSTM: c_{t-1}
    void* c         # LSTM: c_t
    void* dy        # output gradient of the step: row n at dy + n * dy_rs
    idx_t dy_rs
    void* dh        # carried dh (N, H)
    void* dc        # LSTM: carried dc (N, H)
    void* dgx       # gate gradients (N, k*H), and for the GRU those of the hidden side:
    void* dgh
    idx_t H
    int act         # RNN: ACT_TANH or ACT_RELU


cdef void _lstm_fwd(const _step* s, idx_t r0, idx_t r1, floating tag) noexcept nogil:
    """Gates i, f, g, o from their pre-activations; c = f*c_prev + i*g; h = o*tanh(c)."""
    cdef idx_t H = s.H, r, j
    cdef floating* g
    cdef const floating* cp
    cdef floating* c
    cdef floating* h
    cdef floating cv
    for r in range(r0, r1):
        g = <floating*> s.g + r * 4 * H
        cp = <const floating*> s.cprev + r * H
        c = <floating*> s.c + r * H
        h = <floating*> s.h + r * H
        # One loop per gate block, each an in-place map over contiguous elements that the
        # compiler vectorises (one loop over all four blocks and c, h did not: too many
        # possible overlaps to check), then the cell update.
        for j in range(2 * H):
            g[j] = sigmoid(g[j])
        for j in range(2 * H, 3 * H):
            g[j] = tanh_(g[j])
        for j in range(3 * H, 4 * H):
            g[j] = sigmoid(g[j])
        for j in range(H):
            cv = g[H + j] * cp[j] + g[j] * g[2 * H + j]
            c[j] = cv
            h[j] = g[3 * H + j] * tanh_(cv)


cdef void _lstm_bwd(const _step* s, idx_t r0, idx_t r1, floating tag) noexcept nogil:
    """From dh = dy + carried dh and the carried dc: the four gate pre-activation gradients;
    the carried dc becomes dc * f (its share for step t-1)."""
    cdef idx_t H = s.H, r, j
    cdef const floating* g
    cdef const floating* cp
    cdef const floating* c
    cdef const floating* dy
    cdef const floating* dhc
    cdef floating* dc
    cdef floating* dg
    cdef floating ig, fg, gg, og, tc, dh, dcv
    for r in range(r0, r1):
        g = <const floating*> s.g + r * 4 * H
        cp = <const floating*> s.cprev + r * H
        c = <const floating*> s.c + r * H
        dy = <const floating*> s.dy + r * s.dy_rs
        dhc = <const floating*> s.dh + r * H
        dc = <floating*> s.dc + r * H
        dg = <floating*> s.dgx + r * 4 * H
        for j in range(H):
            ig = g[j]
            fg = g[H + j]
            gg = g[2 * H + j]
            og = g[3 * H + j]
            # tanh(c) again rather than kept from forward: one more array of T*N*H saved for
            # a tanh per element.
            tc = tanh_(c[j])
            dh = dy[j] + dhc[j]
            dcv = dc[j] + dh * og * (1 - tc * tc)
            dg[j] = dcv * gg * (ig * (1 - ig))
            dg[H + j] = dcv * cp[j] * (fg * (1 - fg))
            dg[2 * H + j] = dcv * ig * (1 - gg * gg)
            dg[3 * H + j] = dh * tc * (og * (1 - og))
            dc[j] = dcv * fg


cdef void _gru_fwd(const _step* s, idx_t r0, idx_t r1, floating tag) noexcept nogil:
    """r = sig(x_r + s_r), z = sig(x_z + s_z), n = tanh(x_n + r * s_n), h = n + z (h_prev - n)
    (torch's form of (1 - z) n + z h_prev), with s = h_prev W_hh^T + b_hh."""
    cdef idx_t H = s.H, r, j
    cdef floating* g
    cdef const floating* sv
    cdef const floating* hp
    cdef floating* h
    cdef floating* hn
    cdef floating rg, zg, ng, hnv
    for r in range(r0, r1):
        g = <floating*> s.g + r * 3 * H
        sv = <const floating*> s.s + r * 3 * H
        hp = <const floating*> s.hprev + r * H
        h = <floating*> s.h + r * H
        hn = <floating*> s.hn + r * H
        for j in range(H):
            rg = sigmoid(g[j] + sv[j])
            zg = sigmoid(g[H + j] + sv[H + j])
            hnv = sv[2 * H + j]
            ng = tanh_(g[2 * H + j] + rg * hnv)
            g[j] = rg
            g[H + j] = zg
            g[2 * H + j] = ng
            hn[j] = hnv
            h[j] = ng + zg * (hp[j] - ng)


cdef void _gru_bwd(const _step* s, idx_t r0, idx_t r1, floating tag) noexcept nogil:
    """Gate gradients on the input side (dgx) and the hidden side (dgh: the n part scaled by
    r, which multiplies the hidden projection); the carried dh becomes dh * z, to which the
    caller's GEMM adds dgh W_hh."""
    cdef idx_t H = s.H, r, j
    cdef const floating* g
    cdef const floating* hp
    cdef const floating* hn
    cdef const floating* dy
    cdef floating* dhc
    cdef floating* dgx
    cdef floating* dgh
    cdef floating rg, zg, ng, dh, dn, dz, dan, daz, dar
    for r in range(r0, r1):
        g = <const floating*> s.g + r * 3 * H
        hp = <const floating*> s.hprev + r * H
        hn = <const floating*> s.hn + r * H
        dy = <const floating*> s.dy + r * s.dy_rs
        dhc = <floating*> s.dh + r * H
        dgx = <floating*> s.dgx + r * 3 * H
        dgh = <floating*> s.dgh + r * 3 * H
        for j in range(H):
            rg = g[j]
            zg = g[H + j]
            ng = g[2 * H + j]
            dh = dy[j] + dhc[j]
            dn = dh * (1 - zg)
            dz = dh * (hp[j] - ng)
            dan = dn * (1 - ng * ng)
            daz = dz * (zg * (1 - zg))
            dar = dan * hn[j] * (rg * (1 - rg))
            dgx[j] = dar
            dgx[H + j] = daz
            dgx[2 * H + j] = dan
            dgh[j] = dar
            dgh[H + j] = daz
            dgh[2 * H + j] = dan * rg
            dhc[j] = dh * zg


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


cdef inline void _rows_part(int kind, const _step* s, idx_t r0, idx_t r1,
                            floating tag) noexcept nogil:
    if kind == LSTM_FWD:
        _lstm_fwd(s, r0, r1, tag)
    elif kind == LSTM_BWD:
        _lstm_bwd(s, r0, r1, tag)
    elif kind == GRU_FWD:
        _gru_fwd(s, r0, r1, tag)
    elif kind == GRU_BWD:
        _gru_bwd(s, r0, r1, tag)
    else:
        _rnn_bwd(s, r0, r1, tag)


cdef void _rows(int kind, const _step* s, idx_t n, int nt, floating tag) noexcept nogil:
    """One gate pass over the step's n rows, on nt threads (each a contiguous block of rows).
    ``tag`` only selects the dtype."""
    cdef _rows_job j
    if nt <= 1:
        _rows_part(kind, s, 0, n, tag)
        return
    j.kind = kind
    j.s = s
    j.dbl = floating is double
    pool_ranges(nt, n, 4 * nt, 1, _rows_range, &j)


ctypedef struct _rows_job:
    int kind
    const _step* s
    bint dbl


cdef void _rows_range(void* ctx, idx_t r0, idx_t r1, int tid) noexcept nogil:
    cdef const _rows_job* j = <const _rows_job*> ctx
    cdef float f = 0
    cdef double d = 0
    if j.dbl:
        _rows_part(j.kind, j.s, r0, r1, d)
    else:
        _rows_part(j.kind, j.s, r0, r1, f)


cdef int _threads(int dtype_code, idx_t n, idx_t width, gemm_params* prm) except -1:
    """Fill ``prm`` (the GEMM's parameters) and return the gate pass's thread count."""
    current_params(dtype_code, prm)
    if n < 2 or n * width < PAR_MIN or prm.n_threads < 2:
        return 1
    return prm.n_threads if prm.n_threads < n else <int> n



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


# -- LSTM ------------------------------------------------------------------------------------

cdef int _lstm_fwd_loop(const gemm_params* prm, int nt, idx_t T, idx_t N, idx_t H,
                        floating* G, floating* Hb, floating* Cb, const floating* W,
                        bint has_h0) noexcept nogil:
    cdef _step s
    cdef idx_t t
    cdef int rc
    cdef floating alpha
    s.H = H
    for t in range(T):
        s.g = G + t * N * 4 * H
        s.hprev = Hb + t * N * H
        s.h = Hb + (t + 1) * N * H
        s.cprev = Cb + t * N * H
        s.c = Cb + (t + 1) * N * H
        # gates += h_{t-1} W_hh^T (W_hh is (4H, H): its transpose has strides 1 and H).
        # With no initial state step 0's product is zero: alpha = 0 skips it.
        alpha = 0 if (t == 0 and not has_h0) else 1
        rc = gemm_run(prm, N, 4 * H, H, alpha, <const floating*> s.hprev, H, 1, W, 1, H,
                      <floating> 1, <floating*> s.g, 4 * H, 1)
        if rc != 0:
            return rc
        _rows(LSTM_FWD, &s, N, nt, <floating> 0)
    return 0


cdef int _lstm_bwd_loop(const gemm_params* prm, int nt, idx_t T, idx_t N, idx_t H,
                        const floating* G, const floating* Cb, const floating* dy,
                        idx_t dy_ts, idx_t dy_rs, const floating* W, floating* dG,
                        floating* dh, floating* dc, bint need_dh0) noexcept nogil:
    cdef _step s
    cdef idx_t t
    cdef int rc
    s.H = H
    s.dy_rs = dy_rs
    s.dh = dh
    s.dc = dc
    _clear(dh, N * H)
    _clear(dc, N * H)
    for t in range(T - 1, -1, -1):
        s.g = <void*> (G + t * N * 4 * H)
        s.cprev = <void*> (Cb + t * N * H)
        s.c = <void*> (Cb + (t + 1) * N * H)
        s.dy = <void*> (dy + t * dy_ts)
        s.dgx = dG + t * N * 4 * H
        _rows(LSTM_BWD, &s, N, nt, <floating> 0)
        if t > 0 or need_dh0:
            # dh for step t-1: dG_t W_hh.
            rc = gemm_run(prm, N, H, 4 * H, <floating> 1, <const floating*> s.dgx, 4 * H, 1,
                          W, H, 1, <floating> 0, dh, H, 1)
            if rc != 0:
                return rc
    return 0


def lstm_forward(floating[:, ::1] G, floating[:, ::1] Hb, floating[:, ::1] Cb,
                 const floating[:, ::1] W_hh, idx_t N, bint has_h0):
    """Run the LSTM's steps.  G (T*N, 4H) holds x W_ih^T + b_ih + b_hh on entry and the gate
    activations on exit; Hb and Cb ((T+1)*N, H) hold the initial state in their first N rows
    (zeros when ``has_h0`` is False) and get every step's h and c after it."""
    cdef idx_t H = W_hh.shape[1], T
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc, nt
    _check(H > 0 and N > 0 and W_hh.shape[0] == 4 * H and G.shape[1] == 4 * H
           and G.shape[0] % N == 0, "LSTM gate shapes")
    T = G.shape[0] // N
    _check(Hb.shape[0] == (T + 1) * N and Hb.shape[1] == H and Cb.shape[0] == Hb.shape[0]
           and Cb.shape[1] == H, "LSTM state shapes")
    if T == 0:
        return
    nt = _threads(0 if floating is float else 1, N, 4 * H, &prm)
    open_poll(&poll)
    with nogil:
        rc = _lstm_fwd_loop(&prm, nt, T, N, H, &G[0, 0], &Hb[0, 0], &Cb[0, 0], &W_hh[0, 0],
                            has_h0)
        close_poll()
    raise_for_rc(rc, &poll, "a recurrent layer's GEMM")


def lstm_backward(const floating[:, ::1] G, const floating[:, ::1] Cb,
                  const floating[:, :, :] dY, const floating[:, ::1] W_hh,
                  floating[:, ::1] dG, floating[:, ::1] dh, floating[:, ::1] dc,
                  bint need_dh0):
    """Back through the LSTM's steps, from the forward's G (activations) and Cb.  dY is the
    output gradient indexed (T, N, H) (any strides but the last).  Writes dG (T*N, 4H); dh
    and dc (N, H) end as dh0 (when ``need_dh0``) and dc0."""
    cdef idx_t H = W_hh.shape[1], N = dY.shape[1], T = dY.shape[0]
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc, nt
    cdef idx_t isz = sizeof(floating)
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
    nt = _threads(0 if floating is float else 1, N, 4 * H, &prm)
    open_poll(&poll)
    with nogil:
        rc = _lstm_bwd_loop(&prm, nt, T, N, H, &G[0, 0], &Cb[0, 0], &dY[0, 0, 0],
                            dY.strides[0] // isz, dY.strides[1] // isz, &W_hh[0, 0],
                            &dG[0, 0], &dh[0, 0], &dc[0, 0], need_dh0)
        close_poll()
    raise_for_rc(rc, &poll, "a recurrent layer's GEMM")


# -- GRU -------------------------------------------------------------------------------------

cdef int _gru_fwd_loop(const gemm_params* prm, int nt, idx_t T, idx_t N, idx_t H,
                       floating* G, floating* Hb, floating* HN, floating* S,
                       const floating* W, const floating* b_hh, bint has_h0) noexcept nogil:
    cdef _step s
    cdef gemm_epilogue ep
    cdef idx_t t
    cdef int rc
    cdef floating alpha
    # b_hh goes in with the GEMM's write-back: s = h W_hh^T + b_hh (its n part is multiplied
    # by r, so it cannot be folded into the input projection as the other biases are).
    ep.bias = b_hh
    ep.bias_inc = 1
    ep.bias_axis = 1
    ep.act = ACT_NONE
    s.H = H
    s.s = S
    for t in range(T):
        s.g = G + t * N * 3 * H
        s.hprev = Hb + t * N * H
        s.h = Hb + (t + 1) * N * H
        s.hn = HN + t * N * H
        # alpha = 0 at step 0 without an initial state: s is then b_hh alone.
        alpha = 0 if (t == 0 and not has_h0) else 1
        rc = gemm_run_ep(prm, N, 3 * H, H, alpha, <const floating*> s.hprev, H, 1, W, 1, H,
                         <floating> 0, S, 3 * H, 1, &ep)
        if rc != 0:
            return rc
        _rows(GRU_FWD, &s, N, nt, <floating> 0)
    return 0


cdef int _gru_bwd_loop(const gemm_params* prm, int nt, idx_t T, idx_t N, idx_t H,
                       const floating* G, const floating* Hb, const floating* HN,
                       const floating* dy, idx_t dy_ts, idx_t dy_rs, const floating* W,
                       floating* dGx, floating* dGh, floating* dh, bint need_dh0) noexcept nogil:
    cdef _step s
    cdef idx_t t
    cdef int rc
    s.H = H
    s.dy_rs = dy_rs
    s.dh = dh
    _clear(dh, N * H)
    for t in range(T - 1, -1, -1):
        s.g = <void*> (G + t * N * 3 * H)
        s.hprev = <void*> (Hb + t * N * H)
        s.hn = <void*> (HN + t * N * H)
        s.dy = <void*> (dy + t * dy_ts)
        s.dgx = dGx + t * N * 3 * H
        s.dgh = dGh + t * N * 3 * H
        _rows(GRU_BWD, &s, N, nt, <floating> 0)
        if t > 0 or need_dh0:
            # The pass left dh * z in dh; add the path through the hidden projection.
            rc = gemm_run(prm, N, H, 3 * H, <floating> 1, <const floating*> s.dgh, 3 * H, 1,
                          W, H, 1, <floating> 1, dh, H, 1)
            if rc != 0:
                return rc
    return 0


def gru_forward(floating[:, ::1] G, floating[:, ::1] Hb, floating[:, ::1] HN,
                floating[:, ::1] S, const floating[:, ::1] W_hh, const floating[::1] b_hh,
                bint use_bias, idx_t N, bint has_h0):
    """Run the GRU's steps.  G (T*N, 3H) holds x W_ih^T + b_ih on entry and the gate
    activations r, z, n on exit; Hb ((T+1)*N, H) as for the LSTM; HN (T*N, H) gets each
    step's h W_hn^T + b_hn (backward needs it); S (N, 3H) is scratch.  ``b_hh`` (3H,) is
    read only when ``use_bias``."""
    cdef idx_t H = W_hh.shape[1], T
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc, nt
    _check(H > 0 and N > 0 and W_hh.shape[0] == 3 * H and G.shape[1] == 3 * H
           and G.shape[0] % N == 0 and b_hh.shape[0] == 3 * H, "GRU gate shapes")
    T = G.shape[0] // N
    _check(Hb.shape[0] == (T + 1) * N and Hb.shape[1] == H and HN.shape[0] == T * N
           and HN.shape[1] == H and S.shape[0] == N and S.shape[1] == 3 * H,
           "GRU state shapes")
    if T == 0:
        return
    nt = _threads(0 if floating is float else 1, N, 3 * H, &prm)
    open_poll(&poll)
    with nogil:
        rc = _gru_fwd_loop(&prm, nt, T, N, H, &G[0, 0], &Hb[0, 0], &HN[0, 0], &S[0, 0],
                           &W_hh[0, 0], &b_hh[0] if use_bias else NULL, has_h0)
        close_poll()
    raise_for_rc(rc, &poll, "a recurrent layer's GEMM")


def gru_backward(const floating[:, ::1] G, const floating[:, ::1] Hb,
                 const floating[:, ::1] HN, const floating[:, :, :] dY,
                 const floating[:, ::1] W_hh, floating[:, ::1] dGx, floating[:, ::1] dGh,
                 floating[:, ::1] dh, bint need_dh0):
    """Back through the GRU's steps.  Writes the input-side gate gradients dGx and the
    hidden-side ones dGh (T*N, 3H); dh (N, H) ends as dh0 when ``need_dh0``."""
    cdef idx_t H = W_hh.shape[1], N = dY.shape[1], T = dY.shape[0]
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc, nt
    cdef idx_t isz = sizeof(floating)
    _check(H > 0 and W_hh.shape[0] == 3 * H and G.shape[0] == T * N and G.shape[1] == 3 * H
           and dGx.shape[0] == T * N and dGx.shape[1] == 3 * H and dGh.shape[0] == T * N
           and dGh.shape[1] == 3 * H and dY.shape[2] == H and Hb.shape[0] == (T + 1) * N
           and Hb.shape[1] == H and HN.shape[0] == T * N and HN.shape[1] == H
           and dh.shape[0] == N and dh.shape[1] == H, "GRU backward shapes")
    _check_dy(dY)
    if T == 0 or N == 0:
        dh[:, :] = 0
        return
    nt = _threads(0 if floating is float else 1, N, 3 * H, &prm)
    open_poll(&poll)
    with nogil:
        rc = _gru_bwd_loop(&prm, nt, T, N, H, &G[0, 0], &Hb[0, 0], &HN[0, 0], &dY[0, 0, 0],
                           dY.strides[0] // isz, dY.strides[1] // isz, &W_hh[0, 0],
                           &dGx[0, 0], &dGh[0, 0], &dh[0, 0], need_dh0)
        close_poll()
    raise_for_rc(rc, &poll, "a recurrent layer's GEMM")


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
        _rows(RNN_BWD, &s, N, nt, <floating> 0)
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
