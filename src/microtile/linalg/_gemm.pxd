from microtile._common._typedefs cimport idx_t, floating
from microtile._config._params cimport gemm_params

# What the write-back does to C after the product, while each tile is still in L1:
# C = act(C + bias).  bias: NULL for none, else indexed by C's row (bias_axis 0) or column
# (bias_axis 1), bias_inc elements apart, of the GEMM's dtype.
cdef enum:
    ACT_NONE = 0
    ACT_RELU = 1
    ACT_SIGMOID = 2
    ACT_TANH = 3

ctypedef struct gemm_epilogue:
    const void* bias
    idx_t bias_inc
    int bias_axis
    int act

# C = alpha * A @ B + beta * C with A (m x k), B (k x n), C (m x n) at any strides (in
# elements).  beta == 0: C is not read; alpha == 0: A and B are not read.  Threads as the
# params allow.  Returns 0, or -1 when scratch memory could not be had (C is then undefined).
cdef int gemm_run(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                  const floating* a, idx_t rs_a, idx_t cs_a,
                  const floating* b, idx_t rs_b, idx_t cs_b,
                  floating beta, floating* c, idx_t rs_c, idx_t cs_c) noexcept nogil

# The same on the calling thread only: for callers that parallelise at a coarser level.
cdef int gemm_serial(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                     const floating* a, idx_t rs_a, idx_t cs_a,
                     const floating* b, idx_t rs_b, idx_t cs_b,
                     floating beta, floating* c, idx_t rs_c, idx_t cs_c) noexcept nogil

# gemm_run / gemm_serial followed by the epilogue ``ep`` (NULL: none).
cdef int gemm_run_ep(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                     const floating* a, idx_t rs_a, idx_t cs_a,
                     const floating* b, idx_t rs_b, idx_t cs_b,
                     floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                     const gemm_epilogue* ep) noexcept nogil
cdef int gemm_serial_ep(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                        const floating* a, idx_t rs_a, idx_t cs_a,
                        const floating* b, idx_t rs_b, idx_t cs_b,
                        floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                        const gemm_epilogue* ep) noexcept nogil

# B packed once for many products with it (a recurrent layer's weight, used at every step):
# ceil(n / nr) micro-panels of nr columns over the whole depth k, panel q at bp + q * k * nr
# (kc blocking is not applied: meant for k up to a few thousand), columns past n zero.  nr is
# that of the kernel set ``prm.isa`` names; the packing holds for that set only.
# gemm_packed_b_size: elements the packing needs.  gemm_pack_b_full: the packing, on the
# calling thread.  ``tag`` only selects the dtype.
cdef int gemm_nr(const gemm_params* prm, const floating* tag) noexcept nogil
cdef int gemm_mr(const gemm_params* prm, const floating* tag) noexcept nogil
cdef idx_t gemm_packed_b_size(const gemm_params* prm, idx_t k, idx_t n,
                              const floating* tag) noexcept nogil
cdef void gemm_pack_b_full(const gemm_params* prm, idx_t k, idx_t n, const floating* b,
                           idx_t rs_b, idx_t cs_b, floating* bp) noexcept nogil

# C = alpha * A @ B + beta * C (then the epilogue ``ep``, NULL: none) with B given packed by
# gemm_pack_b_full (same prm.isa, same k and n); A read in place.  Threads as the params allow.
# Returns 0, or -1 when scratch memory could not be had.
cdef int gemm_prepacked(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                        const floating* a, idx_t rs_a, idx_t cs_a, const floating* bp,
                        floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                        const gemm_epilogue* ep) noexcept nogil
