# Types shared by every Cython module of microtile.
from libc.stdint cimport int64_t

# Index type for sizes and strides (strides may be negative).
ctypedef Py_ssize_t idx_t

ctypedef fused floating:
    float
    double

# Index arrays of scipy.sparse matrices, used as they come (no conversion).
from libc.stdint cimport int32_t

ctypedef fused sp_index:
    int32_t
    int64_t
