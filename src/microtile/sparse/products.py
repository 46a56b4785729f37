"""Public sparse-dense products: argument rules, and the mapping of every case onto the two
CSR drivers of ``_spmm``.

With M the CSR matrix that the sparse operand's arrays describe (the operand itself for CSR,
its transpose for CSC) and P = a @ b:

============================  =================  ==========  ==========
case                          computes           X           Y
============================  =================  ==========  ==========
a CSR  (M = a)                P = M @ b          b           P
a CSC  (M = a.T)              P = M.T @ b        b           P
b CSR  (M = b)                P.T = M.T @ a.T    a.T         P.T
b CSC  (M = b.T)              P.T = M @ a.T      a.T         P.T
============================  =================  ==========  ==========

"M @ X" is the row-gather driver, "M.T @ X" the scatter driver.  Both want X and Y with
contiguous rows; an operand or result whose rows are not is copied (once, O(size)).
"""
import numpy as np

from microtile._common._checks import (as_dtype, as_float_array, check_out, out_target,
                                       overlaps, real_scalar, result_dtype)
from microtile.sparse._format import compressed, is_sparse
from microtile.sparse._spmm import csr_product

__all__ = ["spmm"]


def _rows_contiguous(x):
    # An empty array's strides mean nothing (NumPy may give (0, 0)).
    return x.shape[0] == 0 or x.shape[1] <= 1 or x.strides[1] == x.itemsize


def _same_view(x, y):
    return x is y or (x.__array_interface__["data"][0] == y.__array_interface__["data"][0]
                      and x.shape == y.shape and x.strides == y.strides
                      and x.dtype == y.dtype)


def _accumulator(out, shape, dt, inputs, c, beta):
    """The native array the result is computed in: ``out`` itself when usable (it may be
    ``c``, for an in-place update), else a new one; it holds ``c`` when beta != 0."""
    in_place = False
    if out is None:
        T = np.empty(shape, dtype=dt)
    else:
        O = check_out(out, shape, dt)
        for x in inputs:
            if overlaps(O, x):
                raise ValueError("spmm: out overlaps an input")
        if c is not None and overlaps(O, c):
            if not _same_view(O, c):
                raise ValueError("spmm: out overlaps c without being c")
            in_place = True
        T = out_target(O)
    if beta != 0 and (not in_place or T is not out):
        np.copyto(T, c, casting="unsafe")
    return T


def _run(scatter, S, X, Y, alpha, beta):
    """Y = alpha * op(M) @ X + beta * Y through the driver, copying X and Y when their rows
    are not contiguous."""
    indptr, indices, data, _, ncols = S.csr_view()
    if not _rows_contiguous(X):
        X = np.ascontiguousarray(X)
    if _rows_contiguous(Y):
        csr_product(scatter, indptr, indices, data, ncols, X, Y, alpha, beta)
        return
    W = np.ascontiguousarray(Y) if beta != 0 else np.empty(Y.shape, dtype=Y.dtype)
    csr_product(scatter, indptr, indices, data, ncols, X, W, alpha, beta)
    np.copyto(Y, W)


def spmm(a, b, *, alpha=1.0, beta=0.0, c=None, out=None):
    """Sparse-dense matrix product: ``alpha * (a @ b) + beta * c`` as a dense array.

    Parameters
    ----------
    a, b : scipy.sparse matrix or array, or array_like
        Exactly one is sparse (any scipy.sparse format), the other a dense 2-D float32 or
        float64 array of any layout.  CSR and CSC are used as they are (so ``a.T`` of a CSR
        matrix costs nothing); other formats are converted to CSR once, never densified.
        Duplicate entries are summed; unsorted indices, explicit zeros and int32 or int64
        index arrays are accepted.
    alpha, beta : float
        As for ``gemm``: with ``alpha == 0`` the product is not formed (NaN or Inf in ``a``
        or ``b`` does not reach the result, though the sparse structure is still checked);
        with ``beta == 0``, ``c`` is not read.
    c : array_like, optional
        Broadcastable to the result's shape; required when ``beta != 0``.
    out : ndarray, optional
        Array of the result's shape and dtype to write to; may be ``c`` itself, may not
        otherwise overlap an input.

    Returns
    -------
    ndarray
        (m, n), float64 if any operand is float64, else float32.

    Raises
    ------
    TypeError
        When neither or both of ``a`` and ``b`` are sparse, for a dtype other than
        float32/float64, or a wrong ``out`` dtype.
    ValueError
        For mismatched shapes, a malformed sparse matrix (indices out of range, ``indptr``
        not monotonic or of the wrong length), a missing ``c``, a read-only or overlapping
        ``out``.

    Notes
    -----
    The structure of the sparse operand is checked on every call, in one O(rows + nnz)
    pass, before any kernel reads it.  Work is split across threads by nonzeros: row runs
    of equal nonzeros for a CSR left operand, slices of the output's columns otherwise.
    """
    a_sparse, b_sparse = is_sparse(a), is_sparse(b)
    if a_sparse == b_sparse:
        which = "both" if a_sparse else "neither"
        raise TypeError(f"spmm: exactly one of a and b must be a scipy.sparse matrix, "
                        f"{which} is")
    alpha_f = real_scalar(alpha, "alpha")
    beta_f = real_scalar(beta, "beta")
    S = compressed(a if a_sparse else b, "a" if a_sparse else "b")
    D = as_float_array(b if a_sparse else a, "b" if a_sparse else "a")
    if D.ndim != 2:
        raise ValueError(f"spmm: the dense operand must be 2-D, got shape {D.shape}")
    (m, k), (k2, n) = (S.shape, D.shape) if a_sparse else (D.shape, S.shape)
    if k != k2:
        raise ValueError(f"spmm: a has shape {(m, k)} and b has shape {(k2, n)}: inner "
                         f"dimensions {k} and {k2} differ")
    C = None
    if c is not None:
        # A Python number is a weak scalar, as in NumPy (and gemm).
        weak = type(c) is float or type(c) is int
        C = as_float_array(np.asarray(c, dtype=result_dtype((S.data, D))) if weak else c, "c")
    elif beta_f != 0:
        raise ValueError("spmm: c is required when beta != 0")
    dt = result_dtype((S.data, D, C))
    shape = (m, n)
    if C is not None and C.shape != shape:
        try:
            C = np.broadcast_to(C, shape)
        except ValueError:
            raise ValueError(f"spmm: c has shape {C.shape}, which does not broadcast to the "
                             f"result's shape {shape}") from None
    T = _accumulator(out, shape, dt, (D, S.data, S.indices, S.indptr), C, beta_f)
    indptr, indices, data, nrows, ncols = S.csr_view()
    if alpha_f == 0:
        # BLAS's rule: the product is not formed.  The structure is still checked, so a
        # malformed matrix raises whatever alpha is.
        from microtile.sparse._spmm import check_csr
        check_csr(indptr, indices, data.shape[0], nrows, ncols, "a" if a_sparse else "b")
        if beta_f == 0:
            T[...] = 0
        else:
            np.multiply(T, T.dtype.type(beta_f), out=T)
    else:
        S.data = as_dtype(S.data, dt)
        D = as_dtype(D, dt)
        gather = (S.fmt == "csr") == a_sparse
        if a_sparse:
            _run(not gather, S, D, T, alpha_f, beta_f)
        else:
            _run(not gather, S, D.T, T.T, alpha_f, beta_f)
    if out is None or T is out:
        return T
    np.copyto(out, T)
    return out
