"""The Winograd transforms (``_winograd_transforms.pxi``) compiled with -mavx2 -mfma: GCC
vectorises their loops 8 floats wide with fused multiply-adds.  ``_winograd`` imports this
module only when ``microtile``'s kernel set in use is AVX2/FMA, which the dispatcher chose
after CPUID confirmed the CPU and the OS support it."""
from cpython.pycapsule cimport PyCapsule_New

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport imax, imin
from microtile.linalg._gemm cimport ACT_RELU
from microtile.conv._winograd cimport wplan, wino_kernels_t, WINO_TB, WINO_MAX_ALPHA

include "_winograd_transforms.pxi"

cdef wino_kernels_t _table
_fill_table(&_table)


def table():
    """A capsule holding this module's transform table."""
    return PyCapsule_New(&_table, b"microtile.wino_kernels", NULL)
