# Scalar activations for the element-wise kernels (``_act_kernels``, ``_act_loops``): the C
# is in ``_act_math.h``, which the recurrent cells' C (``_rnn_cells.h``) includes too, so
# each function is defined once; inlined where they are cimported.
from libc.math cimport tanh

from microtile._common._typedefs cimport floating


# float32 exp, sigmoid and tanh without a libm call, branch-free so that the compiler can
# vectorise the loops that use them: libm's expf and tanhf took 36 % of an LSTM forward
# (perf, 128->256, batch 32), called once per gate element.  float64 keeps libm.  The C is
# in _act_math.h, which the recurrent cells' C (_rnn_cells.h) includes too.

cdef extern from "_act_math.h":
    float sigmoidf_fast "mt_sigmoidf_fast"(float v) nogil
    float tanhf_fast "mt_tanhf_fast"(float v) nogil
    float phif_fast "mt_phif_fast"(float v) nogil
    float gelu_gradf_fast "mt_gelu_gradf_fast"(float v) nogil
    float gelu_tanhf_fast "mt_gelu_tanhf_fast"(float v) nogil
    float gelu_tanh_gradf_fast "mt_gelu_tanh_gradf_fast"(float v) nogil
    double sigmoid_d "mt_sigmoid_d"(double v) nogil


cdef inline floating sigmoid(floating v) noexcept nogil:
    # Only exp of a non-positive number is taken: no overflow for any input, NaN propagates.
    if floating is float:
        return sigmoidf_fast(v)
    else:
        return sigmoid_d(v)


cdef inline floating tanh_(floating v) noexcept nogil:
    # libm's tanh saturates to +-1 without overflow; float32 has its own, vectorisable.
    if floating is float:
        return tanhf_fast(v)
    else:
        return tanh(v)
