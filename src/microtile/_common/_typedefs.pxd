# Types shared by every Cython module of microtile.
from libc.stdint cimport int64_t

# Index type for sizes and strides (strides may be negative).
ctypedef Py_ssize_t idx_t

ctypedef fused floating:
    float
    double
