# Scalar activations shared by the element-wise kernels (``_act_kernels``) and the recurrent
# cells (``_rnn_kernels``): defined once here, inlined where they are cimported.
from libc.math cimport exp, tanh

from microtile._common._typedefs cimport floating


# float32 exp, sigmoid and tanh without a libm call, branch-free so that the compiler can
# vectorise the loops that use them: libm's expf and tanhf took 36 % of an LSTM forward
# (perf, 128->256, batch 32), called once per gate element.  float64 keeps libm.

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    /* e^x for x in [-104, 88] (clamped outside: 0 below, as e^-104 rounds to 0 in float32;
       above, enough for tanh, which saturates long before), within about 2 ulp, with
       subnormal results; NaN stays NaN.  e^x = 2^n e^r with n = round(x / ln 2) and
       |r| <= ln(2) / 2; e^r by its Taylor series to r^7 (remainder under 6e-9, below one
       float32 ulp); ln 2 split in two so that r is exact; 2^n applied as two normal powers
       of two so that n may go below -126. */
    static inline float mt_pow2i(int32_t n) {
        float f;
        int32_t bits = (n + 127) << 23;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    static inline float mt_expf_fast(float x) {
        float n, r, p;
        int32_t n1, n2;
        x = x > 88.0f ? 88.0f : x;          /* NaN compares false both times: kept */
        x = x < -104.0f ? -104.0f : x;
        /* round(x / ln 2) by adding and subtracting 1.5 * 2^23: plain float arithmetic
           that vectorises on SSE2, where floorf is a call (no roundps before SSE4.1). */
        n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
        n = n != n ? 0.0f : n;              /* NaN: any n; r and the result stay NaN */
        r = (x - n * 0.693145751953125f) - n * 1.4286068202862268e-06f;
        p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-01f + r * (4.1666668e-02f
            + r * (8.3333338e-03f + r * (1.3888889e-03f + r * 1.9841270e-04f))))));
        n1 = (int32_t) n >> 1;              /* n in [-150, 127]: both halves normal */
        n2 = (int32_t) n - n1;
        return p * mt_pow2i(n1) * mt_pow2i(n2);
    }
    /* sigmoid from e = e^-|v| <= 1 only (no overflow): 1 / (1 + e) for v >= 0, e / (1 + e)
       below, so tiny results keep their relative accuracy. */
    static inline float mt_sigmoidf_fast(float v) {
        float e = mt_expf_fast(-fabsf(v));
        float d = 1.0f / (1.0f + e);
        float ed = e * d;   /* computed either way: GCC does not if-convert a product that
                               only one branch makes (it might trap), so the loop stayed
                               scalar */
        return v >= 0.0f ? d : ed;
    }
    /* tanh within about 2 ulp: an odd polynomial below |v| = 0.55 (least squares on the
       relative error, fitted for this file: 6e-8), 1 - 2 / (e^(2|v|) + 1) above; computed
       on |v|, v's sign put back (so tanh(-0) is -0).  Both parts are computed and one is
       selected, so a loop over it has no branch. */
    static inline float mt_tanhf_fast(float v) {
        float a = fabsf(v), z = v * v;
        float small = a + a * z * (-0.33333319f + z * (0.133327f + z * (-0.053865079f
                      + z * (0.021127241f + z * -0.0063564959f))));
        float big = 1.0f - 2.0f / (mt_expf_fast(2.0f * a) + 1.0f);
        return copysignf(a < 0.55f ? small : big, v);
    }
    """
    float expf_fast "mt_expf_fast"(float x) nogil
    float sigmoidf_fast "mt_sigmoidf_fast"(float v) nogil
    float tanhf_fast "mt_tanhf_fast"(float v) nogil


cdef inline floating sigmoid(floating v) noexcept nogil:
    # Only exp of a non-positive number is taken: no overflow for any input, NaN propagates.
    cdef floating e
    if floating is float:
        return sigmoidf_fast(v)
    else:
        if v >= 0:
            return 1.0 / (1.0 + exp(-v))
        e = exp(v)
        return e / (1.0 + e)


cdef inline floating tanh_(floating v) noexcept nogil:
    # libm's tanh saturates to +-1 without overflow; float32 has its own, vectorisable.
    if floating is float:
        return tanhf_fast(v)
    else:
        return tanh(v)
