"""Element-wise kernels of the neural-network layers: activations, their derivatives, bias.

Activation codes: 0 identity, 1 ReLU, 2 sigmoid, 3 tanh.  Every derivative is written in
terms of the activation's *output* y (ReLU: 0 where y <= 0, else 1, so 1 at NaN as in
torch; sigmoid: y(1 - y); tanh: 1 - y^2), so a layer that applied the activation in its own
write-back (a fused Linear + ReLU) needs to keep only the output for its backward pass.

These are private helpers of ``microtile.nn``: the callers own the buffers (C-contiguous, one
dtype), so the wrappers only check what the memoryview types do not.  Loops are split into
per-thread contiguous chunks and the inner loops are plain pointer loops so that the compiler
vectorises them; the activation is chosen outside the loops for the same reason.
"""
from cython.parallel cimport prange
from libc.math cimport exp, expf, tanh, tanhf

from microtile._common._mt_openmp cimport mt_share, mt_share_end
from microtile._common._typedefs cimport idx_t, floating
from microtile.linalg._gemm cimport gemm_params
from microtile._config._params cimport current_params


# Below this many elements a second thread costs more than it saves (a pass over ~256 KiB).
cdef idx_t PAR_MIN = 1 << 15


cdef inline int _threads_for(idx_t n) except -1:
    cdef gemm_params prm
    if n < PAR_MIN:
        return 1
    current_params(0, &prm)
    return prm.n_threads if prm.n_threads > 1 else 1


cdef inline floating _sigmoid(floating v) noexcept nogil:
    # Only exp of a non-positive number is taken: no overflow for any input, NaN propagates.
    cdef floating e
    if floating is float:
        if v >= 0:
            return 1.0 / (1.0 + expf(-v))
        e = expf(v)
        return e / (1.0 + e)
    else:
        if v >= 0:
            return 1.0 / (1.0 + exp(-v))
        e = exp(v)
        return e / (1.0 + e)


cdef void _act_run(int act, const floating* x, floating* y, idx_t n) noexcept nogil:
    """y[i] = act(x[i]) for i < n (x may be y)."""
    cdef idx_t i
    cdef floating v
    if act == 1:
        for i in range(n):
            v = x[i]
            # ``v < 0`` is false for NaN, so NaN passes through as torch.relu lets it.
            y[i] = 0 if v < 0 else v
    elif act == 2:
        for i in range(n):
            y[i] = _sigmoid(x[i])
    elif act == 3:
        for i in range(n):
            if floating is float:
                y[i] = tanhf(x[i])
            else:
                y[i] = tanh(x[i])
    elif x != y:
        for i in range(n):
            y[i] = x[i]


cdef void _dact_run(int act, const floating* y, const floating* dy, floating* dz,
                    idx_t n) noexcept nogil:
    """dz[i] = dy[i] * act'(x[i]) written through the output y[i] = act(x[i])."""
    cdef idx_t i
    cdef floating v
    cdef floating g
    if act == 1:
        for i in range(n):
            # torch's threshold_backward: the gradient is cut only where y <= 0, so at a NaN
            # input (y = relu(NaN) = NaN) dy passes through, and NaN in dy stays out where
            # y <= 0.  Both loads unconditional, so the select compiles to a mask, not a
            # branch that mispredicts on every other element.
            g = dy[i]
            v = y[i]
            dz[i] = 0 if v <= 0 else g
    elif act == 2:
        for i in range(n):
            v = y[i]
            dz[i] = dy[i] * (v * (1 - v))
    elif act == 3:
        for i in range(n):
            v = y[i]
            dz[i] = dy[i] * (1 - v * v)
    elif dz != dy:
        for i in range(n):
            dz[i] = dy[i]


# Column sums: rows in blocks of ROW_BLOCK, columns in strips of at most STRIP; each block's
# strip is summed in the data's precision (vectorised adds, no conversions) and then added to
# float64 sums, so a float32 bias gradient over a large batch keeps its digits.
cdef enum:
    STRIP = 512
    ROW_BLOCK = 32


cdef void _dact_colsum_rows(int act, const floating* y, const floating* dy, floating* dz,
                            double* acc, idx_t r0, idx_t r1, idx_t cols) noexcept nogil:
    """Rows [r0, r1): dz = dy * act'(y), and acc[j] = sum over those rows of dz[:, j]."""
    cdef floating part[STRIP]
    cdef idx_t i, j, b0, b1, s0, sw, off, st, rb
    cdef idx_t n_strips = (cols + STRIP - 1) // STRIP
    cdef idx_t n_blocks = (r1 - r0 + ROW_BLOCK - 1) // ROW_BLOCK
    cdef const floating* src
    for j in range(cols):
        acc[j] = 0
    for rb in range(n_blocks):
        b0 = r0 + rb * ROW_BLOCK
        b1 = b0 + ROW_BLOCK
        if b1 > r1:
            b1 = r1
        for st in range(n_strips):
            s0 = st * STRIP
            sw = cols - s0
            if sw > STRIP:
                sw = STRIP
            for j in range(sw):
                part[j] = 0
            for i in range(b0, b1):
                off = i * cols + s0
                if act != 0:
                    _dact_run(act, y + off, dy + off, dz + off, sw)
                    src = dz + off
                else:
                    src = dy + off
                for j in range(sw):
                    part[j] += src[j]
            for j in range(sw):
                acc[s0 + j] += part[j]


cdef void _act_part(int act, const floating* x, const floating* dy, floating* out,
                    idx_t n) noexcept nogil:
    """out = act(x) when dy is NULL; else out = dy * act'(.) computed from the output x."""
    if dy == NULL:
        _act_run(act, x, out, n)
    else:
        _dact_run(act, x, dy, out, n)


cdef void _act_split(int act, const floating* x, const floating* dy, floating* out, idx_t n,
                     int nt) noexcept nogil:
    """_act_part over n elements on nt threads, each a contiguous share."""
    cdef idx_t chunk, t0, t1
    cdef int t
    if nt == 1:
        _act_part(act, x, dy, out, n)
        return
    chunk = mt_share(n, nt)
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        t0 = t * chunk
        t1 = mt_share_end(t0, chunk, n)
        if t0 < t1:
            _act_part(act, x + t0, NULL if dy == NULL else dy + t0, out + t0, t1 - t0)


def act_forward(const floating[::1] x, floating[::1] out, int act):
    """out = act(x) element-wise over flat C-contiguous arrays (out may be x)."""
    cdef idx_t n = x.shape[0]
    if out.shape[0] != n:
        raise ValueError(f"act_forward: sizes {n} and {out.shape[0]} differ")
    if n == 0:
        return
    cdef int nt = _threads_for(n)
    with nogil:
        _act_split(act, &x[0], <const floating*> NULL, &out[0], n, nt)


def act_backward(int act, const floating[::1] y, const floating[::1] dy, floating[::1] dz):
    """dz = dy * act'(x), with act'(x) computed from the output y; flat C-contiguous arrays."""
    cdef idx_t n = y.shape[0]
    if dy.shape[0] != n or dz.shape[0] != n:
        raise ValueError(f"act_backward: sizes {n}, {dy.shape[0]}, {dz.shape[0]} differ")
    if n == 0:
        return
    cdef int nt = _threads_for(n)
    with nogil:
        _act_split(act, &y[0], &dy[0], &dz[0], n, nt)


def act_backward_colsum(int act, const floating[:, ::1] y, const floating[:, ::1] dy,
                        floating[:, ::1] dz, floating[::1] db, double[::1] work,
                        bint accumulate):
    """One pass over a Linear layer's output gradient.

    dz = dy * act'(y) (not written when ``act`` is 0: dz is then dy) and the column sums of
    dz go to ``db`` (``db += sums`` when ``accumulate``, else ``db = sums``).  Threads take
    blocks of rows, each with its own float64 sums in ``work`` (``t * cols`` onwards; as
    many threads as ``work`` has room for), reduced at the end.
    """
    cdef idx_t rows = dy.shape[0], cols = dy.shape[1], j, per, r0, r1
    cdef int nt, t
    cdef double s
    if act != 0 and (y is None or dz is None or y.shape[0] != rows or y.shape[1] != cols
                     or dz.shape[0] != rows or dz.shape[1] != cols):
        raise ValueError("act_backward_colsum: y, dy and dz must have one shape")
    if db.shape[0] != cols or work.shape[0] < cols:
        raise ValueError("act_backward_colsum: db and work must have one element per column")
    if cols == 0:
        return
    cdef const floating* py = &y[0, 0] if (act != 0 and rows) else NULL
    cdef const floating* pdy = &dy[0, 0] if rows else NULL
    cdef floating* pdz = &dz[0, 0] if (act != 0 and rows) else NULL
    cdef double* acc = &work[0]
    cdef floating* pdb = &db[0]
    nt = _threads_for(rows * cols)
    if nt > work.shape[0] // cols:
        nt = <int> (work.shape[0] // cols)
    # At least a block of rows per thread.
    while nt > 1 and rows < nt * ROW_BLOCK:
        nt -= 1
    per = (rows + nt - 1) // nt if nt > 0 else 0
    if nt <= 1:
        nt = 1
        with nogil:
            _dact_colsum_rows(act, py, pdy, pdz, acc, 0, rows, cols)
    else:
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1, nogil=True):
            r0 = t * per
            r1 = r0 + per
            if r1 > rows:
                r1 = rows
            if r0 > rows:
                r0 = rows
            _dact_colsum_rows(act, py, pdy, pdz, acc + t * cols, r0, r1, cols)
    with nogil:
        for j in range(cols):
            s = 0
            for t in range(nt):
                s = s + acc[t * cols + j]
            if accumulate:
                pdb[j] = <floating> (pdb[j] + s)
            else:
                pdb[j] = <floating> s


def colsum_work_size(idx_t cols):
    """Length of the ``work`` array ``act_backward_colsum`` needs for all threads."""
    cdef gemm_params prm
    current_params(0, &prm)
    return cols * (prm.n_threads if prm.n_threads > 1 else 1)


# -- dropout ---------------------------------------------------------------------------------

cdef void _dropout_part(const floating* x, const floating* u, floating* out, floating p,
                        floating scale, idx_t n) noexcept nogil:
    """out = x * (scale where u >= p, else 0): a product, not a select, so NaN and Inf in
    a dropped element propagate as torch's ``input * mask`` lets them."""
    cdef idx_t i
    for i in range(n):
        out[i] = x[i] * (scale if u[i] >= p else 0)


def dropout_apply(const floating[::1] x, const floating[::1] u, floating[::1] out, double p,
                  double scale):
    """out = x * mask * scale with mask = (u >= p), over flat C-contiguous arrays.

    ``u`` holds uniform [0, 1) draws, so each element is dropped with probability p; the
    same ``u`` applied to the output gradient gives the input gradient.  ``out`` may be x.
    """
    cdef idx_t n = x.shape[0], chunk, t0, t1
    cdef int nt, t
    if u.shape[0] != n or out.shape[0] != n:
        raise ValueError(f"dropout_apply: sizes {n}, {u.shape[0]}, {out.shape[0]} differ")
    if n == 0:
        return
    nt = _threads_for(n)
    cdef const floating* px = &x[0]
    cdef const floating* pu = &u[0]
    cdef floating* po = &out[0]
    cdef floating fp = <floating> p, fs = <floating> scale
    if nt == 1:
        with nogil:
            _dropout_part(px, pu, po, fp, fs, n)
        return
    chunk = mt_share(n, nt)
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1, nogil=True):
        t0 = t * chunk
        t1 = mt_share_end(t0, chunk, n)
        if t0 < t1:
            _dropout_part(px + t0, pu + t0, po + t0, fp, fs, t1 - t0)
