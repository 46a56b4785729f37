"""Recognising scipy.sparse operands and taking their compressed arrays apart.

scipy is optional: ``is_sparse`` looks at the object's type without importing scipy, and
``compressed`` imports it only when handed a sparse object in a format other than CSR/CSC.
"""
import numpy as np

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_INDEX = (np.dtype(np.int32), np.dtype(np.int64))


def _scipy_sparse_class(cls):
    mod = getattr(cls, "__module__", "") or ""
    return mod == "scipy.sparse" or mod.startswith("scipy.sparse.")


def is_sparse(x):
    """True for any scipy.sparse matrix or array, subclasses included (without importing
    scipy: the classes' modules say it)."""
    return hasattr(x, "format") and any(_scipy_sparse_class(c) for c in type(x).__mro__)


class Compressed:
    """The arrays of a CSR or CSC matrix, as the kernels take them.

    Attributes
    ----------
    fmt : {"csr", "csc"}
    shape : tuple of int
        The matrix's (rows, columns).
    indptr, indices : ndarray
        Contiguous, both int32 or both int64 (scipy's own arrays whenever they already are).
    data : ndarray
        Contiguous, native float32 or float64, possibly longer than ``indptr[-1]``.
    """

    __slots__ = ("fmt", "shape", "indptr", "indices", "data")

    def __init__(self, fmt, shape, indptr, indices, data):
        self.fmt, self.shape = fmt, shape
        self.indptr, self.indices, self.data = indptr, indices, data

    @property
    def dtype(self):
        return self.data.dtype

    def csr_view(self):
        """(indptr, indices, data, nrows, ncols) of the CSR matrix these arrays describe:
        the matrix itself for CSR, its transpose for CSC."""
        rows, cols = self.shape if self.fmt == "csr" else self.shape[::-1]
        return self.indptr, self.indices, self.data, rows, cols


def _float_dtype(dt, name):
    if dt.kind == "f" and dt.itemsize in (4, 8):
        return _F32 if dt.itemsize == 4 else _F64
    raise TypeError(f"{name}: unsupported dtype {dt}; microtile computes in float32 and "
                    "float64")


def compressed(x, name):
    """The CSR or CSC arrays of the scipy.sparse object ``x``: CSR and CSC as they are,
    other formats converted once (to CSR arrays, duplicates kept for the kernels to sum in
    the product's dtype; never densified).

    Raises TypeError for a dtype other than float32/float64 and ValueError for a matrix that
    is not 2-D.  The structure itself is checked by the kernels' driver (``check_csr``).
    """
    dt = _float_dtype(np.dtype(x.dtype), name)
    if getattr(x, "ndim", 2) != 2 or len(x.shape) != 2:
        raise ValueError(f"{name}: a sparse operand must be 2-D, got shape {x.shape}")
    fmt = x.format
    if fmt not in ("csr", "csc"):
        # Through COO to CSR arrays by hand: scipy's tocsr() sums duplicate entries in the
        # matrix's own dtype, which rounds a float32 matrix's sums before a float64 product
        # (the fuzz driver saw 3e-8 relative errors); the kernels sum them in the result's.
        coo = x.tocoo()
        row = np.asarray(coo.row, dtype=np.int64)
        order = np.argsort(row, kind="stable")
        counts = np.bincount(row, minlength=int(x.shape[0]))
        indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        indices = np.asarray(coo.col, dtype=np.int64)[order]
        data = np.asarray(coo.data)[order]
        return Compressed("csr", (int(x.shape[0]), int(x.shape[1])), indptr, indices,
                          np.ascontiguousarray(data, dtype=dt))
    indptr = np.asarray(x.indptr)
    indices = np.asarray(x.indices)
    if indptr.dtype != indices.dtype or indptr.dtype not in _INDEX:
        # Mixed or unusual index types (a hand-built matrix): one int64 copy of each.
        indptr = indptr.astype(np.int64)
        indices = indices.astype(np.int64)
    indptr = np.ascontiguousarray(indptr)
    indices = np.ascontiguousarray(indices)
    data = np.asarray(x.data)
    if data.dtype is not dt or not data.flags.aligned or not data.flags.c_contiguous:
        data = np.ascontiguousarray(data, dtype=dt)
    return Compressed(fmt, (int(x.shape[0]), int(x.shape[1])), indptr, indices, data)
