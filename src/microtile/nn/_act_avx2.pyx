"""The float32 activation loops and dropout's forwards of ``_act_loops`` compiled with -mavx2
-mfma (the ``_avx2`` suffix tells setup.py), handed to ``_act_kernels`` as a table of function
pointers.  Imported only after CPUID says the CPU has AVX2 and FMA
(``microtile._kernels._dispatch``)."""
from cpython.pycapsule cimport PyCapsule_New

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from microtile._common._typedefs cimport idx_t
from microtile.nn._act_loops cimport (act_loop_f, pw_loop_f, act_table_t, drop_forward_f,
                                      drop_forward_d, LOOP_ACT_SIGMOID, LOOP_ACT_TANH,
                                      PW_GELU, PW_GELU_TANH, PW_SILU)

# The activations that call exp, eight at a time with intrinsics (``_act_simd.h``); the
# others (ReLU, LeakyReLU, the derivatives written through the output) keep the loops of
# ``_act_loops``, which GCC vectorises well: they are a pass over memory.
cdef extern from "_act_simd.h" nogil:
    void mt_sigmoid_loop8(const float* x, const float* dy, float* out, int64_t n)
    void mt_tanh_loop8(const float* x, const float* dy, float* out, int64_t n)
    void mt_gelu_loop8(const float* x, const float* dy, float* out, int64_t n)
    void mt_gelu_grad_loop8(const float* x, const float* dy, float* out, int64_t n)
    void mt_gelu_tanh_loop8(const float* x, const float* dy, float* out, int64_t n)
    void mt_gelu_tanh_grad_loop8(const float* x, const float* dy, float* out, int64_t n)
    void mt_silu_loop8(const float* x, const float* dy, float* out, int64_t n)
    void mt_silu_grad_loop8(const float* x, const float* dy, float* out, int64_t n)


cdef void _act(int act, const float* x, const float* dy, float* out, idx_t n) noexcept nogil:
    if dy == NULL and act == LOOP_ACT_SIGMOID:
        mt_sigmoid_loop8(x, NULL, out, n)
    elif dy == NULL and act == LOOP_ACT_TANH:
        mt_tanh_loop8(x, NULL, out, n)
    else:
        act_loop_f(act, x, dy, out, n)


cdef void _pw(int code, float alpha, const float* x, const float* dy, float* out,
              idx_t n) noexcept nogil:
    if code == PW_GELU:
        (mt_gelu_loop8 if dy == NULL else mt_gelu_grad_loop8)(x, dy, out, n)
    elif code == PW_GELU_TANH:
        (mt_gelu_tanh_loop8 if dy == NULL else mt_gelu_tanh_grad_loop8)(x, dy, out, n)
    elif code == PW_SILU:
        (mt_silu_loop8 if dy == NULL else mt_silu_grad_loop8)(x, dy, out, n)
    else:
        pw_loop_f(code, alpha, x, dy, out, n)


cdef act_table_t _table
_table.act = _act
_table.pw = _pw
_table.drop_f = drop_forward_f      # this module's copies of the header's functions
_table.drop_d = drop_forward_d


def table():
    """The loops as a capsule named "microtile.act_f32" (an ``act_table_t``)."""
    return PyCapsule_New(&_table, b"microtile.act_f32", NULL)
