"""Element-wise kernels of the neural-network layers: activations, their derivatives, bias.

Activation codes: 0 identity, 1 ReLU, 2 sigmoid, 3 tanh.  Every derivative is written in
terms of the activation's *output* y (ReLU: 0 where y <= 0, else 1, so 1 at NaN as in
torch; sigmoid: y(1 - y); tanh: 1 - y^2), so a layer that applied the activation in its own
write-back (a fused Linear + ReLU) needs to keep only the output for its backward pass.

These are private helpers of ``microtile.nn``: the callers own the buffers (C-contiguous, one
dtype), so the wrappers only check what the memoryview types do not.  Loops are cut into
contiguous shares, items on the thread pool, and the inner loops are plain pointer loops so
that the compiler vectorises them; the activation is chosen outside the loops for the same reason.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.math cimport erf, exp, log, M_SQRT1_2, M_2_SQRTPI, sqrt, tanh

from microtile._common._mt_pool cimport pool_items, pool_ranges
from microtile._common._typedefs cimport idx_t, floating
from microtile.nn._act_math cimport sigmoid as _sigmoid, tanh_ as _tanh
from microtile.linalg._gemm cimport gemm_params
from microtile._config._params cimport current_params
from microtile.nn._act_loops cimport (act_loop_f, pw_loop_f, act_table_t, PW_LEAKY, PW_GELU,
                                      PW_GELU_TANH, PW_SILU, MT_DROP_BLOCK, drop_bits,
                                      drop_forward_f, drop_forward_d, drop_apply_f,
                                      drop_apply_d)

import numpy as np


# One job description for every kernel here, so that one range function runs any of them
# on the pool.
cdef enum:
    EW_ACT = 0
    EW_COLSUM = 1
    EW_DROPOUT = 2
    EW_POINTWISE = 3
    EW_SOFTMAX = 4
    EW_DROPOUT_FWD = 5

ctypedef struct _ew:
    int kind
    int code            # activation or pointwise code
    bint dbl
    bint flag           # softmax: logarithm
    double p0, p1       # dropout scale (p1); pointwise alpha (p0)
    const void* x
    const void* u       # dy, or dropout's mask (uint8)
    void* out
    uint8_t* keep       # dropout forward: the mask it writes
    uint64_t key        # dropout forward: the draw's key and keep threshold
    uint64_t thr
    double* acc         # column sums per share (colsum)
    const act_table_t* tab  # the float32 loops for the ISA in use
    idx_t length, inner, rows


# Below this many elements a second thread costs more than it saves (a pass over ~256 KiB).
cdef idx_t PAR_MIN = 1 << 15


cdef inline int _threads_for(idx_t n) except -1:
    cdef gemm_params prm
    if n < PAR_MIN:
        return 1
    current_params(0, &prm)
    return prm.n_threads if prm.n_threads > 1 else 1


# The float32 loops (``_act_loops``) per kernel-set id: 0 compiled here for the baseline ISA,
# 1 from ``_act_avx2`` when the CPU has AVX2 and FMA.  The id in use is the GEMM's
# (``MICROTILE_ISA=generic`` and ``config_context`` choose it), read on every call.
cdef void _act_base(int act, const float* x, const float* dy, float* out,
                    idx_t n) noexcept nogil:
    act_loop_f(act, x, dy, out, n)


cdef void _pw_base(int code, float alpha, const float* x, const float* dy, float* out,
                   idx_t n) noexcept nogil:
    pw_loop_f(code, alpha, x, dy, out, n)


cdef act_table_t _tables[2]
_tables[0].act = _act_base
_tables[0].pw = _pw_base
_tables[0].drop_f = drop_forward_f
_tables[0].drop_d = drop_forward_d
_tables[1] = _tables[0]


def _load_avx2():
    from microtile._kernels._dispatch import available_isas
    if "avx2-fma" not in available_isas():
        return
    from microtile.nn import _act_avx2
    _tables[1] = (<act_table_t*> PyCapsule_GetPointer(_act_avx2.table(),
                                                      b"microtile.act_f32"))[0]


_load_avx2()


cdef const act_table_t* _table() except NULL:
    cdef gemm_params prm
    current_params(0, &prm)
    return &_tables[1] if prm.isa == 1 else &_tables[0]


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
            y[i] = _tanh(x[i])
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


cdef void _act_part(const act_table_t* tab, int act, const floating* x, const floating* dy,
                    floating* out, idx_t n) noexcept nogil:
    """out = act(x) when dy is NULL; else out = dy * act'(.) computed from the output x."""
    if floating is float:
        tab.act(act, x, dy, out, n)
    elif dy == NULL:
        _act_run(act, x, out, n)
    else:
        _dact_run(act, x, dy, out, n)


cdef void _act_split(const act_table_t* tab, int act, const floating* x, const floating* dy,
                     floating* out, idx_t n, int nt) noexcept nogil:
    """_act_part over n elements on nt threads, each share of the elements an item."""
    cdef _ew job
    if nt == 1:
        _act_part(tab, act, x, dy, out, n)
        return
    job.tab = tab
    job.kind = EW_ACT
    job.code = act
    job.dbl = floating is double
    job.x = x
    job.u = dy
    job.out = out
    pool_ranges(nt, n, 4 * nt, 16, _ew_range, &job)


def act_forward(const floating[::1] x, floating[::1] out, int act):
    """out = act(x) element-wise over flat C-contiguous arrays (out may be x)."""
    cdef idx_t n = x.shape[0]
    if out.shape[0] != n:
        raise ValueError(f"act_forward: sizes {n} and {out.shape[0]} differ")
    if n == 0:
        return
    cdef int nt = _threads_for(n)
    cdef const act_table_t* tab = _table()
    with nogil:
        _act_split(tab, act, &x[0], <const floating*> NULL, &out[0], n, nt)


def act_backward(int act, const floating[::1] y, const floating[::1] dy, floating[::1] dz):
    """dz = dy * act'(x), with act'(x) computed from the output y; flat C-contiguous arrays."""
    cdef idx_t n = y.shape[0]
    if dy.shape[0] != n or dz.shape[0] != n:
        raise ValueError(f"act_backward: sizes {n}, {dy.shape[0]}, {dz.shape[0]} differ")
    if n == 0:
        return
    cdef int nt = _threads_for(n)
    cdef const act_table_t* tab = _table()
    with nogil:
        _act_split(tab, act, &y[0], &dy[0], &dz[0], n, nt)


def act_backward_colsum(int act, const floating[:, ::1] y, const floating[:, ::1] dy,
                        floating[:, ::1] dz, floating[::1] db, double[::1] work,
                        bint accumulate):
    """One pass over a Linear layer's output gradient.

    dz = dy * act'(y) (not written when ``act`` is 0: dz is then dy) and the column sums of
    dz go to ``db`` (``db += sums`` when ``accumulate``, else ``db = sums``).  Threads take
    blocks of rows, each with its own float64 sums in ``work`` (``t * cols`` onwards; as
    many threads as ``work`` has room for), reduced at the end.
    """
    cdef idx_t rows = dy.shape[0], cols = dy.shape[1], j, per
    cdef int nt, t
    cdef double s
    cdef _ew job
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
        job.kind = EW_COLSUM
        job.code = act
        job.dbl = floating is double
        job.x = py
        job.u = pdy
        job.out = pdz
        job.acc = acc
        job.length = per
        job.inner = cols
        job.rows = rows
        with nogil:
            pool_items(nt, nt, _ew_item, &job)
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

def dropout_threshold(double p):
    """What an element's uint32 draw must reach to be kept, round(p 2^32): P(drop) = p within
    2^-33; 2^32 (a p within 2^-33 of 1) keeps none."""
    return <uint64_t> (p * 4294967296.0 + 0.5)


def dropout_forward(const floating[::1] x, floating[::1] out, uint8_t[::1] keep,
                    uint64_t key, uint64_t threshold, double scale):
    """out = x * (scale where kept, else 0) and keep = 1 where kept, over flat C-contiguous
    arrays; element i is kept when its draw (``dropout_bits(key, n)[i]``) is at least
    ``threshold`` (see ``dropout_threshold``).  A product, not a select, so NaN and Inf in
    a dropped element propagate as torch's ``input * mask`` lets them.  ``out`` may be x.
    The result depends only on the key, not on the threads."""
    cdef idx_t n = x.shape[0]
    cdef int nt
    cdef _ew job
    if out.shape[0] != n or keep.shape[0] != n:
        raise ValueError(f"dropout_forward: sizes {n}, {out.shape[0]}, {keep.shape[0]} differ")
    if n == 0:
        return
    job.kind = EW_DROPOUT_FWD
    job.dbl = floating is double
    job.tab = _table()
    job.x = &x[0]
    job.out = &out[0]
    job.keep = &keep[0]
    job.key = key
    job.thr = threshold
    job.p1 = scale
    nt = _threads_for(n)
    with nogil:
        # Shares of whole blocks: each starts its own generators.
        pool_ranges(nt, n, 4 * nt, MT_DROP_BLOCK, _ew_range, &job)


def dropout_backward(const floating[::1] g, const uint8_t[::1] keep, floating[::1] out,
                     double scale):
    """out = g * (scale where keep, else 0), over flat C-contiguous arrays; ``out`` may be g."""
    cdef idx_t n = g.shape[0]
    cdef int nt
    cdef _ew job
    if keep.shape[0] != n or out.shape[0] != n:
        raise ValueError(f"dropout_backward: sizes {n}, {keep.shape[0]}, {out.shape[0]} "
                         "differ")
    if n == 0:
        return
    job.kind = EW_DROPOUT
    job.dbl = floating is double
    job.x = &g[0]
    job.u = &keep[0]
    job.out = &out[0]
    job.p1 = scale
    nt = _threads_for(n)
    with nogil:
        pool_ranges(nt, n, 4 * nt, 16, _ew_range, &job)


def dropout_bits(uint64_t key, idx_t n):
    """The n uint32 draws a mask with this key compares with its threshold (for tests)."""
    out = np.empty(max(n, 0), np.uint32)
    cdef uint32_t[::1] r = out
    if n > 0:
        with nogil:
            drop_bits(key, 0, n, &r[0])
    return out


# -- activations whose derivative needs the input -------------------------------------------
# LeakyReLU (its slope may be negative, so the output's sign does not say which side the
# input was on), GELU and SiLU: the layers keep their input for the backward pass, and
# these are not folded into a Linear's or Conv2d's write-back (whose backward has only the
# output).  The formulas are torch's, in the data's precision, so the values (and the NaN
# torch gives at gelu(-inf), say) are the same.

POINTWISE = {"leaky_relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

cdef void _pw_part(const act_table_t* tab, int code, floating alpha, const floating* x,
                   const floating* dy, floating* out, idx_t n) noexcept nogil:
    """out = f(x) when dy is NULL, else out = dy * f'(x) (f chosen by ``code``): float32 on
    the loops of ``_act_loops`` for the ISA in use, float64 here on libm."""
    if floating is float:
        tab.pw(code, alpha, x, dy, out, n)
    else:
        _pw_double(code, alpha, x, dy, out, n)


cdef void _pw_double(int code, double alpha, const double* x, const double* dy,
                     double* out, idx_t n) noexcept nogil:
    cdef idx_t i
    cdef double v, t, inner, cdf
    # sqrt(2 / pi), and 1 / sqrt(2 pi) (torch's kBeta and kAlpha), and tanh-GELU's kappa.
    cdef double beta = sqrt(2.0) * M_2_SQRTPI * 0.5
    cdef double inv_sqrt_2pi = M_2_SQRTPI * M_SQRT1_2 * 0.5
    cdef double kappa = 0.044715
    cdef double half = 0.5
    cdef double r2 = M_SQRT1_2
    if code == PW_LEAKY:
        if dy == NULL:
            for i in range(n):
                v = x[i]
                out[i] = v if v > 0 else v * alpha
        else:
            for i in range(n):
                out[i] = dy[i] if x[i] > 0 else dy[i] * alpha
    elif code == PW_GELU:
        if dy == NULL:
            for i in range(n):
                v = x[i]
                out[i] = v * half * (1 + erf(v * r2))
        else:
            for i in range(n):
                v = x[i]
                cdf = half * (1 + erf(v * r2))
                out[i] = dy[i] * (cdf + v * inv_sqrt_2pi * exp(-half * v * v))
    elif code == PW_GELU_TANH:
        if dy == NULL:
            for i in range(n):
                v = x[i]
                inner = beta * (v + kappa * v * v * v)
                out[i] = half * v * (1 + tanh(inner))
        else:
            for i in range(n):
                v = x[i]
                t = tanh(beta * (v + kappa * v * v * v))
                out[i] = dy[i] * (half * (1 + t)
                                  + half * v * (1 - t * t) * beta * (1 + 3 * kappa * v * v))
    elif code == PW_SILU:
        if dy == NULL:
            for i in range(n):
                v = x[i]
                out[i] = v / (1 + exp(-v))
        else:
            for i in range(n):
                v = x[i]
                t = 1 / (1 + exp(-v))
                out[i] = dy[i] * t * (1 + v * (1 - t))


def pointwise(int code, double alpha, const floating[::1] x, const floating[::1] dy,
              floating[::1] out):
    """out = f(x) (``dy`` None) or out = dy * f'(x), f = POINTWISE[name]; ``alpha`` is
    LeakyReLU's slope.  Flat C-contiguous arrays; out may be x (forward) or dy."""
    cdef idx_t n = x.shape[0]
    cdef int nt
    cdef _ew job
    if out.shape[0] != n or (dy is not None and dy.shape[0] != n):
        raise ValueError("pointwise: sizes differ")
    if code < PW_LEAKY or code > PW_SILU:
        raise ValueError(f"pointwise: unknown code {code}")
    if n == 0:
        return
    nt = _threads_for(n)
    cdef const floating* px = &x[0]
    cdef const floating* pdy = &dy[0] if dy is not None else NULL
    cdef floating* po = &out[0]
    cdef floating a = <floating> alpha
    cdef const act_table_t* tab = _table()
    if nt == 1:
        with nogil:
            _pw_part(tab, code, a, px, pdy, po, n)
        return
    job.tab = tab
    job.kind = EW_POINTWISE
    job.code = code
    job.dbl = floating is double
    job.x = px
    job.u = pdy
    job.out = po
    job.p0 = alpha
    with nogil:
        pool_ranges(nt, n, 4 * nt, 16, _ew_range, &job)


# -- softmax and log-softmax along one axis ---------------------------------------------------
# The array is viewed as (outer, length, inner): each of the outer*inner lines has
# ``length`` elements ``inner`` apart.  Per line: the maximum first (so exp never
# overflows), then the sum of exp(x - max) in float64.

cdef void _softmax_lines(const floating* x, floating* y, idx_t l0, idx_t l1, idx_t length,
                         idx_t inner, bint logarithm) noexcept nogil:
    cdef idx_t line, j, base
    cdef double m, s, lse
    cdef floating v
    for line in range(l0, l1):
        base = (line // inner) * length * inner + line % inner
        m = x[base]
        for j in range(1, length):
            v = x[base + j * inner]
            if v > m:       # NaN never wins; a NaN first element makes m NaN: all NaN
                m = v
        s = 0
        for j in range(length):
            s += exp(x[base + j * inner] - m)
        if logarithm:
            # (x - max) - log(s), as torch: x - (max + log(s)) would lose log(s) next to a
            # huge max (-1e308 + 1.1 == -1e308).
            lse = log(s)
            for j in range(length):
                y[base + j * inner] = <floating> ((x[base + j * inner] - m) - lse)
        else:
            s = 1 / s
            for j in range(length):
                y[base + j * inner] = <floating> (exp(x[base + j * inner] - m) * s)


cdef void _softmax_back_lines(const floating* y, const floating* dy, floating* dx, idx_t l0,
                              idx_t l1, idx_t length, idx_t inner,
                              bint logarithm) noexcept nogil:
    """softmax: dx = y * (dy - sum(dy * y)); log-softmax: dx = dy - exp(y) * sum(dy)."""
    cdef idx_t line, j, base, k
    cdef double s
    for line in range(l0, l1):
        base = (line // inner) * length * inner + line % inner
        s = 0
        if logarithm:
            for j in range(length):
                s += dy[base + j * inner]
            for j in range(length):
                k = base + j * inner
                dx[k] = <floating> (dy[k] - exp(<double> y[k]) * s)
        else:
            for j in range(length):
                k = base + j * inner
                s += <double> dy[k] * y[k]
            for j in range(length):
                k = base + j * inner
                dx[k] = <floating> (y[k] * (dy[k] - s))


def softmax(const floating[::1] x, const floating[::1] dy, floating[::1] out, idx_t outer,
            idx_t length, idx_t inner, bint logarithm):
    """Forward (``dy`` None: out = softmax or log-softmax of x) or backward (x is then the
    forward's output y, out = dx) along the middle axis of x viewed as (outer, length,
    inner); flat C-contiguous arrays."""
    cdef idx_t n = x.shape[0], lines = outer * inner
    cdef int nt
    cdef _ew job
    if (outer < 0 or length < 0 or inner < 0 or outer * length * inner != n
            or out.shape[0] != n or (dy is not None and dy.shape[0] != n)):
        raise ValueError("softmax: inconsistent sizes")
    if n == 0:
        return
    nt = _threads_for(n)
    if nt > lines:
        nt = <int> lines
    cdef const floating* px = &x[0]
    cdef const floating* pdy = &dy[0] if dy is not None else NULL
    cdef floating* po = &out[0]
    if nt <= 1:
        with nogil:
            if pdy == NULL:
                _softmax_lines(px, po, 0, lines, length, inner, logarithm)
            else:
                _softmax_back_lines(px, pdy, po, 0, lines, length, inner, logarithm)
        return
    job.kind = EW_SOFTMAX
    job.dbl = floating is double
    job.x = px
    job.u = pdy
    job.out = po
    job.length = length
    job.inner = inner
    job.flag = logarithm
    with nogil:
        pool_ranges(nt, lines, 4 * nt, 1, _ew_range, &job)


# -- the pool's entry points ------------------------------------------------------------------

cdef void _ew_run(const _ew* j, idx_t i0, idx_t i1, const floating* x, const floating* u,
                  floating* out) noexcept nogil:
    if j.kind == EW_ACT:
        _act_part(j.tab, j.code, x + i0, NULL if u == NULL else u + i0, out + i0, i1 - i0)
    elif j.kind == EW_DROPOUT:
        if floating is float:
            drop_apply_f(x + i0, <const uint8_t*> j.u + i0, out + i0, i1 - i0, <float> j.p1)
        else:
            drop_apply_d(x + i0, <const uint8_t*> j.u + i0, out + i0, i1 - i0, j.p1)
    elif j.kind == EW_DROPOUT_FWD:
        if floating is float:
            j.tab.drop_f(x, out, j.keep, i0, i1, j.key, j.thr, <float> j.p1)
        else:
            j.tab.drop_d(x, out, j.keep, i0, i1, j.key, j.thr, j.p1)
    elif j.kind == EW_POINTWISE:
        _pw_part(j.tab, j.code, <floating> j.p0, x + i0, NULL if u == NULL else u + i0, out + i0,
                 i1 - i0)
    elif j.kind == EW_SOFTMAX:
        if u == NULL:
            _softmax_lines(x, out, i0, i1, j.length, j.inner, j.flag)
        else:
            _softmax_back_lines(x, u, out, i0, i1, j.length, j.inner, j.flag)


cdef void _ew_range(void* ctx, idx_t i0, idx_t i1, int tid) noexcept nogil:
    cdef const _ew* j = <const _ew*> ctx
    if j.dbl:
        _ew_run(j, i0, i1, <const double*> j.x, <const double*> j.u, <double*> j.out)
    else:
        _ew_run(j, i0, i1, <const float*> j.x, <const float*> j.u, <float*> j.out)


cdef void _ew_item(void* ctx, idx_t t, int tid) noexcept nogil:
    """Share t of the rows (length rows each) of act_backward_colsum, its sums at acc + t·cols."""
    cdef const _ew* j = <const _ew*> ctx
    cdef idx_t r0 = t * j.length, r1 = r0 + j.length
    if r1 > j.rows:
        r1 = j.rows
    if r0 > j.rows:
        r0 = j.rows
    if j.dbl:
        _dact_colsum_rows(j.code, <const double*> j.x, <const double*> j.u, <double*> j.out,
                          j.acc + t * j.inner, r0, r1, j.inner)
    else:
        _dact_colsum_rows(j.code, <const float*> j.x, <const float*> j.u, <float*> j.out,
                          j.acc + t * j.inner, r0, r1, j.inner)
