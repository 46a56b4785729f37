"""The blocked GEMM driver: BLIS's five loops around the micro-kernel, and its threading.

    jc over nc columns of B  (B block kc x nc lives in L3)
      pc over kc of depth      (pack B's block into nr-column micro-panels)
        ic over mc rows of A    (pack A's block into mr-row micro-panels, L2)
          jr over nr columns    (one micro-panel of B stays in L1)
            ir over mr rows     (micro-kernel: mr x nr of C in registers)

Threading: the m x n output is cut into a grid of tm x tn sub-blocks, one per thread, and each
thread runs the five loops on its own sub-block with its own packing buffers, so one parallel
region serves the whole call and no thread ever waits on another (Cython has no barrier).
tn > 1 parallelises the jc/jr loops (threads pack disjoint parts of B between them), tm > 1
the ic loop (each thread packs the B panels it reads).  The grid is chosen to minimise the
largest thread's work, padded tiles and packing included.

Small problems and skinny operands skip packing: the general micro-kernel reads A at any
strides and B in place when its rows are contiguous, so only edge slivers are copied.

An epilogue (bias, activation) is applied to each tile right after its last rank-kc update,
while it is still in L1, which saves the separate pass over C that NumPy code would make.
"""
from cython.parallel cimport prange
from libc.math cimport ceil, exp, tanh

from microtile._typedefs cimport idx_t, floating
from microtile._ukernel cimport (kernel_set_t, MAX_MR, MAX_NR, ukr_mr, ukr_nr, ukr_packed,
                                 ukr_gen)
from microtile._dispatch cimport kernel_set
from microtile._pack cimport pack_a, pack_b
from microtile._level2 cimport gemv_run
from microtile._scratch cimport (scratch_get, SCRATCH_PACK_A, SCRATCH_PACK_B,
                                 SCRATCH_EXTRA, SCRATCH_EXTRA2)


cdef inline idx_t _min(idx_t a, idx_t b) noexcept nogil:
    return a if a < b else b


cdef inline idx_t _ceil_div(idx_t a, idx_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline floating _act(floating v, int act) noexcept nogil:
    cdef floating e
    if act == ACT_RELU:
        # v > 0 keeps NaN as NaN (max(v, 0) would not).
        return v if (v > 0 or v != v) else 0
    if act == ACT_SIGMOID:
        # Never exponentiates a positive number: no overflow for large |v|.
        if v >= 0:
            return 1 / (1 + exp(-v))
        e = exp(v)
        return e / (1 + e)
    if act == ACT_TANH:
        return tanh(v)
    return v


cdef void _epilogue(const gemm_epilogue* ep, idx_t row0, idx_t col0, idx_t m, idx_t n,
                    floating* c, idx_t rs_c, idx_t cs_c) noexcept nogil:
    """C[0:m, 0:n] = act(C + bias) for the tile whose top-left is (row0, col0) of the call."""
    cdef const floating* bias = <const floating*> ep.bias
    cdef idx_t i, j
    cdef floating bv
    for i in range(m):
        for j in range(n):
            bv = 0
            if bias != NULL:
                bv = bias[(row0 + i) * ep.bias_inc] if ep.bias_axis == 0 else bias[(col0 + j) * ep.bias_inc]
            c[i * rs_c + j * cs_c] = _act(c[i * rs_c + j * cs_c] + bv, ep.act)


cdef void _scale(idx_t m, idx_t n, floating beta, floating* c, idx_t rs_c,
                 idx_t cs_c) noexcept nogil:
    """C = beta * C, with beta == 0 writing zeros without reading C (BLAS semantics)."""
    cdef idx_t i, j
    if beta == 1:
        return
    for i in range(m):
        if beta == 0:
            for j in range(n):
                c[i * rs_c + j * cs_c] = 0
        else:
            for j in range(n):
                c[i * rs_c + j * cs_c] = beta * c[i * rs_c + j * cs_c]


cdef inline void _edge_tile(const kernel_set_t* ks, idx_t kc, const floating* ap, idx_t ars,
                            idx_t acs, const floating* bp, idx_t brs, idx_t mrr, idx_t nrr,
                            floating alpha, floating beta, floating* c, idx_t rs_c,
                            idx_t cs_c) noexcept nogil:
    """A partial tile: the kernel writes a full tile into a local buffer, then the valid part
    is merged into C, so no element outside C is ever touched."""
    cdef floating tmp[MAX_MR * MAX_NR]
    cdef int nr = ukr_nr(ks, ap)
    cdef idx_t i, j
    ukr_gen(ks, kc, ap, ars, acs, bp, brs, tmp, nr, 1, <floating> 1, <floating> 0)
    for i in range(mrr):
        if beta == 0:
            for j in range(nrr):
                c[i * rs_c + j * cs_c] = alpha * tmp[i * nr + j]
        else:
            for j in range(nrr):
                c[i * rs_c + j * cs_c] = alpha * tmp[i * nr + j] + beta * c[i * rs_c + j * cs_c]


cdef void _macro(const kernel_set_t* ks, idx_t mc, idx_t nc, idx_t kc, floating alpha,
                 const floating* a, idx_t rs_a, idx_t cs_a, bint a_packed,
                 const floating* a_edge,
                 const floating* b, idx_t rs_b, bint b_packed, floating* b_edge,
                 floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                 const gemm_epilogue* ep, idx_t row0, idx_t col0) noexcept nogil:
    """The jr and ir loops over one block.  A packed: `a` holds mr-row panels.  A in place:
    `a` at strides (rs_a, cs_a), and `a_edge` the last partial row panel, packed.  B packed:
    `b` holds nr-column panels.  B in place: rows rs_b apart, columns contiguous; the last
    partial column panel is packed into `b_edge` here.  `ep` (or NULL) is applied to each
    tile; (row0, col0) is the block's place in the call's C, for the bias."""
    cdef int mr = ukr_mr(ks, a), nr = ukr_nr(ks, a)
    cdef idx_t jr, ir, jr_i, ir_i, mrr, nrr, ars, acs, brs
    cdef const floating* ap
    cdef const floating* bp
    cdef floating* cp
    for jr_i in range((nc + nr - 1) // nr):
        jr = jr_i * nr
        nrr = _min(nr, nc - jr)
        if b_packed:
            bp = b + jr * kc
            brs = nr
        elif nrr == nr:
            bp = b + jr
            brs = rs_b
        else:
            pack_b(kc, nrr, b + jr, rs_b, 1, nr, b_edge)
            bp = b_edge
            brs = nr
        for ir_i in range((mc + mr - 1) // mr):
            ir = ir_i * mr
            mrr = _min(mr, mc - ir)
            if a_packed:
                ap = a + ir * kc
                ars = 1
                acs = mr
            elif mrr == mr:
                ap = a + ir * rs_a
                ars = rs_a
                acs = cs_a
            else:
                ap = a_edge
                ars = 1
                acs = mr
            cp = c + ir * rs_c + jr * cs_c
            if mrr == mr and nrr == nr:
                if a_packed and b_packed:
                    ukr_packed(ks, kc, ap, bp, cp, rs_c, cs_c, alpha, beta)
                else:
                    ukr_gen(ks, kc, ap, ars, acs, bp, brs, cp, rs_c, cs_c, alpha, beta)
            else:
                _edge_tile(ks, kc, ap, ars, acs, bp, brs, mrr, nrr, alpha, beta, cp, rs_c, cs_c)
            if ep != NULL:
                _epilogue(ep, row0 + ir, col0 + jr, mrr, nrr, cp, rs_c, cs_c)


cdef inline gemm_epilogue _transposed(const gemm_epilogue* ep) noexcept nogil:
    cdef gemm_epilogue t = ep[0]
    t.bias_axis = 1 - t.bias_axis
    return t


cdef int _vector_case(const kernel_set_t* ks, int nt, idx_t m, idx_t n, idx_t k,
                      floating alpha, const floating* a, idx_t rs_a, idx_t cs_a,
                      const floating* b, idx_t rs_b, idx_t cs_b, floating beta, floating* c,
                      idx_t rs_c, idx_t cs_c, const gemm_epilogue* ep) noexcept nogil:
    """m == 1 or n == 1: a matrix-vector product (a tile would be mostly padding)."""
    cdef int rc
    if n == 1:
        rc = gemv_run(ks, nt, m, k, alpha, a, rs_a, cs_a, b, rs_b, beta, c, rs_c)
    else:
        rc = gemv_run(ks, nt, n, k, alpha, b, cs_b, rs_b, a, cs_a, beta, c, cs_c)
    if rc == 0 and ep != NULL:
        _epilogue(ep, 0, 0, m, n, c, rs_c, cs_c)
    return rc


cdef int gemm_serial_ep(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                        const floating* a, idx_t rs_a, idx_t cs_a,
                        const floating* b, idx_t rs_b, idx_t cs_b,
                        floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                        const gemm_epilogue* ep) noexcept nogil:
    cdef const kernel_set_t* ks = kernel_set(prm.isa)
    cdef int mr = ukr_mr(ks, a), nr = ukr_nr(ks, a)
    cdef idx_t mc, kc, nc, jc, pc, ic, jc_i, pc_i, ic_i, nc_cur, kc_cur, mc_cur
    cdef floating beta_p
    cdef floating* bufA = NULL
    cdef floating* bufB = NULL
    cdef floating* edgeA = NULL
    cdef floating* edgeB = NULL
    cdef bint small, a_packed, b_packed
    cdef gemm_epilogue ep_t
    if m <= 0 or n <= 0:
        return 0
    if alpha == 0 or k <= 0:
        _scale(m, n, beta, c, rs_c, cs_c)
        if ep != NULL:
            _epilogue(ep, 0, 0, m, n, c, rs_c, cs_c)
        return 0
    if m == 1 or n == 1:
        return _vector_case(ks, 1, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c,
                            rs_c, cs_c, ep)
    # Rows of C contiguous is what the kernel's write-back wants; transpose the problem
    # (C^T = B^T A^T) when C is column-major.
    if cs_c != 1 and rs_c == 1:
        if ep != NULL:
            ep_t = _transposed(ep)
            ep = &ep_t
        return gemm_serial_ep(prm, n, m, k, alpha, b, cs_b, rs_b, a, cs_a, rs_a, beta, c,
                              cs_c, rs_c, ep)

    small = <double> m * <double> n * <double> k <= prm.nopack_mnk
    b_packed = not (cs_b == 1 and (small or m <= 2 * mr))
    a_packed = not (small or n <= prm.nopack_a_panels * nr)
    mc = _min(prm.mc, m)
    kc = _min(prm.kc, k)
    nc = _min(prm.nc, n)
    # Whole micro-panels (a tuner may propose any value).
    mc = _ceil_div(mc, mr) * mr
    nc = _ceil_div(nc, nr) * nr

    if a_packed:
        bufA = <floating*> scratch_get(SCRATCH_PACK_A, mc * kc * sizeof(floating))
        if bufA == NULL:
            return -1
    elif m % mr:
        edgeA = <floating*> scratch_get(SCRATCH_EXTRA, mr * kc * sizeof(floating))
        if edgeA == NULL:
            return -1
    if b_packed:
        bufB = <floating*> scratch_get(SCRATCH_PACK_B, kc * nc * sizeof(floating))
        if bufB == NULL:
            return -1
    elif n % nr:
        edgeB = <floating*> scratch_get(SCRATCH_EXTRA2, nr * kc * sizeof(floating))
        if edgeB == NULL:
            return -1

    for jc_i in range((n + nc - 1) // nc):
        jc = jc_i * nc
        nc_cur = _min(nc, n - jc)
        for pc_i in range((k + kc - 1) // kc):
            pc = pc_i * kc
            kc_cur = _min(kc, k - pc)
            beta_p = beta if pc == 0 else 1
            if b_packed:
                pack_b(kc_cur, nc_cur, b + pc * rs_b + jc * cs_b, rs_b, cs_b, nr, bufB)
            for ic_i in range((m + mc - 1) // mc):
                ic = ic_i * mc
                mc_cur = _min(mc, m - ic)
                if a_packed:
                    pack_a(mc_cur, kc_cur, a + ic * rs_a + pc * cs_a, rs_a, cs_a, mr, bufA)
                elif mc_cur % mr:
                    pack_a(mc_cur % mr, kc_cur,
                           a + (ic + mc_cur - mc_cur % mr) * rs_a + pc * cs_a,
                           rs_a, cs_a, mr, edgeA)
                _macro(ks, mc_cur, nc_cur, kc_cur, alpha,
                       bufA if a_packed else a + ic * rs_a + pc * cs_a, rs_a, cs_a, a_packed,
                       edgeA,
                       bufB if b_packed else b + pc * rs_b + jc, rs_b, b_packed, edgeB,
                       beta_p, c + ic * rs_c + jc * cs_c, rs_c, cs_c,
                       ep if pc + kc_cur >= k else NULL, ic, jc)
    return 0


cdef int gemm_serial(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                     const floating* a, idx_t rs_a, idx_t cs_a,
                     const floating* b, idx_t rs_b, idx_t cs_b,
                     floating beta, floating* c, idx_t rs_c, idx_t cs_c) noexcept nogil:
    return gemm_serial_ep(prm, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c,
                          rs_c, cs_c, NULL)


cdef void _choose_grid(idx_t m, idx_t n, idx_t k, int nt, int mr, int nr, idx_t nc, int split,
                       int* tm_out, int* tn_out) noexcept nogil:
    """Pick tm x tn == nt minimising the busiest thread's cost: its padded tiles, plus the
    packing it does (each thread packs A for its rows once per nc block, B for its columns)."""
    cdef int tm, tn, best_tm = nt, best_tn = 1
    cdef double rows, cols, cost, best = -1
    for tm in range(1, nt + 1):
        if nt % tm:
            continue
        tn = nt // tm
        if (split == 1 and tn != 1) or (split == 2 and tm != 1):
            continue
        rows = ceil(ceil(<double> m / mr) / tm) * mr
        cols = ceil(ceil(<double> n / nr) / tn) * nr
        # About eight multiply-adds' time per element packed (copy plus scattered store).
        cost = rows * cols + 8.0 * (rows * ceil(cols / nc) + cols)
        if best < 0 or cost < best:
            best = cost
            best_tm = tm
            best_tn = tn
    tm_out[0] = best_tm
    tn_out[0] = best_tn


cdef int gemm_run_ep(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                     const floating* a, idx_t rs_a, idx_t cs_a,
                     const floating* b, idx_t rs_b, idx_t cs_b,
                     floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                     const gemm_epilogue* ep) noexcept nogil:
    cdef const kernel_set_t* ks = kernel_set(prm.isa)
    cdef int mr = ukr_mr(ks, a), nr = ukr_nr(ks, a)
    cdef int nt = prm.n_threads, tm = 1, tn = 1, tid, fails = 0
    cdef idx_t tiles, rows_per, cols_per, r0, r1, c0, c1
    cdef gemm_epilogue ep_t
    if m <= 0 or n <= 0 or alpha == 0 or k <= 0:
        return gemm_serial_ep(prm, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c,
                              rs_c, cs_c, ep)
    if m == 1 or n == 1:
        return _vector_case(ks, nt, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c,
                            rs_c, cs_c, ep)
    if cs_c != 1 and rs_c == 1:
        if ep != NULL:
            ep_t = _transposed(ep)
            ep = &ep_t
        return gemm_run_ep(prm, n, m, k, alpha, b, cs_b, rs_b, a, cs_a, rs_a, beta, c, cs_c,
                           rs_c, ep)
    tiles = _ceil_div(m, mr) * _ceil_div(n, nr)
    if <double> m * <double> n * <double> k < prm.thread_mnk:
        nt = 1
    if nt > tiles:
        nt = <int> tiles
    if nt <= 1:
        return gemm_serial_ep(prm, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c,
                              rs_c, cs_c, ep)
    _choose_grid(m, n, k, nt, mr, nr, prm.nc, prm.split, &tm, &tn)
    rows_per = _ceil_div(_ceil_div(m, mr), tm) * mr
    cols_per = _ceil_div(_ceil_div(n, nr), tn) * nr
    for tid in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        r0 = (tid // tn) * rows_per
        c0 = (tid % tn) * cols_per
        r1 = _min(m, r0 + rows_per)
        c1 = _min(n, c0 + cols_per)
        if r0 < r1 and c0 < c1:
            fails += _run_block(prm, r0, r1, c0, c1, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b,
                                beta, c, rs_c, cs_c, ep) != 0
    return -1 if fails else 0


cdef int _run_block(const gemm_params* prm, idx_t r0, idx_t r1, idx_t c0, idx_t c1, idx_t k,
                    floating alpha, const floating* a, idx_t rs_a, idx_t cs_a,
                    const floating* b, idx_t rs_b, idx_t cs_b, floating beta, floating* c,
                    idx_t rs_c, idx_t cs_c, const gemm_epilogue* ep) noexcept nogil:
    """One thread's sub-block C[r0:r1, c0:c1], its bias moved along with it."""
    cdef gemm_epilogue sub
    if ep != NULL:
        sub = ep[0]
        if sub.bias != NULL:
            if sub.bias_axis == 0:
                sub.bias = (<const floating*> sub.bias) + r0 * sub.bias_inc
            else:
                sub.bias = (<const floating*> sub.bias) + c0 * sub.bias_inc
        ep = &sub
    return gemm_serial_ep(prm, r1 - r0, c1 - c0, k, alpha, a + r0 * rs_a, rs_a, cs_a,
                          b + c0 * cs_b, rs_b, cs_b, beta, c + r0 * rs_c + c0 * cs_c,
                          rs_c, cs_c, ep)


cdef int gemm_run(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                  const floating* a, idx_t rs_a, idx_t cs_a,
                  const floating* b, idx_t rs_b, idx_t cs_b,
                  floating beta, floating* c, idx_t rs_c, idx_t cs_c) noexcept nogil:
    return gemm_run_ep(prm, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c, rs_c,
                       cs_c, NULL)
