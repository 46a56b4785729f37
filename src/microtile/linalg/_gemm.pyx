"""The blocked GEMM driver: BLIS's five loops around the micro-kernel, and its threading.

    jc over nc columns of B  (B block kc x nc lives in L3)
      pc over kc of depth      (pack B's block into nr-column micro-panels)
        ic over mc rows of A    (pack A's block into mr-row micro-panels, L2)
          jr over nr columns    (one micro-panel of B stays in L1)
            ir over mr rows     (micro-kernel: mr x nr of C in registers)

Threading: work items (a block of rows x a chunk of columns, every pass over k) are claimed
from an atomic counter by whichever threads of microtile's pool are running (``_pool``), and
B's micro-panels are packed lazily into a shared buffer by the first thread that needs each.
There is no barrier: a thread that has lost its core does less of the work, and the caller
never waits for a helper that has not started (see ``_threaded``).  When there are too few
row blocks (small m, or split == "jc"), items also cut the jr loop.

Small problems and skinny operands skip packing: the general micro-kernel reads A at any
strides and B in place when its rows are contiguous, so only edge slivers are copied; so do
products of a few row panels when B's rows spread over L1's sets (see _make_plan).  A last
row panel of fewer than mr rows runs the kernel set's rows micro-kernel where it has one.

An epilogue (bias, activation) is applied to each tile right after its last rank-kc update,
while it is still in L1, which saves the separate pass over C that NumPy code would make.
"""
from libc.stdlib cimport calloc, free
from libc.stdint cimport int64_t, uint64_t
from libc.math cimport ceil, exp, tanh

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport ceil_div, imin, imax
from microtile._kernels._ukernel cimport (kernel_set_t, MAX_MR, MAX_NR, ukr_mr, ukr_nr, ukr_packed,
                                 ukr_gen, ukr_rows)
from microtile._kernels._dispatch cimport kernel_set
from microtile._config._params cimport current_params
from microtile.linalg._pack cimport pack_a, pack_b
from microtile.linalg._level2 cimport gemv_run
from microtile._common._mt_pool cimport pool_run, pool_items
from microtile._common._atomic64 cimport (mt_atomic_load64, mt_atomic_store64, mt_atomic_add64,
                                          mt_atomic_load64_acq, mt_atomic_store64_rel,
                                          mt_atomic_add64_rel, mt_atomic_cas64, mt_cpu_relax,
                                          mt_yield)
from microtile._common._interrupt cimport (signal_poll, caller_poll, poll_step, interrupted,
                                           INTERRUPTED)
from microtile._common._scratch cimport (scratch_get, scratch_trim, SCRATCH_PACK_A,
                                 SCRATCH_PACK_B, SCRATCH_EXTRA, SCRATCH_EXTRA2)


cdef inline floating _act(floating v, int act) noexcept nogil:
    cdef floating e
    if act == ACT_RELU:
        # NaN <= 0 is false, so NaN stays NaN (torch's relu(nan) is nan; max(v, 0) and
        # `v if v > 0 else 0` give 0).  One comparison: the loop stays a compare and blend.
        return 0 if v <= 0 else v
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
    cdef int act = ep.act
    cdef idx_t i, j
    cdef floating bv, v
    cdef floating* row
    cdef const floating* bj
    if bias == NULL and act == ACT_NONE:
        return
    if cs_c == 1 and (bias == NULL or (ep.bias_axis == 1 and ep.bias_inc == 1)):
        # The common case (nn.Linear): plain row loops the compiler vectorizes.
        bj = bias + col0 if bias != NULL else NULL
        for i in range(m):
            row = c + i * rs_c
            if bj != NULL:
                for j in range(n):
                    row[j] = row[j] + bj[j]
            if act == ACT_RELU:
                for j in range(n):
                    v = row[j]
                    row[j] = 0 if v <= 0 else v     # NaN kept, as in _act
            elif act != ACT_NONE:
                for j in range(n):
                    row[j] = _act(row[j], act)
        return
    if rs_c == 1 and (bias == NULL or (ep.bias_axis == 0 and ep.bias_inc == 1)):
        # The same with C column-major (a turned Linear at a small batch, see _gemm_at):
        # column loops over contiguous elements, one bias value per row.
        bj = bias + row0 if bias != NULL else NULL
        for j in range(n):
            row = c + j * cs_c
            if bj != NULL:
                for i in range(m):
                    row[i] = row[i] + bj[i]
            if act == ACT_RELU:
                for i in range(m):
                    v = row[i]
                    row[i] = 0 if v <= 0 else v
            elif act != ACT_NONE:
                for i in range(m):
                    row[i] = _act(row[i], act)
        return
    for i in range(m):
        for j in range(n):
            bv = 0
            if bias != NULL:
                bv = bias[(row0 + i) * ep.bias_inc] if ep.bias_axis == 0 else bias[(col0 + j) * ep.bias_inc]
            c[i * rs_c + j * cs_c] = _act(c[i * rs_c + j * cs_c] + bv, act)


cdef inline bint _no_product(idx_t m, idx_t n, idx_t k, floating alpha, floating beta,
                             floating* c, idx_t rs_c, idx_t cs_c,
                             const gemm_epilogue* ep) noexcept nogil:
    """The cases without a product, done here: C empty, or alpha == 0 or k == 0 (C =
    beta * C, then the epilogue).  True when it was one of them."""
    if m <= 0 or n <= 0:
        return True
    if alpha == 0 or k <= 0:
        _scale(m, n, beta, c, rs_c, cs_c)
        if ep != NULL:
            _epilogue(ep, 0, 0, m, n, c, rs_c, cs_c)
        return True
    return False


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
        nrr = imin(nr, nc - jr)
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
            mrr = imin(mr, mc - ir)
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
            elif nrr < nr or not ukr_rows(ks, kc, <int> mrr, ap, ars, acs, bp, brs, cp, rs_c,
                                          cs_c, alpha, beta):
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


# Work per threaded item: about 0.12 ms on one Zen3 core (80 GFLOP/s): the caller ends a call
# waiting for the last item a helper took, 0.3 ms per MLP step (11 calls) at this size, 0.6-0.8
# ms at twice it.
cdef double ITEM_FLOPS = 1e7
# Smallest item: rows in micro-panels, columns in micro-panels when items cut the columns
# (a 256-column chunk for float32: A's block, packed per item, is then reused 256 times).
cdef enum:
    # The bytes of one way of L1 (32 KiB in 8 ways, or 48 KiB in 12 on newer cores: 4 KiB
    # either way), where addresses this far apart share a set; at most 64 sets here.
    ALIAS_BYTES = 4096
    SPREAD_ROWS = 256       # rows of B a micro-panel holds, about (kc)
    # Row panels that read B in place when its rows spread over L1 (see _make_plan).  A/B
    # (alternating processes, medians), k = 1024 and n = 784, in place / packed time^-1:
    # float32 one thread 1.27 at m = 32, 1.20 at 48, 1.09-1.34 at 64 (two runs), 0.98 at
    # 96, 0.86 at 128 (each panel of B read in place serves 22 tiles and falls out of L1
    # between them); two threads 1.27 at 32 and 64.  float64 (A's panels twice as big in
    # L1 beside B's): 1.26 at 32, 0.93 at 48, 0.92-0.98 at 64.
    INPLACE_B_PANELS_F32 = 11
    INPLACE_B_PANELS_F64 = 6
    ITEM_MIN_PANELS = 8
    CHUNK_MIN_PANELS = 16
    # nopack_a_panels is measured (autotune) with A's rows contiguous.  Read in place, a
    # column-major A (the gradient GEMMs' dY^T) loads one line per k, lda apart -- a page
    # apart at lda 1024 -- and packing it pays from a few panels on whatever the profile
    # says: float32, lda 1600-2048, one thread, in place / packed GFLOP/s 1.20 at 2 panels,
    # 1.09 at 3, about 1.0 at 4, 0.90 at 8, 0.83 at 16 (the quick profile here said 32).
    COLMAJOR_A_PANELS = 4


ctypedef struct _plan:
    # How one call is cut up; fixed before the loops start.
    int nt              # threads in the team (1: the calling thread alone)
    bint a_packed       # A copied into mr-row panels, or read in place
    bint b_packed       # B copied into nr-column panels, or read in place (rows contiguous)
    idx_t mc, kc, nc    # block sizes, whole micro-panels
    idx_t item_rows     # rows of C per work item (a multiple of mr, at most mc)
    idx_t n_ic          # row blocks per call
    idx_t n_jr          # column chunks per block of nc columns (more than 1 when rows are few)


cdef inline bint _rows_spread(idx_t row_bytes) noexcept nogil:
    """Whether rows ``row_bytes`` apart (B read in place: one line per row of a micro-panel)
    fall in enough L1 sets to stay there together: at least half of the sets of an
    ALIAS_BYTES way over SPREAD_ROWS rows.  Rows a multiple of 4 KiB apart all land in one
    set (32x1024x784 in place ran at 0.81x its packed speed), 2 KiB apart in two, and
    4100 bytes apart (n = 1025 float32) drift through a set every 16 rows."""
    cdef idx_t sets = ALIAS_BYTES // 64, i
    cdef uint64_t seen = 0
    cdef int count = 0
    if row_bytes < 0:
        row_bytes = -row_bytes
    for i in range(SPREAD_ROWS):
        seen |= (<uint64_t> 1) << (((i * row_bytes) // 64) % sets)
    while seen:
        seen &= seen - 1
        count += 1
    return 2 * count >= sets


cdef void _make_plan(const gemm_params* prm, int nt, int mr, int nr, idx_t m, idx_t n, idx_t k,
                     idx_t cs_a, idx_t cs_b, idx_t rs_b, int itemsize,
                     _plan* pl) noexcept nogil:
    cdef bint small = <double> m * <double> n * <double> k <= prm.nopack_mnk
    cdef idx_t micro_rows, want, rows, n_pc
    cdef idx_t a_panels = prm.nopack_a_panels
    pl.nt = nt
    # B is read in place (rows contiguous) by small problems, by a few rows of A, and by
    # up to INPLACE_B_PANELS_* micro-panels of rows when B's rows fall in different L1 sets:
    # each micro-panel of B is then read once either way, and packing it first only adds
    # a write and a read of all of B.
    pl.b_packed = not (cs_b == 1 and (small or m <= 2 * mr
                                      or (ceil_div(m, mr) <= (INPLACE_B_PANELS_F32
                                                              if itemsize == 4
                                                              else INPLACE_B_PANELS_F64)
                                          and _rows_spread(rs_b * itemsize))))
    if cs_a != 1 and a_panels > COLMAJOR_A_PANELS:
        a_panels = COLMAJOR_A_PANELS
    pl.a_packed = not (small or n <= a_panels * nr)
    # Depth per pass: as many passes as k / kc rounded to nearest, split evenly, so that no
    # pass over C (each one reads and writes all of it) is spent on a thin remainder: k = 784
    # with kc = 256 makes three passes of 262 rather than four, the last of 16.
    n_pc = (k + prm.kc // 2) // prm.kc
    if n_pc < 1:
        n_pc = 1
    pl.kc = ceil_div(k, n_pc)
    pl.nc = ceil_div(imin(prm.nc, n), nr) * nr
    pl.mc = ceil_div(imin(prm.mc, m), mr) * mr
    pl.item_rows = pl.mc
    pl.n_jr = 1
    if nt > 1:
        # Enough items that a thread which loses its core holds little of the work: at least
        # three per thread, and none much over ITEM_FLOPS, since the caller ends the call
        # waiting for the last item a helper claimed.  Rows per item stay at least
        # ITEM_MIN_PANELS micro-panels (each B micro-panel is reused from L1 by every row
        # panel of an item); below that, items cut the columns instead.
        want = imax(3 * nt, <idx_t> (2.0 * m * n * k / ITEM_FLOPS))
        micro_rows = ceil_div(m, mr)
        rows = imax(ceil_div(micro_rows, want), imin(micro_rows, ITEM_MIN_PANELS)) * mr
        if rows < pl.item_rows:
            pl.item_rows = rows
        if prm.split == 2 or (prm.split == 0 and ceil_div(m, pl.item_rows) < want):
            pl.n_jr = imin(ceil_div(want, ceil_div(m, pl.item_rows)),
                           ceil_div(pl.nc, nr * (1 if prm.split == 2 else CHUNK_MIN_PANELS)))
            if pl.n_jr < 1:
                pl.n_jr = 1
    pl.n_ic = ceil_div(m, pl.item_rows)


cdef int _item(const kernel_set_t* ks, const _plan* pl, idx_t it, idx_t m, idx_t nc_cur,
               idx_t kc_cur, idx_t pc, idx_t jc, floating alpha,
               const floating* a, idx_t rs_a, idx_t cs_a,
               const floating* b, idx_t rs_b, const floating* bufB,
               floating beta_p, floating* c, idx_t rs_c, idx_t cs_c,
               const gemm_epilogue* ep) noexcept nogil:
    """One work item: rows [ic, ic + item_rows) x one chunk of the current nc columns.  Packs
    its block of A into this thread's buffer (or reads A in place) and runs the macro-kernel."""
    cdef int mr = ukr_mr(ks, a), nr = ukr_nr(ks, a)
    cdef idx_t ic = (it // pl.n_jr) * pl.item_rows
    cdef idx_t chunk = it % pl.n_jr
    cdef idx_t panels = ceil_div(nc_cur, nr)
    cdef idx_t per = ceil_div(panels, pl.n_jr)
    cdef idx_t jr0 = chunk * per * nr, jr1, mc_cur
    cdef floating* bufA = NULL
    cdef floating* edgeA = NULL
    cdef floating* edgeB = NULL
    cdef const floating* a_blk = a + ic * rs_a + pc * cs_a
    jr1 = imin(nc_cur, jr0 + per * nr)
    if ic >= m or jr0 >= jr1:
        return 0
    mc_cur = imin(pl.item_rows, m - ic)
    if pl.a_packed:
        bufA = <floating*> scratch_get(SCRATCH_PACK_A, pl.mc * pl.kc * sizeof(floating))
        if bufA == NULL:
            return -1
        pack_a(mc_cur, kc_cur, a_blk, rs_a, cs_a, mr, bufA)
    elif mc_cur % mr:
        edgeA = <floating*> scratch_get(SCRATCH_EXTRA, mr * pl.kc * sizeof(floating))
        if edgeA == NULL:
            return -1
        pack_a(mc_cur % mr, kc_cur, a_blk + (mc_cur - mc_cur % mr) * rs_a, rs_a, cs_a, mr,
               edgeA)
    if not pl.b_packed and (jr1 - jr0) % nr:
        edgeB = <floating*> scratch_get(SCRATCH_EXTRA2, nr * pl.kc * sizeof(floating))
        if edgeB == NULL:
            return -1
    _macro(ks, mc_cur, jr1 - jr0, kc_cur, alpha,
           bufA if pl.a_packed else a_blk, rs_a, cs_a, pl.a_packed, edgeA,
           bufB + jr0 * kc_cur if pl.b_packed else b + pc * rs_b + jc + jr0, rs_b,
           pl.b_packed, edgeB,
           beta_p, c + ic * rs_c + (jc + jr0) * cs_c, rs_c, cs_c,
           ep, ic, jc + jr0)
    return 0


cdef int _gemm_core(const gemm_params* prm, int nt, idx_t m, idx_t n, idx_t k, floating alpha,
                    const floating* a, idx_t rs_a, idx_t cs_a,
                    const floating* b, idx_t rs_b, idx_t cs_b,
                    floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                    const gemm_epilogue* ep) noexcept nogil:
    return _gemm_at(prm, nt, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c, rs_c,
                    cs_c, ep, False)


cdef int _gemm_at(const gemm_params* prm, int nt, idx_t m, idx_t n, idx_t k, floating alpha,
                  const floating* a, idx_t rs_a, idx_t cs_a,
                  const floating* b, idx_t rs_b, idx_t cs_b,
                  floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                  const gemm_epilogue* ep, bint turned) noexcept nogil:
    """The five loops.  On one thread, in BLIS's order with one packed block of B at a time;
    on more, work items on the thread pool (see ``_threaded``).  ``turned``: the problem
    was already transposed once (see below), and must not be turned back."""
    cdef const kernel_set_t* ks = kernel_set(prm.isa)
    cdef int mr = ukr_mr(ks, a), nr = ukr_nr(ks, a)
    cdef _plan pl
    cdef idx_t jc, pc, jc_i, pc_i, nc_cur, kc_cur, p, panels, it, n_items
    cdef floating beta_p
    cdef floating* bufB = NULL
    cdef const gemm_epilogue* ep_p
    cdef gemm_epilogue ep_t
    cdef signal_poll* poll = caller_poll()
    cdef int rc
    if _no_product(m, n, k, alpha, beta, c, rs_c, cs_c, ep):
        return 0
    if m == 1 or n == 1:
        return _vector_case(ks, nt, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c,
                            rs_c, cs_c, ep)
    # Transpose the problem (C^T = B^T A^T) when
    # - C is column-major: rows of C contiguous is what the kernel's write-back wants;
    # - A is short (m up to nopack_a_panels micro-panels of columns after the turn) and B
    #   column-major, as in a Linear layer's x @ W.T at a small batch: packing B = W.T
    #   means transposing all of W, as much work as the product when m is 32 (a third of a
    #   32 x 1024 x 784 product's time); turned, W is the A operand the kernel reads in
    #   place, and only x.T (k x m) is packed.  C^T is then written column by column.
    if not turned and ((cs_c != 1 and rs_c == 1)
                       or (rs_b == 1 and cs_b != 1 and cs_a == 1 and cs_c == 1 and m < n
                           and m <= prm.nopack_a_panels * nr)):
        if ep != NULL:
            ep_t = _transposed(ep)
            ep = &ep_t
        return _gemm_at(prm, nt, n, m, k, alpha, b, cs_b, rs_b, a, cs_a, rs_a, beta, c,
                        cs_c, rs_c, ep, True)
    if nt > 1 and (<double> m * <double> n * <double> k < prm.thread_mnk
                   or ceil_div(m, mr) * ceil_div(n, nr) < 2 * nt):
        nt = 1
    _make_plan(prm, nt, mr, nr, m, n, k, cs_a, cs_b, rs_b, sizeof(floating), &pl)
    n_items = pl.n_ic * pl.n_jr
    if nt == 1:
        if pl.b_packed:
            bufB = <floating*> scratch_get(SCRATCH_PACK_B, pl.kc * pl.nc * sizeof(floating))
            if bufB == NULL:
                return -1
        for jc_i in range(ceil_div(n, pl.nc)):
            jc = jc_i * pl.nc
            nc_cur = imin(pl.nc, n - jc)
            for pc_i in range(ceil_div(k, pl.kc)):
                pc = pc_i * pl.kc
                kc_cur = imin(pl.kc, k - pc)
                beta_p = beta if pc == 0 else 1
                ep_p = ep if pc + kc_cur >= k else NULL
                if pl.b_packed:
                    pack_b(kc_cur, nc_cur, b + pc * rs_b + jc * cs_b, rs_b, cs_b, nr, bufB)
                for it in range(n_items):
                    if poll_step(poll, 0):
                        scratch_trim()
                        return INTERRUPTED
                    if _item(ks, &pl, it, m, nc_cur, kc_cur, pc, jc, alpha, a, rs_a, cs_a,
                             b, rs_b, bufB, beta_p, c, rs_c, cs_c, ep_p) != 0:
                        scratch_trim()
                        return -1
        scratch_trim()
        return 0

    rc = _threaded(ks, prm, &pl, nt, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c,
                   rs_c, cs_c, ep, poll)
    scratch_trim()
    return rc


# The threaded driver.  Work items (a block of rows x a chunk of columns, every pass over k)
# are claimed from an atomic counter by whichever thread is running, so a helper the OS has
# not scheduled yet simply does no work; nothing waits for a given thread.  B is packed lazily
# into a shared buffer: the first thread whose item needs a micro-panel packs it (claimed with
# a compare-and-swap), the others wait only for a panel that is being packed right now.  The
# buffer holds every pass of up to two blocks of columns, so there is no phase for all
# threads to finish before the next begins: a thread starting block j waits only for the
# items of block j - 2, which were claimed earlier by threads that were running.

# Bytes of packed B per block of columns (all of k): two blocks sit in L3 with room for
# A's blocks and C; above it the columns are cut into more blocks.
cdef size_t B_BLOCK_BYTES = 8 * 1024 * 1024

ctypedef struct _job:
    const kernel_set_t* ks
    const _plan* pl
    idx_t m, n, k
    idx_t n_pc          # passes over k, pl.kc deep (the last may be shorter)
    idx_t nc_blk        # columns per block (whole micro-panels)
    idx_t panels_blk    # micro-panels per block
    int64_t per_blk     # items per block
    int64_t n_items
    int64_t next        # the next unclaimed item (atomic)
    int64_t* done       # items finished, per block (atomic)
    int64_t* flags      # per (block, pass, panel): 0 unpacked, 1 being packed, 2 ready
    void* bufB          # two slots of n_pc * kc * nc_blk elements
    idx_t slot_elems
    int n_slots
    bint dbl
    double alpha, beta  # exact for float32 too
    const void* a
    const void* b
    void* c
    idx_t rs_a, cs_a, rs_b, cs_b, rs_c, cs_c
    const gemm_epilogue* ep
    signal_poll* poll
    int64_t failed      # an item could not get scratch memory (atomic)


cdef inline void _pause() noexcept nogil:
    mt_cpu_relax()


cdef void _ensure_panels(_job* jb, int64_t* flags, idx_t q0, idx_t q1, idx_t kc_cur,
                         idx_t nc_cur, const floating* bsrc, floating* bblk) noexcept nogil:
    """Micro-panels q0..q1-1 of one pass of one block packed and visible to this thread."""
    cdef int nr = ukr_nr(jb.ks, bsrc)
    cdef idx_t q
    cdef int spins
    for q in range(q0, q1):
        if mt_atomic_load64_acq(&flags[q]) == 0 and mt_atomic_cas64(&flags[q], 0, 1):
            pack_b(kc_cur, imin(nr, nc_cur - q * nr), bsrc + q * nr * jb.cs_b, jb.rs_b,
                   jb.cs_b, nr, bblk + q * nr * kc_cur)
            mt_atomic_store64_rel(&flags[q], 2)
    for q in range(q0, q1):
        spins = 0
        while mt_atomic_load64_acq(&flags[q]) != 2:
            # Another thread is packing this panel now (a microsecond of work).
            spins += 1
            if spins < 4096:
                _pause()
            else:
                mt_yield()


cdef void _work(_job* jb, int tid, floating alpha, floating beta) noexcept nogil:
    cdef const _plan* pl = jb.pl
    cdef int nr = ukr_nr(jb.ks, &alpha)
    cdef const floating* a = <const floating*> jb.a
    cdef const floating* b = <const floating*> jb.b
    cdef floating* c = <floating*> jb.c
    cdef floating* slot
    cdef floating* bblk = NULL
    cdef const gemm_epilogue* ep_p
    cdef int64_t it, r, blk
    cdef idx_t jc, nc_cur, p, pc, kc_cur, panels, per, q0, q1, chunk
    cdef int spins
    cdef bint ok
    while True:
        if mt_atomic_load64(&jb.failed) or interrupted(jb.poll):
            return
        if tid == 0 and poll_step(jb.poll, 0):
            return
        it = mt_atomic_add64(&jb.next, 1)
        if it >= jb.n_items:
            return
        blk = it // jb.per_blk
        r = it % jb.per_blk
        if blk >= jb.n_slots:
            # The slot is reused: block blk - 2's items were all claimed before this one, by
            # threads that were running then; wait for them to finish.
            spins = 0
            while mt_atomic_load64_acq(&jb.done[blk - jb.n_slots]) < jb.per_blk:
                spins += 1
                if spins < 4096:
                    _pause()
                else:
                    mt_yield()
        jc = blk * jb.nc_blk
        nc_cur = imin(jb.nc_blk, jb.n - jc)
        slot = (<floating*> jb.bufB) + (blk % jb.n_slots) * jb.slot_elems
        panels = ceil_div(nc_cur, nr)
        per = ceil_div(panels, pl.n_jr)
        chunk = r % pl.n_jr
        q0 = chunk * per
        q1 = imin(panels, q0 + per)
        ok = True
        if (r // pl.n_jr) * pl.item_rows < jb.m and q0 < q1:
            for p in range(jb.n_pc):
                pc = p * pl.kc
                kc_cur = imin(pl.kc, jb.k - pc)
                ep_p = jb.ep if p == jb.n_pc - 1 else NULL
                if pl.b_packed:
                    bblk = slot + p * pl.kc * jb.nc_blk
                    _ensure_panels(jb, jb.flags + (blk * jb.n_pc + p) * jb.panels_blk,
                                   q0, q1, kc_cur, nc_cur, b + pc * jb.rs_b + jc * jb.cs_b, bblk)
                if _item(jb.ks, pl, r, jb.m, nc_cur, kc_cur, pc, jc, alpha, a, jb.rs_a,
                         jb.cs_a, b, jb.rs_b, bblk, beta if p == 0 else <floating> 1, c,
                         jb.rs_c, jb.cs_c, ep_p) != 0:
                    ok = False
                    break
        if not ok:
            mt_atomic_store64(&jb.failed, 1)
        # Counted even when it failed, so that no thread waits for it.
        mt_atomic_add64_rel(&jb.done[blk], 1)


cdef void _task(void* ctx, int tid) noexcept nogil:
    cdef _job* jb = <_job*> ctx
    if jb.dbl:
        _work[double](jb, tid, jb.alpha, jb.beta)
    else:
        _work[float](jb, tid, <float> jb.alpha, <float> jb.beta)
    if tid != 0:
        # A helper's own oversized scratch; the caller's holds B and is trimmed after the job.
        scratch_trim()


cdef int _threaded(const kernel_set_t* ks, const gemm_params* prm, const _plan* pl, int nt,
                   idx_t m, idx_t n, idx_t k, floating alpha,
                   const floating* a, idx_t rs_a, idx_t cs_a,
                   const floating* b, idx_t rs_b, idx_t cs_b,
                   floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                   const gemm_epilogue* ep, signal_poll* poll) noexcept nogil:
    cdef int nr = ukr_nr(ks, a)
    cdef _job jb
    cdef idx_t n_jc, nc_blk
    cdef size_t deep
    jb.ks = ks
    jb.pl = pl
    jb.m = m
    jb.n = n
    jb.k = k
    jb.n_pc = ceil_div(k, pl.kc)
    deep = <size_t> (jb.n_pc * pl.kc) * sizeof(floating)
    nc_blk = pl.nc
    if pl.b_packed and <size_t> nc_blk * deep > B_BLOCK_BYTES:
        nc_blk = imax(nr, <idx_t> (B_BLOCK_BYTES // deep) // nr * nr)
    jb.nc_blk = nc_blk
    jb.panels_blk = ceil_div(nc_blk, nr)
    n_jc = ceil_div(n, nc_blk)
    jb.per_blk = pl.n_ic * pl.n_jr
    jb.n_items = n_jc * jb.per_blk
    jb.next = 0
    jb.n_slots = 2 if n_jc > 1 else 1
    jb.slot_elems = jb.n_pc * pl.kc * nc_blk
    jb.dbl = floating is double
    jb.alpha = alpha
    jb.beta = beta
    jb.a = a
    jb.b = b
    jb.c = c
    jb.rs_a = rs_a
    jb.cs_a = cs_a
    jb.rs_b = rs_b
    jb.cs_b = cs_b
    jb.rs_c = rs_c
    jb.cs_c = cs_c
    jb.ep = ep
    jb.poll = poll
    jb.failed = 0
    jb.bufB = NULL
    jb.flags = NULL
    jb.done = <int64_t*> calloc(n_jc + (n_jc * jb.n_pc * jb.panels_blk if pl.b_packed else 0),
                                sizeof(int64_t))
    if jb.done == NULL:
        return -1
    jb.flags = jb.done + n_jc
    if pl.b_packed:
        jb.bufB = scratch_get(SCRATCH_PACK_B, jb.n_slots * jb.slot_elems * sizeof(floating))
        if jb.bufB == NULL:
            free(jb.done)
            return -1
    pool_run(nt, _task, &jb)
    free(jb.done)
    if jb.failed:
        return -1
    return INTERRUPTED if interrupted(poll) else 0


cdef int gemm_serial_ep(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                        const floating* a, idx_t rs_a, idx_t cs_a,
                        const floating* b, idx_t rs_b, idx_t cs_b,
                        floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                        const gemm_epilogue* ep) noexcept nogil:
    return _gemm_core(prm, 1, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c, rs_c,
                      cs_c, ep)


cdef int gemm_serial(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                     const floating* a, idx_t rs_a, idx_t cs_a,
                     const floating* b, idx_t rs_b, idx_t cs_b,
                     floating beta, floating* c, idx_t rs_c, idx_t cs_c) noexcept nogil:
    return _gemm_core(prm, 1, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c, rs_c,
                      cs_c, NULL)


cdef int gemm_run_ep(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                     const floating* a, idx_t rs_a, idx_t cs_a,
                     const floating* b, idx_t rs_b, idx_t cs_b,
                     floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                     const gemm_epilogue* ep) noexcept nogil:
    return _gemm_core(prm, prm.n_threads, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta,
                      c, rs_c, cs_c, ep)


cdef int gemm_run(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                  const floating* a, idx_t rs_a, idx_t cs_a,
                  const floating* b, idx_t rs_b, idx_t cs_b,
                  floating beta, floating* c, idx_t rs_c, idx_t cs_c) noexcept nogil:
    return _gemm_core(prm, prm.n_threads, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta,
                      c, rs_c, cs_c, NULL)


# -- B packed once -----------------------------------------------------------------------------
# A recurrent layer multiplies by the same weight at every step: packing it at each call
# copied the 256 x 1024 float32 W_hh 50 times per LSTM forward.  Packed once here, each
# product reads the panels as they are.

cdef int gemm_nr(const gemm_params* prm, const floating* tag) noexcept nogil:
    return ukr_nr(kernel_set(prm.isa), tag)


cdef int gemm_mr(const gemm_params* prm, const floating* tag) noexcept nogil:
    return ukr_mr(kernel_set(prm.isa), tag)


cdef idx_t gemm_packed_b_size(const gemm_params* prm, idx_t k, idx_t n,
                              const floating* tag) noexcept nogil:
    cdef idx_t nr = gemm_nr(prm, tag)
    return ceil_div(n, nr) * nr * k


cdef void gemm_pack_b_full(const gemm_params* prm, idx_t k, idx_t n, const floating* b,
                           idx_t rs_b, idx_t cs_b, floating* bp) noexcept nogil:
    if k > 0 and n > 0:
        pack_b(k, n, b, rs_b, cs_b, gemm_nr(prm, b), bp)


ctypedef struct _pp_job:
    const kernel_set_t* ks
    idx_t m, n, k
    idx_t item_rows     # rows of C per item (whole micro-panels)
    idx_t n_chunks      # column chunks per row block
    idx_t per           # micro-panels per chunk
    double alpha, beta  # exact for float32 too
    const void* a
    idx_t rs_a, cs_a
    const void* bp
    void* c
    idx_t rs_c, cs_c
    const gemm_epilogue* ep
    bint dbl
    int64_t failed      # an item could not get scratch memory (atomic)


cdef void _pp_run(_pp_job* jb, idx_t it, floating alpha, floating beta) noexcept nogil:
    cdef const kernel_set_t* ks = jb.ks
    cdef int mr = ukr_mr(ks, &alpha), nr = ukr_nr(ks, &alpha)
    cdef idx_t ic = (it // jb.n_chunks) * jb.item_rows
    cdef idx_t q0 = (it % jb.n_chunks) * jb.per
    cdef idx_t j0 = q0 * nr, j1 = imin(jb.n, (q0 + jb.per) * nr), mc
    cdef const floating* a = <const floating*> jb.a + ic * jb.rs_a
    cdef floating* edge = NULL
    if ic >= jb.m or j0 >= j1:
        return
    mc = imin(jb.item_rows, jb.m - ic)
    if mc % mr:
        edge = <floating*> scratch_get(SCRATCH_EXTRA, mr * jb.k * sizeof(floating))
        if edge == NULL:
            mt_atomic_store64(&jb.failed, 1)
            return
        pack_a(mc % mr, jb.k, a + (mc - mc % mr) * jb.rs_a, jb.rs_a, jb.cs_a, mr, edge)
    _macro(ks, mc, j1 - j0, jb.k, alpha, a, jb.rs_a, jb.cs_a, False, edge,
           <const floating*> jb.bp + j0 * jb.k, nr, True, NULL, beta,
           <floating*> jb.c + ic * jb.rs_c + j0 * jb.cs_c, jb.rs_c, jb.cs_c, jb.ep, ic, j0)


cdef void _pp_item(void* ctx, idx_t it, int tid) noexcept nogil:
    cdef _pp_job* jb = <_pp_job*> ctx
    if jb.dbl:
        _pp_run[double](jb, it, jb.alpha, jb.beta)
    else:
        _pp_run[float](jb, it, <float> jb.alpha, <float> jb.beta)


cdef int gemm_prepacked(const gemm_params* prm, idx_t m, idx_t n, idx_t k, floating alpha,
                        const floating* a, idx_t rs_a, idx_t cs_a, const floating* bp,
                        floating beta, floating* c, idx_t rs_c, idx_t cs_c,
                        const gemm_epilogue* ep) noexcept nogil:
    """Items of whole row panels x whole column panels on the pool, each run by ``_macro``
    with A in place (its last partial row panel packed into this thread's scratch)."""
    cdef const kernel_set_t* ks = kernel_set(prm.isa)
    cdef int mr = ukr_mr(ks, a), nr = ukr_nr(ks, a)
    cdef int nt = prm.n_threads
    cdef idx_t rp, cp, want, n_rows
    cdef _pp_job jb
    if _no_product(m, n, k, alpha, beta, c, rs_c, cs_c, ep):
        return 0
    rp = ceil_div(m, mr)
    cp = ceil_div(n, nr)
    if nt > 1 and (<double> m * <double> n * <double> k < prm.thread_mnk or rp * cp < 2 * nt):
        nt = 1
    # Four items per thread where the panels allow (the caller's wait for the last item a
    # helper took is then short), rows first (each B panel is reused by an item's rows).
    want = 4 * nt if nt > 1 else 1
    n_rows = imin(rp, want)
    jb.item_rows = ceil_div(rp, n_rows) * mr
    jb.n_chunks = imin(cp, ceil_div(want, ceil_div(rp, ceil_div(rp, n_rows))))
    jb.per = ceil_div(cp, jb.n_chunks)
    jb.n_chunks = ceil_div(cp, jb.per)
    jb.ks = ks
    jb.m = m
    jb.n = n
    jb.k = k
    jb.alpha = alpha
    jb.beta = beta
    jb.a = a
    jb.rs_a = rs_a
    jb.cs_a = cs_a
    jb.bp = bp
    jb.c = c
    jb.rs_c = rs_c
    jb.cs_c = cs_c
    jb.ep = ep
    jb.dbl = floating is double
    jb.failed = 0
    pool_items(nt, ceil_div(m, jb.item_rows) * jb.n_chunks, _pp_item, &jb)
    scratch_trim()
    return -1 if jb.failed else 0


def _prepacked_gemm(const floating[:, :] a, const floating[:, :] b, floating[:, :] c,
                    double alpha, double beta):
    """c = alpha * a @ b + beta * c through gemm_pack_b_full and gemm_prepacked (a private
    wrapper for the tests: any strides, the threads of the current params)."""
    cdef gemm_params prm
    cdef idx_t m = a.shape[0], k = a.shape[1], n = b.shape[1]
    cdef idx_t isz = sizeof(floating)
    cdef floating[::1] bp
    cdef int rc = 0
    cdef floating tag = 0
    if b.shape[0] != k or c.shape[0] != m or c.shape[1] != n:
        raise ValueError("_prepacked_gemm: shapes")
    current_params(0 if floating is float else 1, &prm)
    import numpy as np
    bp = np.empty(max(1, gemm_packed_b_size(&prm, k, n, &tag)),
                  np.float32 if floating is float else np.float64)
    if m == 0 or n == 0:
        return
    with nogil:
        if k:
            gemm_pack_b_full(&prm, k, n, &b[0, 0], b.strides[0] // isz, b.strides[1] // isz,
                             &bp[0])
        rc = gemm_prepacked(&prm, m, n, k, <floating> alpha,
                            &a[0, 0] if k else NULL, a.strides[0] // isz,
                            a.strides[1] // isz, &bp[0], <floating> beta, &c[0, 0],
                            c.strides[0] // isz, c.strides[1] // isz, NULL)
    if rc != 0:
        raise MemoryError("_prepacked_gemm")


def _b_read_in_place(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, Py_ssize_t rs_b, bint dbl):
    """For tests: whether a one-thread product of this shape reads B in place (rows rs_b
    elements apart, columns contiguous, A row-major) under the current parameters."""
    cdef gemm_params prm
    cdef _plan pl
    cdef const kernel_set_t* ks
    current_params(1 if dbl else 0, &prm)
    ks = kernel_set(prm.isa)
    _make_plan(&prm, 1, ks.d.mr if dbl else ks.s.mr, ks.d.nr if dbl else ks.s.nr, m, n, k, 1,
               1, rs_b, 8 if dbl else 4, &pl)
    return not pl.b_packed
