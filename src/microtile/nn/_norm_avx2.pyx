"""BatchNorm's float32 per-plane loops of ``_bn_loops.h`` compiled with -mavx2 -mfma (the
``_avx2`` suffix tells setup.py), handed to ``_norm_kernels`` as a table of function
pointers.  Imported only after CPUID says the CPU has AVX2 and FMA
(``microtile._kernels._dispatch``)."""
from cpython.pycapsule cimport PyCapsule_New

from microtile.nn._bn_loops cimport bn_table_t, mt_bn_sums_f, mt_bn_affine_f

cdef bn_table_t _table
_table.sums_f = mt_bn_sums_f         # this module's copies, built for AVX2
_table.affine_f = mt_bn_affine_f


def table():
    """The loops as a capsule named "microtile.bn_f32" (a ``bn_table_t``)."""
    return PyCapsule_New(&_table, b"microtile.bn_f32", NULL)
