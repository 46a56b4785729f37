# The float32 element-wise loops of the activations, written once and compiled twice: into
# ``_act_kernels`` (the baseline ISA every x86-64 and aarch64 runs) and into ``_act_avx2``
# (built with -mavx2 -mfma, used only where the CPU has them).  With libm's expf, erff and
# tanhf per element GELU took 13.6x, tanh 25.8x and SiLU 8.6x the time of a copy of the same
# bytes (10^7 elements, 2 threads); on the branch-free float32 functions of ``_act_math``
# the compiler vectorises every loop here, eight lanes wide with AVX2.  float64 keeps libm.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from microtile._common._typedefs cimport idx_t
from microtile.nn._act_math cimport (gelu_gradf_fast, gelu_tanhf_fast, gelu_tanh_gradf_fast,
                                     phif_fast, sigmoidf_fast, tanhf_fast)

# Activation codes of ``act_loop_f`` (the GEMM epilogue's; see linalg/_gemm.pxd).
cdef enum:
    LOOP_ACT_NONE = 0
    LOOP_ACT_RELU = 1
    LOOP_ACT_SIGMOID = 2
    LOOP_ACT_TANH = 3

# Codes of the activations whose derivative needs the input (``pw_loop_f``).
cdef enum:
    PW_LEAKY = 1
    PW_GELU = 2
    PW_GELU_TANH = 3
    PW_SILU = 4


cdef inline void act_loop_f(int act, const float* x, const float* dy, float* out,
                            idx_t n) noexcept nogil:
    """out = act(x) when dy is NULL; else out = dy * act'(.) computed from the output x
    (ReLU: 0 where x <= 0, so NaN passes; sigmoid: x(1 - x); tanh: 1 - x^2)."""
    cdef idx_t i
    cdef float v, g
    if dy == NULL:
        if act == LOOP_ACT_RELU:
            for i in range(n):
                v = x[i]
                out[i] = 0 if v < 0 else v      # NaN < 0 is false: NaN passes, as torch
        elif act == LOOP_ACT_SIGMOID:
            for i in range(n):
                out[i] = sigmoidf_fast(x[i])
        elif act == LOOP_ACT_TANH:
            for i in range(n):
                out[i] = tanhf_fast(x[i])
        elif x != out:
            for i in range(n):
                out[i] = x[i]
    else:
        if act == LOOP_ACT_RELU:
            for i in range(n):
                # Both loads unconditional, so the select is a mask, not a branch that
                # mispredicts on every other element; NaN in dy stays out where x <= 0.
                g = dy[i]
                v = x[i]
                out[i] = 0 if v <= 0 else g
        elif act == LOOP_ACT_SIGMOID:
            for i in range(n):
                v = x[i]
                out[i] = dy[i] * (v * (1 - v))
        elif act == LOOP_ACT_TANH:
            for i in range(n):
                v = x[i]
                out[i] = dy[i] * (1 - v * v)
        elif dy != out:
            for i in range(n):
                out[i] = dy[i]


cdef inline void pw_loop_f(int code, float alpha, const float* x, const float* dy,
                           float* out, idx_t n) noexcept nogil:
    """out = f(x) when dy is NULL, else out = dy * f'(x), f chosen by ``code`` (PW_*);
    torch's formulas."""
    cdef idx_t i
    cdef float v, t, g
    # The GELUs' formulas and constants are in _act_math.h.
    if code == PW_LEAKY:
        if dy == NULL:
            for i in range(n):
                v = x[i]
                out[i] = v if v > 0 else v * alpha
        else:
            for i in range(n):
                g = dy[i]
                out[i] = g if x[i] > 0 else g * alpha
    elif code == PW_GELU:
        if dy == NULL:
            for i in range(n):
                v = x[i]
                out[i] = v * phif_fast(v)
        else:
            for i in range(n):
                out[i] = dy[i] * gelu_gradf_fast(x[i])
    elif code == PW_GELU_TANH:
        # As v sigmoid(2u) (_act_math.h): the far left tail does not cancel to 0.
        if dy == NULL:
            for i in range(n):
                out[i] = gelu_tanhf_fast(x[i])
        else:
            for i in range(n):
                out[i] = dy[i] * gelu_tanh_gradf_fast(x[i])
    elif code == PW_SILU:
        if dy == NULL:
            for i in range(n):
                v = x[i]
                out[i] = v * sigmoidf_fast(v)
        else:
            for i in range(n):
                v = x[i]
                t = sigmoidf_fast(v)
                out[i] = dy[i] * t * (1 + v * (1 - t))


# Dropout's masks, drawn from a key per forward (the C and the reasons in _dropout_mask.h).
cdef extern from "_dropout_mask.h":
    enum: MT_DROP_BLOCK
    void drop_bits "mt_drop_bits"(uint64_t key, int64_t i0, int64_t n, uint32_t* r) nogil
    void drop_forward_f "mt_drop_forward_f"(const float* x, float* y, uint8_t* keep,
                                            int64_t i0, int64_t i1, uint64_t key,
                                            uint64_t threshold, float scale) nogil
    void drop_forward_d "mt_drop_forward_d"(const double* x, double* y, uint8_t* keep,
                                            int64_t i0, int64_t i1, uint64_t key,
                                            uint64_t threshold, double scale) nogil
    void drop_apply_f "mt_drop_apply_f"(const float* g, const uint8_t* keep, float* out,
                                        int64_t n, float scale) nogil
    void drop_apply_d "mt_drop_apply_d"(const double* g, const uint8_t* keep, double* out,
                                        int64_t n, double scale) nogil


# What ``_act_avx2`` hands over (a capsule named "microtile.act_f32"): the two loops as
# compiled there.
ctypedef void (*act_loop_t)(int act, const float* x, const float* dy, float* out,
                            idx_t n) noexcept nogil
ctypedef void (*pw_loop_t)(int code, float alpha, const float* x, const float* dy,
                           float* out, idx_t n) noexcept nogil

ctypedef void (*drop_f_t)(const float* x, float* y, uint8_t* keep, int64_t i0, int64_t i1,
                         uint64_t key, uint64_t threshold, float scale) noexcept nogil
ctypedef void (*drop_d_t)(const double* x, double* y, uint8_t* keep, int64_t i0, int64_t i1,
                          uint64_t key, uint64_t threshold, double scale) noexcept nogil

ctypedef struct act_table_t:
    act_loop_t act
    pw_loop_t pw
    drop_f_t drop_f     # dropout forwards (the generator's lane loop vectorises 4 wide
    drop_d_t drop_d     # with AVX2: 0.27 ns per float32 element on a core, 0.75 on SSE2)
