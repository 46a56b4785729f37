# Scalar activations shared by the element-wise kernels (``_act_kernels``) and the recurrent
# cells (``_rnn_kernels``): defined once here, inlined where they are cimported.
from libc.math cimport exp, expf, tanh, tanhf

from microtile._common._typedefs cimport floating


cdef inline floating sigmoid(floating v) noexcept nogil:
    # Only exp of a non-positive number is taken: no overflow for any input, NaN propagates.
    cdef floating e
    if floating is float:
        if v >= 0:
            return 1.0 / (1.0 + expf(-v))
        e = expf(v)
        return e / (1.0 + e)
    else:
        if v >= 0:
            return 1.0 / (1.0 + exp(-v))
        e = exp(v)
        return e / (1.0 + e)


cdef inline floating tanh_(floating v) noexcept nogil:
    # libm's tanh saturates to +-1 without overflow; tanhf keeps float32 math in float32.
    if floating is float:
        return tanhf(v)
    else:
        return tanh(v)
