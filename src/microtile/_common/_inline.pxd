# Small inline helpers every kernel module shares: defined here once, cimported where used.
cimport numpy as cnp
from microtile._common._typedefs cimport idx_t


cdef inline idx_t imin(idx_t a, idx_t b) noexcept nogil:
    return a if a < b else b


cdef inline idx_t imax(idx_t a, idx_t b) noexcept nogil:
    return a if a > b else b


cdef inline idx_t ceil_div(idx_t a, idx_t b) noexcept nogil:
    """a / b rounded up, for a >= 0 and b > 0."""
    return (a + b - 1) // b


cdef inline idx_t elem_stride(cnp.ndarray x, int axis) noexcept:
    """Stride of ``axis`` in elements (the checks layer only passes aligned arrays, whose
    strides are whole elements).  0 for an axis of length 0 or 1: its stride never reaches
    a second element, and NumPy lets it be anything (as_strided gives +-2**62), so the
    kernels' step past the last element (``a += cs_a``) would overflow the pointer."""
    if cnp.PyArray_DIM(x, axis) <= 1:
        return 0
    return cnp.PyArray_STRIDE(x, axis) // cnp.PyArray_ITEMSIZE(x)
