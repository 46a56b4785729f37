"""Public linear-algebra entry points: validate with the GIL, then run the nogil drivers.

The validation stays in Cython rather than in a ``.py`` front door (the style of ``conv``
and ``nn``) because these calls are often tiny: a whole 4x4 ``gemm`` takes 1.0 us here
(NumPy's ``dot`` 0.9 us), while the same checks written in Python alone take 1.8 us
(measured on the 2-core Zen3, median of five runs of 200,000 calls).
"""
import numpy as np
cimport numpy as cnp

from libc.stdint cimport int64_t

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport elem_stride
from microtile._common._mt_pool cimport pool_ranges
from microtile._common._atomic64 cimport mt_atomic_add64
from microtile._common._interrupt cimport (signal_poll, caller_poll, open_poll, close_poll,
                                           raise_for_rc, poll_step, stop_before, interrupted,
                                           INTERRUPTED)
from microtile.linalg._gemm cimport (gemm_params, gemm_run, gemm_run_ep, gemm_serial, gemm_epilogue,
                              ACT_NONE, ACT_RELU, ACT_SIGMOID, ACT_TANH)
from microtile.linalg._level2 cimport dot_run, gemv_run, ger_run, outer_run
from microtile._kernels._ukernel cimport kernel_set_t
from microtile._config._schema import ACTIVATIONS
from microtile._kernels._dispatch cimport kernel_set
from microtile._config._params cimport current_params
from microtile._common._checks cimport (as_float_array, result_dtype, as_dtype, check_out,
                                        native_dtype, out_target, overlaps,
                                        real_scalar)

cnp.import_array()

cdef object F32 = np.dtype(np.float32)
cdef object F64 = np.dtype(np.float64)


cdef inline bint same_view(cnp.ndarray x, cnp.ndarray y):
    cdef object ox = x, oy = y
    return (x is y or (cnp.PyArray_DATA(x) == cnp.PyArray_DATA(y) and ox.shape == oy.shape
                       and ox.strides == oy.strides and x.dtype == y.dtype))


cdef int run_gemm(cnp.ndarray A, bint ta, cnp.ndarray B, bint tb, double alpha, double beta,
                  cnp.ndarray O) except -1:
    """O = alpha * op(A) @ op(B) + beta * O for 2-D arrays of O's dtype (O written in place)."""
    cdef idx_t m = O.shape[0], n = O.shape[1]
    cdef idx_t k = A.shape[0] if ta else A.shape[1]
    cdef idx_t rs_a = elem_stride(A, 1 if ta else 0), cs_a = elem_stride(A, 0 if ta else 1)
    cdef idx_t rs_b = elem_stride(B, 1 if tb else 0), cs_b = elem_stride(B, 0 if tb else 1)
    cdef idx_t rs_c = elem_stride(O, 0), cs_c = elem_stride(O, 1)
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc
    cdef void* pa = cnp.PyArray_DATA(A)
    cdef void* pb = cnp.PyArray_DATA(B)
    cdef void* pc = cnp.PyArray_DATA(O)
    cdef float af = <float> alpha, bf = <float> beta
    if O.dtype is F32:
        current_params(0, &prm)
        open_poll(&poll)
        with nogil:
            rc = gemm_run(&prm, m, n, k, af, <const float*> pa, rs_a, cs_a,
                          <const float*> pb, rs_b, cs_b, bf, <float*> pc, rs_c, cs_c)
            close_poll()
    else:
        current_params(1, &prm)
        open_poll(&poll)
        with nogil:
            rc = gemm_run(&prm, m, n, k, alpha, <const double*> pa, rs_a, cs_a,
                          <const double*> pb, rs_b, cs_b, beta, <double*> pc, rs_c, cs_c)
            close_poll()
    return raise_for_rc(rc, &poll, "gemm")



cdef inline bint _weak(object v):
    return type(v) is float or type(v) is int


cdef cnp.ndarray _accumulator(str func, object out, tuple shape, object dt, tuple inputs,
                              cnp.ndarray c, str c_name, double beta):
    """The array C = alpha * product + beta * c is written to: ``out`` (validated; it may be
    ``c`` itself for an in-place update, but may not otherwise overlap an input) or a new one,
    holding a copy of ``c`` when beta != 0.  For a byte-swapped or misaligned ``out`` it is a
    native array instead, which ``_deliver`` copies into ``out`` afterwards."""
    cdef cnp.ndarray O, T
    cdef bint in_place = False
    if out is None:
        O = np.empty(shape, dtype=dt)
    else:
        O = check_out(out, shape, dt)
        for x in inputs:
            if overlaps(O, x):
                raise ValueError(f"{func}: out overlaps an input")
        if c is not None and overlaps(O, c):
            if not same_view(O, c):
                raise ValueError(f"{func}: out overlaps {c_name} without being {c_name}")
            in_place = True
    T = out_target(O)
    if beta != 0 and (not in_place or T is not O):
        np.copyto(T, c, casting="unsafe")
    return T


cdef inline object _deliver(object out, cnp.ndarray T):
    """The caller's ``out`` holding the result computed in ``T`` (``T`` itself when no
    ``out`` was given or the kernels wrote ``out`` directly)."""
    if out is None or T is out:
        return T
    np.copyto(out, T)
    return out


def gemm(a, b, *, alpha=1.0, beta=0.0, c=None, trans_a=False, trans_b=False, out=None):
    """General matrix multiply: ``alpha * op(a) @ op(b) + beta * c``.

    Parameters
    ----------
    a, b : array_like, 2-D, float32 or float64
        ``op(a)`` is (m, k) and ``op(b)`` is (k, n); any memory layout.
    alpha, beta : float
        Scale factors, with BLAS's rules for zeros: with ``alpha == 0`` the product is not
        formed and ``a`` and ``b`` are not read, so a NaN or Inf in them does not reach the
        result (which is ``beta * c``, or zeros); with ``beta == 0``, ``c`` is not read (NaN
        in it does not leak).  NumPy's ``0 * (a @ b)`` would propagate them.
    c : array_like, optional
        Broadcastable to (m, n); required when ``beta != 0``.
    trans_a, trans_b : bool
        Use ``a.T`` / ``b.T`` (no copy is made).
    out : ndarray, optional
        (m, n) array of the result dtype to write to.  May be ``c`` itself (in-place update);
        may not otherwise overlap an input.

    Returns
    -------
    ndarray
        (m, n), float64 if any input is float64, else float32.

    Raises
    ------
    TypeError
        For a dtype other than float32/float64 (or a wrong ``out`` dtype).
    ValueError
        For mismatched shapes, a missing ``c``, a read-only or overlapping ``out``.
    """
    cdef cnp.ndarray A = as_float_array(a, "a")
    cdef cnp.ndarray B = as_float_array(b, "b")
    cdef cnp.ndarray C = None
    cdef cnp.ndarray O
    cdef double alpha_f = real_scalar(alpha, "alpha"), beta_f = real_scalar(beta, "beta")
    cdef bint ta = bool(trans_a), tb = bool(trans_b)
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"gemm: a and b must be 2-D, got shapes {np.shape(A)} and {np.shape(B)}")
    if c is not None:
        # A Python number is a weak scalar, as in NumPy: it takes the operands' dtype.
        C = as_float_array(np.asarray(c, dtype=result_dtype((A, B))) if _weak(c) else c, "c")
    elif beta_f != 0:
        raise ValueError("gemm: c is required when beta != 0")
    m, k = (A.shape[1], A.shape[0]) if ta else (A.shape[0], A.shape[1])
    k2, n = (B.shape[1], B.shape[0]) if tb else (B.shape[0], B.shape[1])
    if k != k2:
        raise ValueError(f"gemm: op(a) has shape {(m, k)} and op(b) has shape {(k2, n)}: "
                         f"inner dimensions {k} and {k2} differ")
    dt = result_dtype((A, B, C))
    shape = (m, n)
    if C is not None and np.shape(C) != shape:
        try:
            C = np.broadcast_to(C, shape)
        except ValueError:
            raise ValueError(f"gemm: c has shape {np.shape(C)}, which does not broadcast to the "
                             f"result's shape {shape}") from None
    O = _accumulator("gemm", out, shape, dt, (A, B), C, "c", beta_f)
    A = as_dtype(A, dt)
    B = as_dtype(B, dt)
    run_gemm(A, ta, B, tb, alpha_f, beta_f, O)
    return _deliver(out, O)


cdef inline int _code(cnp.ndarray x):
    return 0 if x.dtype is F32 else 1


cdef const kernel_set_t* _kernels(int code, gemm_params* prm) except NULL:
    current_params(code, prm)
    return kernel_set(prm.isa)


cdef cnp.ndarray _vector(object x, str name, str func):
    cdef cnp.ndarray v = as_float_array(x, name)
    if v.ndim != 1:
        raise ValueError(f"{func}: {name} must be 1-D, got shape {np.shape(v)}")
    return v


def dot(x, y):
    """Inner product of two 1-D vectors of equal length.

    Parameters
    ----------
    x, y : array_like, 1-D, float32 or float64
        Any stride, negative included.

    Returns
    -------
    float
        Computed in float64 if either input is float64, else in float32.
    """
    cdef cnp.ndarray X = _vector(x, "x", "dot"), Y = _vector(y, "y", "dot")
    cdef gemm_params prm
    cdef const kernel_set_t* ks
    cdef idx_t n = X.shape[0], ix, iy
    cdef float rs
    cdef double rd
    if Y.shape[0] != n:
        raise ValueError(f"dot: x has shape {np.shape(X)} and y has shape {np.shape(Y)}; "
                         "lengths differ")
    dt = result_dtype((X, Y))
    X = as_dtype(X, dt)
    Y = as_dtype(Y, dt)
    ix = elem_stride(X, 0)
    iy = elem_stride(Y, 0)
    ks = _kernels(_code(X), &prm)
    if dt is F32:
        with nogil:
            rs = dot_run(ks, n, <const float*> cnp.PyArray_DATA(X), ix,
                         <const float*> cnp.PyArray_DATA(Y), iy)
        return float(rs)
    with nogil:
        rd = dot_run(ks, n, <const double*> cnp.PyArray_DATA(X), ix,
                     <const double*> cnp.PyArray_DATA(Y), iy)
    return float(rd)


def gemv(a, x, *, alpha=1.0, beta=0.0, y=None, trans=False, out=None):
    """Matrix-vector product: ``alpha * op(a) @ x + beta * y``.

    Parameters
    ----------
    a : array_like, 2-D
        ``op(a)`` is (m, n): ``a.T`` when ``trans``.
    x : array_like, 1-D, length n
    alpha, beta : float
        BLAS's rules for zeros: with ``alpha == 0``, ``a`` and ``x`` are not read (a NaN or
        Inf in them does not reach the result, ``beta * y`` or zeros); with ``beta == 0``,
        ``y`` is not read.
    y : array_like, 1-D, length m, optional
        Required when ``beta != 0``.
    trans : bool
    out : ndarray, optional
        (m,) array of the result dtype; may be ``y`` itself.

    Returns
    -------
    ndarray, shape (m,)
    """
    cdef cnp.ndarray A = as_float_array(a, "a"), X = _vector(x, "x", "gemv")
    cdef cnp.ndarray Y = None, O
    cdef double alpha_f = real_scalar(alpha, "alpha"), beta_f = real_scalar(beta, "beta")
    cdef bint ta = bool(trans)
    cdef gemm_params prm
    cdef const kernel_set_t* ks
    cdef idx_t m, n, rs_a, cs_a, incx, incy
    cdef int rc
    cdef void* pa
    cdef void* px
    cdef void* po
    cdef float af = <float> alpha_f, bf = <float> beta_f
    if A.ndim != 2:
        raise ValueError(f"gemv: a must be 2-D, got shape {np.shape(A)}")
    m, n = (A.shape[1], A.shape[0]) if ta else (A.shape[0], A.shape[1])
    if X.shape[0] != n:
        raise ValueError(f"gemv: op(a) has shape {(m, n)} and x has shape {np.shape(X)}; "
                         f"expected x of length {n}")
    if y is not None:
        if _weak(y):
            y = np.full(m, y, dtype=result_dtype((A, X)))
        Y = _vector(y, "y", "gemv")
        if Y.shape[0] != m:
            raise ValueError(f"gemv: y has shape {np.shape(Y)}; expected ({m},)")
    elif beta_f != 0:
        raise ValueError("gemv: y is required when beta != 0")
    dt = result_dtype((A, X, Y))
    O = _accumulator("gemv", out, (m,), dt, (A, X), Y, "y", beta_f)
    A = as_dtype(A, dt)
    X = as_dtype(X, dt)
    rs_a = elem_stride(A, 1 if ta else 0)
    cs_a = elem_stride(A, 0 if ta else 1)
    incx = elem_stride(X, 0)
    incy = elem_stride(O, 0)
    pa = cnp.PyArray_DATA(A)
    px = cnp.PyArray_DATA(X)
    po = cnp.PyArray_DATA(O)
    ks = _kernels(_code(O), &prm)
    if dt is F32:
        with nogil:
            rc = gemv_run(ks, prm.n_threads, m, n, af, <const float*> pa, rs_a, cs_a,
                          <const float*> px, incx, bf, <float*> po, incy)
    else:
        with nogil:
            rc = gemv_run(ks, prm.n_threads, m, n, alpha_f, <const double*> pa, rs_a, cs_a,
                          <const double*> px, incx, beta_f, <double*> po, incy)
    if rc != 0:
        raise MemoryError("microtile: out of memory in gemv")
    return _deliver(out, O)


def outer(x, y, out=None):
    """Outer product ``x[:, None] * y[None, :]`` (inputs are flattened, as in numpy.outer).

    Parameters
    ----------
    x : array_like, length m
    y : array_like, length n
    out : ndarray, optional
        (m, n) array of the result dtype.

    Returns
    -------
    ndarray, shape (m, n)
    """
    cdef cnp.ndarray X = as_float_array(x, "x"), Y = as_float_array(y, "y"), O, T
    cdef gemm_params prm
    cdef const kernel_set_t* ks
    cdef idx_t m, n, ix, iy, rs, cs
    cdef int rc
    X = X.reshape(-1) if X.ndim != 1 else X
    Y = Y.reshape(-1) if Y.ndim != 1 else Y
    m = X.shape[0]
    n = Y.shape[0]
    dt = result_dtype((X, Y))
    if out is None:
        O = np.empty((m, n), dtype=dt)
    else:
        O = check_out(out, (m, n), dt)
        if overlaps(O, X) or overlaps(O, Y):
            raise ValueError("outer: out overlaps x or y")
    O = T = out_target(O)
    X = as_dtype(X, dt)
    Y = as_dtype(Y, dt)
    ix, iy, rs, cs = elem_stride(X, 0), elem_stride(Y, 0), elem_stride(O, 0), elem_stride(O, 1)
    ks = _kernels(_code(O), &prm)
    if dt is F32:
        with nogil:
            rc = outer_run(ks, prm.n_threads, m, n, <const float*> cnp.PyArray_DATA(X), ix,
                           <const float*> cnp.PyArray_DATA(Y), iy,
                           <float*> cnp.PyArray_DATA(O), rs, cs)
    else:
        with nogil:
            rc = outer_run(ks, prm.n_threads, m, n, <const double*> cnp.PyArray_DATA(X), ix,
                           <const double*> cnp.PyArray_DATA(Y), iy,
                           <double*> cnp.PyArray_DATA(O), rs, cs)
    if rc != 0:
        raise MemoryError("microtile: out of memory in outer")
    return _deliver(out, T)


def ger(a, x, y, alpha=1.0):
    """Rank-1 update in place: ``a += alpha * outer(x, y)``.

    Parameters
    ----------
    a : ndarray, 2-D (m, n), float32 or float64, writeable
        Updated in place; its dtype is kept (x and y are cast to it).  Any layout, byte-swapped
        and misaligned included (those are updated through a native copy).
    x : array_like, 1-D, length m
    y : array_like, 1-D, length n
    alpha : float
        As in BLAS, ``alpha == 0`` returns at once: x and y are not read, so a NaN or Inf in
        them does not reach ``a``.

    Returns
    -------
    ndarray
        ``a`` itself.
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"ger: a must be a numpy.ndarray (it is updated in place), "
                        f"got {type(a).__name__}")
    cdef cnp.ndarray A = <cnp.ndarray> a, T
    dt = native_dtype(A.dtype)
    if dt is not F32 and dt is not F64:
        raise TypeError(f"ger: unsupported dtype {A.dtype}; microtile computes in float32 "
                        "and float64")
    if A.ndim != 2:
        raise ValueError(f"ger: a must be 2-D, got shape {np.shape(A)}")
    check_out(A, np.shape(A), dt, "a")
    cdef cnp.ndarray X = _vector(x, "x", "ger"), Y = _vector(y, "y", "ger")
    cdef idx_t m = A.shape[0], n = A.shape[1], ix, iy, rs, cs
    cdef double alpha_f = real_scalar(alpha, "alpha")
    cdef float af = <float> alpha_f
    cdef gemm_params prm
    cdef const kernel_set_t* ks
    cdef int rc
    if X.shape[0] != m or Y.shape[0] != n:
        raise ValueError(f"ger: a has shape {np.shape(A)}, x {np.shape(X)} and y "
                         f"{np.shape(Y)}; expected x of length {m} and y of length {n}")
    # x or y may be views of a: read them as they were before the update.
    X = X.astype(dt) if overlaps(A, X) else as_dtype(X, dt)  # astype copies
    Y = Y.astype(dt) if overlaps(A, Y) else as_dtype(Y, dt)
    T = out_target(A)
    if T is not A:
        np.copyto(T, A)     # a byte-swapped or misaligned a: update a native copy
    ix, iy, rs, cs = elem_stride(X, 0), elem_stride(Y, 0), elem_stride(T, 0), elem_stride(T, 1)
    ks = _kernels(_code(T), &prm)
    if dt is F32:
        with nogil:
            rc = ger_run(ks, prm.n_threads, m, n, af, <const float*> cnp.PyArray_DATA(X), ix,
                         <const float*> cnp.PyArray_DATA(Y), iy,
                         <float*> cnp.PyArray_DATA(T), rs, cs)
    else:
        with nogil:
            rc = ger_run(ks, prm.n_threads, m, n, alpha_f, <const double*> cnp.PyArray_DATA(X),
                         ix, <const double*> cnp.PyArray_DATA(Y), iy,
                         <double*> cnp.PyArray_DATA(T), rs, cs)
    if rc != 0:
        raise MemoryError("microtile: out of memory in ger")
    if T is not A:
        np.copyto(A, T)
    return a


ctypedef struct _stack:
    # Where matrix i of a batch lives, for three operands broadcast over one batch shape:
    # i unravelled in C order over dims, times each operand's element strides.
    int nd
    idx_t dims[64]      # NPY_MAXDIMS
    idx_t sa[64]
    idx_t sb[64]
    idx_t sc[64]


cdef inline idx_t _offset(const _stack* st, idx_t i, const idx_t* strides) noexcept nogil:
    """Element offset of matrix i in an operand with these batch strides."""
    cdef idx_t q, off = 0
    cdef int d
    for d in range(st.nd - 1, -1, -1):
        q = i // st.dims[d]
        off += (i - q * st.dims[d]) * strides[d]
        i = q
    return off


ctypedef struct _batch_job:
    const gemm_params* prm
    bint dbl
    idx_t m, n, k, rs_a, cs_a, rs_b, cs_b, rs_c, cs_c
    void* a
    void* b
    void* c
    const _stack* st
    signal_poll* poll
    int64_t fails       # atomic


cdef int _batch_products(const _batch_job* j, idx_t i0, idx_t i1, int tid, floating* base_a,
                         floating* base_b, floating* base_c) noexcept nogil:
    cdef idx_t i
    cdef int rc, fails = 0
    for i in range(i0, i1):
        if tid == 0:     # the caller
            poll_step(j.poll, 0)
        if stop_before(j.poll, 1):
            break
        rc = gemm_serial(j.prm, j.m, j.n, j.k, <floating> 1,
                         base_a + _offset(j.st, i, j.st.sa), j.rs_a, j.cs_a,
                         base_b + _offset(j.st, i, j.st.sb), j.rs_b, j.cs_b, <floating> 0,
                         base_c + _offset(j.st, i, j.st.sc), j.rs_c, j.cs_c)
        fails += rc != 0 and rc != INTERRUPTED
    return fails


cdef void _batch_range(void* ctx, idx_t i0, idx_t i1, int tid) noexcept nogil:
    cdef _batch_job* j = <_batch_job*> ctx
    cdef int fails
    if j.dbl:
        fails = _batch_products(j, i0, i1, tid, <double*> j.a, <double*> j.b, <double*> j.c)
    else:
        fails = _batch_products(j, i0, i1, tid, <float*> j.a, <float*> j.b, <float*> j.c)
    if fails:
        mt_atomic_add64(&j.fails, fails)


cdef int _batched(const gemm_params* prm, idx_t count, idx_t m, idx_t n, idx_t k,
                  floating* base_a, idx_t rs_a, idx_t cs_a,
                  floating* base_b, idx_t rs_b, idx_t cs_b,
                  floating* base_c, idx_t rs_c, idx_t cs_c, const _stack* st) noexcept nogil:
    """A stack of products.  Large matrices are threaded inside each product; a stack of
    small ones is spread across threads, one whole product per thread at a time.  Each
    product's place is computed from its index: offset arrays for a batch of 2**28 1x1
    products would take three times 2 GB."""
    cdef idx_t i, oa, ob, oc
    cdef int nt = prm.n_threads, rc
    cdef double work = <double> m * <double> n * <double> k
    cdef signal_poll* poll = caller_poll()
    cdef _batch_job jb
    if work >= prm.thread_mnk or nt <= 1 or work * count < prm.thread_mnk:
        for i in range(count):
            if poll_step(poll, 0):
                return INTERRUPTED
            oa = _offset(st, i, st.sa)
            ob = _offset(st, i, st.sb)
            oc = _offset(st, i, st.sc)
            rc = gemm_run(prm, m, n, k, <floating> 1, base_a + oa, rs_a, cs_a,
                          base_b + ob, rs_b, cs_b, <floating> 0, base_c + oc, rs_c, cs_c)
            if rc != 0:
                return rc
        return 0
    if nt > count:
        nt = <int> count
    jb.prm = prm
    jb.dbl = floating is double
    jb.m = m
    jb.n = n
    jb.k = k
    jb.a = base_a
    jb.b = base_b
    jb.c = base_c
    jb.rs_a = rs_a
    jb.cs_a = cs_a
    jb.rs_b = rs_b
    jb.cs_b = cs_b
    jb.rs_c = rs_c
    jb.cs_c = cs_c
    jb.st = st
    jb.poll = poll
    jb.fails = 0
    # Several products per item, several items per thread.
    pool_ranges(nt, count, 4 * nt, 1, _batch_range, &jb)
    if jb.fails:
        return -1
    return INTERRUPTED if interrupted(poll) else 0


cdef void _batch_strides(cnp.ndarray x, tuple batch, idx_t* out):
    """Element strides of ``x`` broadcast over ``batch`` (0 along broadcast dimensions)."""
    cdef object bx = np.broadcast_to(x, batch + np.shape(x)[-2:])
    cdef Py_ssize_t item = x.dtype.itemsize
    cdef int d
    for d in range(len(batch)):
        out[d] = bx.strides[d] // item


def matmul(a, b, out=None):
    """Matrix product with ``numpy.matmul`` semantics.

    1-D operands are promoted to a row (``a``) or column (``b``) and the added dimension is
    removed from the result; N-D operands are stacks of matrices in the last two dimensions,
    with the batch dimensions broadcast.

    Parameters
    ----------
    a, b : array_like, float32 or float64, at least 1-D
    out : ndarray, optional
        Array of the result's shape and dtype.

    Returns
    -------
    ndarray or scalar
        A NumPy scalar when both operands are 1-D.
    """
    cdef cnp.ndarray A = as_float_array(a, "a"), B = as_float_array(b, "b"), O, Of, T
    cdef cnp.ndarray A2, B2
    cdef gemm_params prm
    cdef idx_t count, m, n, k
    cdef int rc
    if A.ndim == 0 or B.ndim == 0:
        raise ValueError(f"matmul: operands must be at least 1-D, got shapes {np.shape(A)} "
                         f"and {np.shape(B)}")
    if A.ndim == 2 and B.ndim == 2:
        # The common case, without the stack machinery.
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"matmul: a has shape {np.shape(A)} and b has shape "
                             f"{np.shape(B)}: core dimensions {A.shape[1]} and {B.shape[0]} "
                             "differ")
        return gemm(A, B, out=out)
    dt = result_dtype((A, B))
    a_vec = A.ndim == 1
    b_vec = B.ndim == 1
    A2 = A[None, :] if a_vec else A
    B2 = B[:, None] if b_vec else B
    m, k = np.shape(A2)[-2:]
    k2, n = np.shape(B2)[-2:]
    if k != k2:
        raise ValueError(f"matmul: a has shape {np.shape(A)} and b has shape {np.shape(B)}: "
                         f"core dimensions {k} and {k2} differ")
    try:
        batch = tuple(np.broadcast_shapes(np.shape(A2)[:-2], np.shape(B2)[:-2]))
    except ValueError:
        raise ValueError(f"matmul: batch dimensions of a {np.shape(A)} and b {np.shape(B)} "
                         "do not broadcast") from None
    shape = batch + (() if a_vec else (m,)) + (() if b_vec else (n,))
    if out is None:
        O = np.empty(shape, dtype=dt)
    else:
        O = check_out(out, shape, dt)
        if overlaps(O, A) or overlaps(O, B):
            raise ValueError("matmul: out overlaps an input")
    if O.size == 0:
        # Nothing to compute: no conversions, no per-matrix offsets (a broadcast batch of
        # 2**31 empty products would otherwise cost 16 GB of offsets).
        return O
    O = T = out_target(O)
    A2 = as_dtype(A2, dt)
    B2 = as_dtype(B2, dt)
    Of = O
    if a_vec:
        Of = np.expand_dims(Of, -2 if not b_vec else len(batch))
    if b_vec:
        Of = np.expand_dims(Of, -1)
    if not batch:
        run_gemm(A2, False, B2, False, 1.0, 0.0, Of)
    else:
        count = 1
        for d in batch:
            count *= d
        if count:
            _run_batched(A2, B2, Of, count, m, n, k, batch)
    if out is None and O.ndim == 0:
        return O[()]
    return _deliver(out, T)


cdef int _run_batched(cnp.ndarray A, cnp.ndarray B, cnp.ndarray O, idx_t count, idx_t m,
                      idx_t n, idx_t k, tuple batch) except -1:
    cdef int nd = O.ndim
    cdef idx_t rs_a = elem_stride(A, A.ndim - 2), cs_a = elem_stride(A, A.ndim - 1)
    cdef idx_t rs_b = elem_stride(B, B.ndim - 2), cs_b = elem_stride(B, B.ndim - 1)
    cdef idx_t rs_c = elem_stride(O, nd - 2), cs_c = elem_stride(O, nd - 1)
    cdef _stack st
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc, d
    st.nd = len(batch)
    for d in range(st.nd):
        st.dims[d] = batch[d]
    _batch_strides(A, batch, st.sa)
    _batch_strides(B, batch, st.sb)
    _batch_strides(O, batch, st.sc)
    if O.dtype is F32:
        current_params(0, &prm)
        open_poll(&poll)
        with nogil:
            rc = _batched(&prm, count, m, n, k, <float*> cnp.PyArray_DATA(A), rs_a, cs_a,
                          <float*> cnp.PyArray_DATA(B), rs_b, cs_b,
                          <float*> cnp.PyArray_DATA(O), rs_c, cs_c, &st)
            close_poll()
    else:
        current_params(1, &prm)
        open_poll(&poll)
        with nogil:
            rc = _batched(&prm, count, m, n, k, <double*> cnp.PyArray_DATA(A), rs_a, cs_a,
                          <double*> cnp.PyArray_DATA(B), rs_b, cs_b,
                          <double*> cnp.PyArray_DATA(O), rs_c, cs_c, &st)
            close_poll()
    return raise_for_rc(rc, &poll, "matmul")


# The epilogue's C enum and the schema's codes are one list written twice (C needs its own).
assert (ACTIVATIONS["none"], ACTIVATIONS["relu"], ACTIVATIONS["sigmoid"],
        ACTIVATIONS["tanh"]) == (ACT_NONE, ACT_RELU, ACT_SIGMOID, ACT_TANH)
_ACTIVATIONS = ACTIVATIONS


def linear_forward(x, weight, bias=None, activation=None, out=None):
    """``act(x @ weight.T + bias)`` in one GEMM, bias and activation applied in its
    write-back (private; used by ``microtile.nn.Linear``).

    Parameters
    ----------
    x : array_like, (batch, in_features)
    weight : array_like, (out_features, in_features)
    bias : array_like, (out_features,), optional
    activation : {None, "relu", "sigmoid", "tanh"}
    out : ndarray, optional
        (batch, out_features) of the result dtype.

    Returns
    -------
    ndarray, (batch, out_features)
    """
    cdef cnp.ndarray X = as_float_array(x, "x"), W = as_float_array(weight, "weight")
    cdef cnp.ndarray Bv = None, O, T
    cdef gemm_epilogue ep
    cdef gemm_params prm
    cdef signal_poll poll
    cdef int rc
    cdef idx_t m, n, k
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'relu', 'sigmoid', 'tanh'; "
                         f"got {activation!r}")
    if X.ndim != 2 or W.ndim != 2:
        raise ValueError(f"linear_forward: x and weight must be 2-D, got shapes {np.shape(X)} "
                         f"and {np.shape(W)}")
    m, k = X.shape[0], X.shape[1]
    n = W.shape[0]
    if W.shape[1] != k:
        raise ValueError(f"linear_forward: x has shape {np.shape(X)} and weight "
                         f"{np.shape(W)}; in_features differ")
    if bias is not None:
        Bv = _vector(bias, "bias", "linear_forward")
        if Bv.shape[0] != n:
            raise ValueError(f"linear_forward: bias has shape {np.shape(Bv)}; expected ({n},)")
    dt = result_dtype((X, W, Bv))
    if out is None:
        O = np.empty((m, n), dtype=dt)
    else:
        O = check_out(out, (m, n), dt)
        if overlaps(O, X) or overlaps(O, W) or (Bv is not None and overlaps(O, Bv)):
            raise ValueError("linear_forward: out overlaps an input")
    O = T = out_target(O)
    X = as_dtype(X, dt)
    W = as_dtype(W, dt)
    ep.bias = NULL
    ep.bias_inc = 0
    ep.bias_axis = 1
    ep.act = _ACTIVATIONS[activation]
    if Bv is not None:
        Bv = as_dtype(Bv, dt)
        ep.bias = cnp.PyArray_DATA(Bv)
        ep.bias_inc = elem_stride(Bv, 0)
    cdef idx_t rs_a = elem_stride(X, 0), cs_a = elem_stride(X, 1)
    cdef idx_t rs_b = elem_stride(W, 1), cs_b = elem_stride(W, 0)
    cdef idx_t rs_c = elem_stride(O, 0), cs_c = elem_stride(O, 1)
    cdef void* px = cnp.PyArray_DATA(X)
    cdef void* pw = cnp.PyArray_DATA(W)
    cdef void* po = cnp.PyArray_DATA(O)
    if dt is F32:
        current_params(0, &prm)
        open_poll(&poll)
        with nogil:
            rc = gemm_run_ep(&prm, m, n, k, <float> 1, <const float*> px, rs_a, cs_a,
                             <const float*> pw, rs_b, cs_b, <float> 0, <float*> po, rs_c, cs_c,
                             &ep)
            close_poll()
    else:
        current_params(1, &prm)
        open_poll(&poll)
        with nogil:
            rc = gemm_run_ep(&prm, m, n, k, <double> 1, <const double*> px, rs_a, cs_a,
                             <const double*> pw, rs_b, cs_b, <double> 0, <double*> po, rs_c,
                             cs_c, &ep)
            close_poll()
    raise_for_rc(rc, &poll, "linear_forward")
    return _deliver(out, T)
