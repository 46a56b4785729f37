# Types shared by the Winograd driver (``_winograd``) and its transform kernels, which are
# compiled once per ISA (``_winograd_transforms.pxi`` included by ``_winograd`` for the
# baseline and by ``_winograd_avx2`` with -mavx2 -mfma).
from microtile._common._typedefs cimport idx_t

cdef enum:
    WINO_MAX_ALPHA = 6
    # Tiles per transform block: a thread's two alpha**2 x TB blocks (18 KiB in float32)
    # stay in L1 while their rows are combined.
    WINO_TB = 64


# One layer's geometry, transform matrices and blocking (see ``_winograd._plan``).
ctypedef struct wplan:
    idx_t N, C, K, H, W, P, Q, pt, pl
    idx_t m, alpha, a2
    idx_t tc, tpi, ntiles       # tile columns per image, tiles per image, tiles in all
    idx_t kb, nkb               # filters per block, blocks
    idx_t T, nch                # tiles per chunk (V's and M's leading dimension), chunks
    idx_t ncs                   # column blocks per GEMM point
    idx_t cg                    # channels per input-transform item
    idx_t ws_bytes              # workspace: U + V + M + per-thread scratch
    idx_t xs[4]
    idx_t ws[4]
    int nt, act
    double bt[WINO_MAX_ALPHA * WINO_MAX_ALPHA]
    double g[WINO_MAX_ALPHA * 3]
    double at[4 * WINO_MAX_ALPHA]


# The transforms of one dtype.  ``scr``: the calling thread's scratch of
# (2 * a2 + 1) * WINO_TB elements.  input and output return True when they made a value
# that is not finite.
ctypedef void (*wino_filter_s)(const wplan* p, const float* w, idx_t k, idx_t kk, idx_t kcur,
                               float* U, float* scr) noexcept nogil
ctypedef bint (*wino_input_s)(const wplan* p, const float* x, idx_t c0, idx_t c1, idx_t t0,
                              idx_t b0, idx_t nb, float* V, float* scr) noexcept nogil
ctypedef bint (*wino_output_s)(const wplan* p, const float* M, idx_t k0, idx_t kk0,
                               idx_t kk1, idx_t kcur, idx_t t0, idx_t b0, idx_t nb,
                               const float* bias, float* y, float* scr) noexcept nogil
ctypedef void (*wino_filter_d)(const wplan* p, const double* w, idx_t k, idx_t kk,
                               idx_t kcur, double* U, double* scr) noexcept nogil
ctypedef bint (*wino_input_d)(const wplan* p, const double* x, idx_t c0, idx_t c1, idx_t t0,
                              idx_t b0, idx_t nb, double* V, double* scr) noexcept nogil
ctypedef bint (*wino_output_d)(const wplan* p, const double* M, idx_t k0, idx_t kk0,
                               idx_t kk1, idx_t kcur, idx_t t0, idx_t b0, idx_t nb,
                               const double* bias, double* y, double* scr) noexcept nogil

ctypedef struct wino_kernels_t:
    wino_filter_s s_filter
    wino_input_s s_input
    wino_output_s s_output
    wino_filter_d d_filter
    wino_input_d d_input
    wino_output_d d_output
