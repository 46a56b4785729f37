from microtile._common._typedefs cimport idx_t, floating

# Copy an mc x kc block of A (any strides) into micro-panels of mr rows: panel i holds
# kc columns of mr contiguous elements; rows past mc are zero.
cdef void pack_a(idx_t mc, idx_t kc, const floating* a, idx_t rs_a, idx_t cs_a, int mr,
                 floating* dst) noexcept nogil

# Copy a kc x nc block of B (any strides) into micro-panels of nr columns: panel j holds
# kc rows of nr contiguous elements; columns past nc are zero.
cdef void pack_b(idx_t kc, idx_t nc, const floating* b, idx_t rs_b, idx_t cs_b, int nr,
                 floating* dst) noexcept nogil
