"""Sparse matrices: products of a scipy.sparse matrix with a dense one.

``products`` validates the public call and maps each case (sparse operand on either side,
CSR or CSC) onto the two drivers of ``_spmm``: a row gather (CSR @ dense) and a nonzero
scatter (CSR.T @ dense), whose AVX2 and portable row kernels are ``microtile._kernels``'s.
``_format`` recognises sparse operands without importing scipy.
"""
from microtile.sparse.products import spmm

__all__ = ["spmm"]
