# BatchNorm's per-plane loops (the C and the reasons in _bn_loops.h), and the table of the
# float32 ones that ``_norm_avx2`` hands to ``_norm_kernels`` (a capsule named
# "microtile.bn_f32").
from microtile._common._typedefs cimport idx_t

cdef extern from "_bn_loops.h":
    void mt_bn_sums_f(const float* x, const float* u, const float* g, double k, idx_t s,
                      double* out0, double* out1) noexcept nogil
    void mt_bn_sums_d(const double* x, const double* u, const double* g, double k, idx_t s,
                      double* out0, double* out1) noexcept nogil
    void mt_bn_affine_f(const float* x, const float* u, const float* g, float* out, double m,
                        double a, double b, double k, int relu, idx_t s) noexcept nogil
    void mt_bn_affine_d(const double* x, const double* u, const double* g, double* out,
                        double m, double a, double b, double k, int relu,
                        idx_t s) noexcept nogil

ctypedef void (*bn_sums_f_t)(const float* x, const float* u, const float* g, double k,
                             idx_t s, double* out0, double* out1) noexcept nogil
ctypedef void (*bn_affine_f_t)(const float* x, const float* u, const float* g, float* out,
                               double m, double a, double b, double k, int relu,
                               idx_t s) noexcept nogil

ctypedef struct bn_table_t:
    bn_sums_f_t sums_f          # the two sums of a float32 plane
    bn_affine_f_t affine_f      # the float32 affine write
