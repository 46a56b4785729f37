"""Packing of GEMM operands into the micro-panels the micro-kernel reads.

Packing reads the operand once, straight from its strides, so transposed, Fortran-ordered,
strided and negatively strided inputs cost no extra copy.  The unit-stride cases have their
own loops because they are the common ones and the compiler vectorizes them.
"""
from libc.string cimport memcpy, memset

from microtile._typedefs cimport idx_t, floating


cdef void pack_a(idx_t mc, idx_t kc, const floating* a, idx_t rs_a, idx_t cs_a, int mr,
                 floating* dst) noexcept nogil:
    cdef idx_t ip, ip_i, p, rows
    cdef int i
    cdef const floating* src
    for ip_i in range((mc + mr - 1) // mr):
        ip = ip_i * mr
        rows = mc - ip if mc - ip < mr else mr
        src = a + ip * rs_a
        if rows == mr and rs_a == 1 and mr == 6:
            for p in range(kc):
                for i in range(6):
                    dst[p * 6 + i] = src[p * cs_a + i]
        elif rows == mr and rs_a == 1:
            for p in range(kc):
                memcpy(dst + p * mr, src + p * cs_a, mr * sizeof(floating))
        elif rows == mr and mr == 6:
            # Six rows read in lockstep: six sequential streams, contiguous writes.
            for p in range(kc):
                dst[p * 6 + 0] = src[p * cs_a]
                dst[p * 6 + 1] = src[rs_a + p * cs_a]
                dst[p * 6 + 2] = src[2 * rs_a + p * cs_a]
                dst[p * 6 + 3] = src[3 * rs_a + p * cs_a]
                dst[p * 6 + 4] = src[4 * rs_a + p * cs_a]
                dst[p * 6 + 5] = src[5 * rs_a + p * cs_a]
        else:
            for p in range(kc):
                for i in range(rows):
                    dst[p * mr + i] = src[i * rs_a + p * cs_a]
                for i in range(rows, mr):
                    dst[p * mr + i] = 0
        dst += mr * kc


cdef inline void _copy_rows16(idx_t kc, const floating* src, idx_t rs, floating* dst) noexcept nogil:
    cdef idx_t p
    cdef int j
    for p in range(kc):
        for j in range(16):
            dst[p * 16 + j] = src[p * rs + j]


cdef inline void _copy_rows8(idx_t kc, const floating* src, idx_t rs, floating* dst) noexcept nogil:
    cdef idx_t p
    cdef int j
    for p in range(kc):
        for j in range(8):
            dst[p * 8 + j] = src[p * rs + j]


cdef void pack_b(idx_t kc, idx_t nc, const floating* b, idx_t rs_b, idx_t cs_b, int nr,
                 floating* dst) noexcept nogil:
    cdef idx_t jp, jp_i, p, cols
    cdef int j
    cdef const floating* src
    for jp_i in range((nc + nr - 1) // nr):
        jp = jp_i * nr
        cols = nc - jp if nc - jp < nr else nr
        src = b + jp * cs_b
        if cs_b == 1:
            # Literal widths let the compiler copy each row with a few vector moves instead
            # of a memcpy call per 64 bytes.
            if cols == nr and nr == 16:
                _copy_rows16(kc, src, rs_b, dst)
            elif cols == nr and nr == 8:
                _copy_rows8(kc, src, rs_b, dst)
            elif cols == nr:
                for p in range(kc):
                    memcpy(dst + p * nr, src + p * rs_b, nr * sizeof(floating))
            else:
                for p in range(kc):
                    memcpy(dst + p * nr, src + p * rs_b, cols * sizeof(floating))
                    memset(dst + p * nr + cols, 0, (nr - cols) * sizeof(floating))
        elif rs_b == 1 and cols == nr:
            # Columns contiguous: read each column once, scatter with stride nr.
            for j in range(nr):
                for p in range(kc):
                    dst[p * nr + j] = src[j * cs_b + p]
        else:
            for p in range(kc):
                for j in range(cols):
                    dst[p * nr + j] = src[j * cs_b + p * rs_b]
                for j in range(cols, nr):
                    dst[p * nr + j] = 0
        dst += nr * kc
