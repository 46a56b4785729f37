"""The float32 activation loops and dropout's forwards of ``_act_loops`` compiled with -mavx2
-mfma (the ``_avx2`` suffix tells setup.py), handed to ``_act_kernels`` as a table of function
pointers.  Imported only after CPUID says the CPU has AVX2 and FMA
(``microtile._kernels._dispatch``)."""
from cpython.pycapsule cimport PyCapsule_New

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from microtile._common._typedefs cimport idx_t
from microtile.nn._act_loops cimport (act_loop_f, pw_loop_f, act_table_t, drop_forward_f,
                                      drop_forward_d)


cdef void _act(int act, const float* x, const float* dy, float* out, idx_t n) noexcept nogil:
    act_loop_f(act, x, dy, out, n)


cdef void _pw(int code, float alpha, const float* x, const float* dy, float* out,
              idx_t n) noexcept nogil:
    pw_loop_f(code, alpha, x, dy, out, n)


cdef void _drop_f(const float* x, float* y, uint8_t* keep, int64_t i0, int64_t i1,
                 uint64_t key, uint32_t threshold, float scale) noexcept nogil:
    drop_forward_f(x, y, keep, i0, i1, key, threshold, scale)


cdef void _drop_d(const double* x, double* y, uint8_t* keep, int64_t i0, int64_t i1,
                  uint64_t key, uint32_t threshold, double scale) noexcept nogil:
    drop_forward_d(x, y, keep, i0, i1, key, threshold, scale)


cdef act_table_t _table
_table.act = _act
_table.pw = _pw
_table.drop_f = _drop_f
_table.drop_d = _drop_d


def table():
    """The loops as a capsule named "microtile.act_f32" (an ``act_table_t``)."""
    return PyCapsule_New(&_table, b"microtile.act_f32", NULL)
