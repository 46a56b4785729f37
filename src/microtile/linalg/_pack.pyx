"""Packing of GEMM operands into the micro-panels the micro-kernel reads.

Packing reads the operand once, straight from its strides, so transposed, Fortran-ordered,
strided and negatively strided inputs cost no extra copy.  The unit-stride cases have their
own loops because they are the common ones and the compiler vectorizes them.
"""
from libc.string cimport memcpy, memset

from microtile._common._typedefs cimport idx_t, floating
from microtile._kernels._ukernel cimport copy_panels, gather_panel

cdef extern from "_pack_rows.h" nogil:
    void mt_pack_rows_f(float* dst, const float* src, idx_t rs, idx_t kc, int w)
    void mt_pack_rows_d(double* dst, const double* src, idx_t rs, idx_t kc, int w)


# Panels packed together, row by row (see pack_b).
cdef enum:
    _GROUP = 8


cdef void pack_a(idx_t mc, idx_t kc, const floating* a, idx_t rs_a, idx_t cs_a, int mr,
                 floating* dst) noexcept nogil:
    cdef idx_t ip, ip_i, p, rows
    cdef int i
    cdef const floating* src
    for ip_i in range((mc + mr - 1) // mr):
        ip = ip_i * mr
        rows = mc - ip if mc - ip < mr else mr
        src = a + ip * rs_a
        if rows == mr and rs_a == 1:
            copy_panels(dst, src, cs_a, kc, 0, 1, mr)
        elif rows == mr and cs_a == 1:
            # Rows contiguous (row-major A): transposed a few columns at a time in vector
            # registers (_pack_rows.h).
            if floating is float:
                mt_pack_rows_f(dst, src, rs_a, kc, mr)
            else:
                mt_pack_rows_d(dst, src, rs_a, kc, mr)
        elif rows == mr:
            gather_panel(dst, src, rs_a, cs_a, kc, mr)
        else:
            for p in range(kc):
                for i in range(rows):
                    dst[p * mr + i] = src[i * rs_a + p * cs_a]
                for i in range(rows, mr):
                    dst[p * mr + i] = 0
        dst += mr * kc


cdef void pack_b(idx_t kc, idx_t nc, const floating* b, idx_t rs_b, idx_t cs_b, int nr,
                 floating* dst) noexcept nogil:
    cdef idx_t g, g_end, full
    full = nc // nr
    if cs_b == 1:
        # Rows contiguous: a group of panels at a time, row by row, so each row's read is a
        # few consecutive cache lines the prefetcher follows, and each panel is written
        # sequentially.  Panel by panel instead reads one line per row at a large stride,
        # latency-bound (a tenth of a 256 x 4096 x 784 product).
        for g in range(0, (full + _GROUP - 1) // _GROUP):
            g_end = (g + 1) * _GROUP if (g + 1) * _GROUP < full else full
            copy_panels(dst, b, rs_b, kc, g * _GROUP, g_end, nr)
        if full * nr < nc:
            _pack_b_panels(kc, nc - full * nr, b + full * nr, rs_b, cs_b, nr, dst + full * nr * kc)
        return
    _pack_b_panels(kc, nc, b, rs_b, cs_b, nr, dst)


cdef void _pack_b_panels(idx_t kc, idx_t nc, const floating* b, idx_t rs_b, idx_t cs_b, int nr,
                         floating* dst) noexcept nogil:
    cdef idx_t jp, jp_i, p, cols
    cdef int j
    cdef const floating* src
    for jp_i in range((nc + nr - 1) // nr):
        jp = jp_i * nr
        cols = nc - jp if nc - jp < nr else nr
        src = b + jp * cs_b
        if cs_b == 1:
            if cols == nr:
                copy_panels(dst, src, rs_b, kc, 0, 1, nr)
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
