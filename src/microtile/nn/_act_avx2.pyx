"""The float32 activation loops of ``_act_loops`` compiled with -mavx2 -mfma (the ``_avx2``
suffix tells setup.py), handed to ``_act_kernels`` as a table of function pointers.  Imported
only after CPUID says the CPU has AVX2 and FMA (``microtile._kernels._dispatch``)."""
from cpython.pycapsule cimport PyCapsule_New

from microtile._common._typedefs cimport idx_t
from microtile.nn._act_loops cimport act_loop_f, pw_loop_f, act_table_t


cdef void _act(int act, const float* x, const float* dy, float* out, idx_t n) noexcept nogil:
    act_loop_f(act, x, dy, out, n)


cdef void _pw(int code, float alpha, const float* x, const float* dy, float* out,
              idx_t n) noexcept nogil:
    pw_loop_f(code, alpha, x, dy, out, n)


cdef act_table_t _table
_table.act = _act
_table.pw = _pw


def table():
    """The loops as a capsule named "microtile.act_f32" (an ``act_table_t``)."""
    return PyCapsule_New(&_table, b"microtile.act_f32", NULL)
