"""Public linear-algebra entry points: validate with the GIL, then run the nogil drivers."""
import numpy as np
cimport numpy as cnp

from microtile._typedefs cimport idx_t
from microtile._gemm cimport gemm_params, gemm_run
from microtile._params cimport current_params
from microtile._checks cimport (as_float_array, result_dtype, as_dtype, check_out, overlaps)

cnp.import_array()

cdef object F32 = np.dtype(np.float32)
cdef object F64 = np.dtype(np.float64)


cdef inline idx_t estride(cnp.ndarray x, int axis):
    """Stride of ``axis`` in elements (aligned arrays have whole-element strides)."""
    return cnp.PyArray_STRIDE(x, axis) // cnp.PyArray_ITEMSIZE(x)


cdef inline bint same_view(cnp.ndarray x, cnp.ndarray y):
    cdef object ox = x, oy = y
    return (x is y or (cnp.PyArray_DATA(x) == cnp.PyArray_DATA(y) and ox.shape == oy.shape
                       and ox.strides == oy.strides and x.dtype == y.dtype))


cdef int run_gemm(cnp.ndarray A, bint ta, cnp.ndarray B, bint tb, double alpha, double beta,
                  cnp.ndarray O) except -1:
    """O = alpha * op(A) @ op(B) + beta * O for 2-D arrays of O's dtype (O written in place)."""
    cdef idx_t m = O.shape[0], n = O.shape[1]
    cdef idx_t k = A.shape[0] if ta else A.shape[1]
    cdef idx_t rs_a = estride(A, 1 if ta else 0), cs_a = estride(A, 0 if ta else 1)
    cdef idx_t rs_b = estride(B, 1 if tb else 0), cs_b = estride(B, 0 if tb else 1)
    cdef idx_t rs_c = estride(O, 0), cs_c = estride(O, 1)
    cdef gemm_params prm
    cdef int rc
    cdef void* pa = cnp.PyArray_DATA(A)
    cdef void* pb = cnp.PyArray_DATA(B)
    cdef void* pc = cnp.PyArray_DATA(O)
    cdef float af = <float> alpha, bf = <float> beta
    if O.dtype is F32:
        current_params(0, &prm)
        with nogil:
            rc = gemm_run(&prm, m, n, k, af, <const float*> pa, rs_a, cs_a,
                          <const float*> pb, rs_b, cs_b, bf, <float*> pc, rs_c, cs_c)
    else:
        current_params(1, &prm)
        with nogil:
            rc = gemm_run(&prm, m, n, k, alpha, <const double*> pa, rs_a, cs_a,
                          <const double*> pb, rs_b, cs_b, beta, <double*> pc, rs_c, cs_c)
    if rc != 0:
        raise MemoryError("microtile: could not allocate GEMM packing buffers")
    return 0


def gemm(a, b, *, alpha=1.0, beta=0.0, c=None, trans_a=False, trans_b=False, out=None):
    """General matrix multiply: ``alpha * op(a) @ op(b) + beta * c``.

    Parameters
    ----------
    a, b : array_like, 2-D, float32 or float64
        ``op(a)`` is (m, k) and ``op(b)`` is (k, n); any memory layout.
    alpha, beta : float
        Scale factors.  With ``beta == 0``, ``c`` is not read (NaN in it does not leak).
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
    cdef double alpha_f = float(alpha), beta_f = float(beta)
    cdef bint ta = bool(trans_a), tb = bool(trans_b), in_place = False
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"gemm: a and b must be 2-D, got shapes {np.shape(A)} and {np.shape(B)}")
    if c is not None:
        C = as_float_array(c, "c")
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
    if out is None:
        O = np.empty(shape, dtype=dt)
    else:
        O = check_out(out, shape, dt)
        if overlaps(O, A) or overlaps(O, B):
            raise ValueError("gemm: out overlaps a or b")
        if C is not None and overlaps(O, C):
            if not same_view(O, C):
                raise ValueError("gemm: out overlaps c without being c")
            in_place = True
    A = as_dtype(A, dt)
    B = as_dtype(B, dt)
    if beta_f != 0 and not in_place:
        np.copyto(O, C, casting="unsafe")
    run_gemm(A, ta, B, tb, alpha_f, beta_f, O)
    return O
