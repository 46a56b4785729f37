# im2col / col2im kernels: the lowering of a 2-D convolution to a GEMM.
#
# For one image, row k = (c * R + r) * S + s of the column matrix holds, for every output
# position (p, q), the input element x[c, p*sh - ph + r*dh, q*sw - pw + s*dw] (zero where
# that lies in the padding).  The kernels fill or read rows [k0, k1) (any range: whole
# channels, or a slice of one channel's taps when one channel's rows are too many for the
# workspace), numbered k - k0, and columns pq0..pq1, numbered pq - pq0.
from microtile._common._typedefs cimport idx_t, floating

ctypedef struct conv_geom:
    idx_t H, W          # input plane
    idx_t R, S          # kernel
    idx_t sh, sw        # stride
    idx_t ph, pw        # top and left padding (bottom/right follow from P, Q)
    idx_t dh, dw        # dilation
    idx_t P, Q          # output plane

# Fill rows [k0, k1) and columns [pq0, pq1) of `cols` (row stride ld).
# x points at channel 0 of one image; xs_* are element strides (any sign).
cdef void im2col_rows(const conv_geom* g, const floating* x, idx_t xs_c, idx_t xs_h,
                      idx_t xs_w, idx_t k0, idx_t k1, idx_t pq0, idx_t pq1,
                      floating* cols, idx_t ld) noexcept nogil

# The adjoint: add those rows of `cols` back into dx (overlapping windows summed).  Two
# calls race only when they touch the same channel of the same image.
cdef void col2im_rows(const conv_geom* g, const floating* cols, idx_t ld, idx_t k0, idx_t k1,
                      idx_t pq0, idx_t pq1, floating* dx, idx_t xs_c, idx_t xs_h,
                      idx_t xs_w) noexcept nogil
