from microtile._common._typedefs cimport idx_t

# Each thread's share when n elements are split over nt threads: a multiple of 16 elements, so
# shares start on whole vectors and cache lines.  Thread t takes [t * chunk, min(n, ...)).
cdef inline idx_t mt_share(idx_t n, int nt) noexcept nogil:
    return ((n + nt - 1) // nt + 15) & ~(<idx_t> 15)


cdef inline idx_t mt_share_end(idx_t t0, idx_t chunk, idx_t n) noexcept nogil:
    return t0 + chunk if t0 + chunk < n else n
