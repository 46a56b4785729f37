"""The blocked GEMM driver: BLIS's five loops around the micro-kernel, and its threading.

    jc over nc columns of B  (B block kc x nc lives in L3)
      pc over kc of depth      (pack B's block into nr-column micro-panels)
        ic over mc rows of A    (pack A's block into mr-row micro-panels, L2)
          jr over nr columns    (one micro-panel of B stays in L1)
            ir over mr rows     (micro-kernel: mr x nr of C in registers)

Threading (BLIS's way): for each (jc, pc) step the team packs B's block cooperatively into one
shared buffer, then takes work items of the ic loop dynamically, each thread packing its A
block into its own buffer.  Items are small enough that there are several per thread, so a
thread that loses its core for a while does less of the work instead of holding up the call.
When there are too few row blocks (small m, or split == "jc"), items also cut the jr loop.
The whole call is one parallel region; Cython's worksharing loops inside it do not wait for
each other, so an OpenMP barrier (``_mt_openmp.mt_barrier``) separates the phases.

Small problems and skinny operands skip packing: the general micro-kernel reads A at any
strides and B in place when its rows are contiguous, so only edge slivers are copied.

An epilogue (bias, activation) is applied to each tile right after its last rank-kc update,
while it is still in L1, which saves the separate pass over C that NumPy code would make.
"""
from cython.parallel cimport prange, parallel
from libc.stdlib cimport calloc, free
from libc.stdint cimport int64_t
from libc.math cimport ceil, exp, tanh

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport ceil_div, imin
from microtile._kernels._ukernel cimport (kernel_set_t, MAX_MR, MAX_NR, ukr_mr, ukr_nr, ukr_packed,
                                 ukr_gen)
from microtile._kernels._dispatch cimport kernel_set
from microtile.linalg._pack cimport pack_a, pack_b
from microtile.linalg._level2 cimport gemv_run
from microtile._common._mt_openmp cimport mt_thread_num, mt_barrier
from microtile._common._atomic64 cimport mt_atomic_load64, mt_atomic_store64
from microtile._common._clock cimport mt_now, mt_now_ns
from microtile._common._interrupt cimport (signal_poll, caller_poll, poll_step, stop_before,
                                           interrupted, INTERRUPTED)
from microtile._common._scratch cimport (scratch_get, scratch_trim, SCRATCH_PACK_A,
                                 SCRATCH_PACK_B, SCRATCH_EXTRA, SCRATCH_EXTRA2)


# Threaded calls longer than the late limit whose team was idle over half the time back off
# to one thread for the back-off time, doubling up to BACKOFF_MAX_NS (see _note_contention).
# Every calling thread reads and writes this state without a lock, so each is a 64-bit
# integer of nanoseconds accessed atomically (relaxed): no torn values, no data race.  Two
# nearly simultaneous calls may still both double the back-off; that only changes which of
# them backs off, as intended.
cdef int64_t BACKOFF_MAX_NS = 2000000000
cdef int64_t _late_ns = 200000              # 200 us
cdef int64_t _backoff_base_ns = 50000000    # 50 ms
cdef int64_t _backoff_ns = 50000000         # the next back-off's length
cdef int64_t _solo_until_ns = 0             # calls run on one thread until then


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
    for i in range(m):
        for j in range(n):
            bv = 0
            if bias != NULL:
                bv = bias[(row0 + i) * ep.bias_inc] if ep.bias_axis == 0 else bias[(col0 + j) * ep.bias_inc]
            c[i * rs_c + j * cs_c] = _act(c[i * rs_c + j * cs_c] + bv, act)


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


ctypedef struct _plan:
    # How one call is cut up; fixed before the loops start.
    int nt              # threads in the team (1: the calling thread alone)
    bint a_packed       # A copied into mr-row panels, or read in place
    bint b_packed       # B copied into nr-column panels, or read in place (rows contiguous)
    idx_t mc, kc, nc    # block sizes, whole micro-panels
    idx_t item_rows     # rows of C per work item (a multiple of mr, at most mc)
    idx_t n_ic          # row blocks per call
    idx_t n_jr          # column chunks per block of nc columns (more than 1 when rows are few)


cdef void _make_plan(const gemm_params* prm, int nt, int mr, int nr, idx_t m, idx_t n, idx_t k,
                     idx_t cs_b, _plan* pl) noexcept nogil:
    cdef bint small = <double> m * <double> n * <double> k <= prm.nopack_mnk
    cdef idx_t micro_rows, want, rows, n_pc
    pl.nt = nt
    pl.b_packed = not (cs_b == 1 and (small or m <= 2 * mr))
    pl.a_packed = not (small or n <= prm.nopack_a_panels * nr)
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
        # Three items per thread or more, handed out dynamically, so a thread that loses its
        # core for a while (another library's spinning workers, a noisy neighbour) does less.
        micro_rows = ceil_div(m, mr)
        want = 3 * nt
        rows = ceil_div(micro_rows, want) * mr
        if rows < pl.item_rows:
            pl.item_rows = rows if rows >= mr else mr
        if prm.split == 2 or (prm.split == 0 and ceil_div(m, pl.item_rows) < want):
            pl.n_jr = imin(ceil_div(want, ceil_div(m, pl.item_rows)), ceil_div(pl.nc, nr))
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
    """The five loops.  One parallel region per call: for each (jc, pc) step the team packs
    B's block into one shared buffer (a static worksharing loop, which Cython emits without
    its implicit barrier, so ``mt_barrier`` ends the phase), then takes the ic/jr work items
    dynamically, and a second barrier keeps B's buffer until every item is done.  With
    nt == 1 no region is opened."""
    cdef const kernel_set_t* ks = kernel_set(prm.isa)
    cdef int mr = ukr_mr(ks, a), nr = ukr_nr(ks, a)
    cdef _plan pl
    cdef idx_t jc, pc, jc_i, pc_i, nc_cur, kc_cur, p, panels, it, n_items
    cdef floating beta_p
    cdef floating* bufB = NULL
    cdef const gemm_epilogue* ep_p
    cdef gemm_epilogue ep_t
    cdef int tid, fails = 0
    cdef double* entered
    cdef double t_call, t_work
    cdef signal_poll* poll = caller_poll()
    cdef int64_t step
    cdef bint quit
    if m <= 0 or n <= 0:
        return 0
    if alpha == 0 or k <= 0:
        _scale(m, n, beta, c, rs_c, cs_c)
        if ep != NULL:
            _epilogue(ep, 0, 0, m, n, c, rs_c, cs_c)
        return 0
    if m == 1 or n == 1:
        return _vector_case(ks, nt, m, n, k, alpha, a, rs_a, cs_a, b, rs_b, cs_b, beta, c,
                            rs_c, cs_c, ep)
    # Rows of C contiguous is what the kernel's write-back wants; transpose the problem
    # (C^T = B^T A^T) when C is column-major.
    if cs_c != 1 and rs_c == 1:
        if ep != NULL:
            ep_t = _transposed(ep)
            ep = &ep_t
        return _gemm_core(prm, nt, n, m, k, alpha, b, cs_b, rs_b, a, cs_a, rs_a, beta, c,
                          cs_c, rs_c, ep)
    if nt > 1 and (<double> m * <double> n * <double> k < prm.thread_mnk
                   or ceil_div(m, mr) * ceil_div(n, nr) < 2 * nt
                   or mt_now_ns() < mt_atomic_load64(&_solo_until_ns)):
        nt = 1
    _make_plan(prm, nt, mr, nr, m, n, k, cs_b, &pl)
    if pl.b_packed:
        bufB = <floating*> scratch_get(SCRATCH_PACK_B, pl.kc * pl.nc * sizeof(floating))
        if bufB == NULL:
            return -1
    n_items = pl.n_ic * pl.n_jr
    if nt == 1:
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

    # Per thread: when it entered the region, whether an item failed, seconds spent working.
    entered = <double*> calloc(3 * nt, sizeof(double))
    if entered == NULL:
        return -1
    t_call = mt_now()
    with parallel(num_threads=nt):
        tid = mt_thread_num()
        entered[tid] = mt_now()
        # Thread 0 is the caller: it polls for signals between its work items, and a raise
        # there marks the next (jc, pc) step as the one no thread starts (see _interrupt).
        step = 0
        quit = False
        for jc_i in range(ceil_div(n, pl.nc)):
            jc = jc_i * pl.nc
            nc_cur = imin(pl.nc, n - jc)
            panels = ceil_div(nc_cur, nr)
            for pc_i in range(ceil_div(k, pl.kc)):
                quit = stop_before(poll, step)
                if quit:
                    break
                pc = pc_i * pl.kc
                kc_cur = imin(pl.kc, k - pc)
                beta_p = beta if pc == 0 else 1
                ep_p = ep if pc + kc_cur >= k else NULL
                t_work = mt_now()
                if pl.b_packed:
                    for p in prange(panels, schedule="static"):
                        pack_b(kc_cur, imin(nr, nc_cur - p * nr),
                               b + pc * rs_b + (jc + p * nr) * cs_b, rs_b, cs_b, nr,
                               bufB + p * nr * kc_cur)
                    entered[2 * nt + tid] += mt_now() - t_work
                    mt_barrier()  # B's block complete before anyone multiplies with it
                    t_work = mt_now()
                for it in prange(n_items, schedule="dynamic", chunksize=1):
                    if mt_thread_num() == 0:
                        poll_step(poll, step)
                    if stop_before(poll, step + 1):
                        continue    # interrupted: the rest of this step's items are skipped
                    if _item(ks, &pl, it, m, nc_cur, kc_cur, pc, jc, alpha, a, rs_a, cs_a,
                             b, rs_b, bufB, beta_p, c, rs_c, cs_c, ep_p) != 0:
                        entered[nt + mt_thread_num()] = 1
                entered[2 * nt + tid] += mt_now() - t_work
                mt_barrier()  # all products done before B's buffer or C's tiles are reused
                step = step + 1
            if quit:
                break
        # Past the last barrier no one reads B's shared buffer (the calling thread's, which
        # is thread 0 of the team): every thread may drop its oversized scratch.
        scratch_trim()
    for tid in range(nt):
        fails += entered[nt + tid] != 0
    _note_contention(entered, nt, mt_now() - t_call)
    free(entered)
    if fails:
        return -1
    return INTERRUPTED if interrupted(poll) else 0


cdef void _note_contention(const double* entered, int nt, double elapsed) noexcept nogil:
    """Run the next calls on one thread for a while if the team could not run together.

    A call whose threads mostly waited (for a late member, at its barriers) means a core was
    taken (by another library's spinning workers, say OpenBLAS's for ~0.1-0.2 s
    after each NumPy call, or by another process), and every barrier waits for the thread that
    lost it: on two cores that made a 256^3 product 15x slower.  Backing off lets the calls
    run at one core's speed meanwhile and leaves the other core to whoever took it.  The
    back-off doubles while the contention lasts (up to BACKOFF_MAX_NS) and resets on a clean
    call."""
    cdef double busy = 0
    cdef int t, members = 0
    cdef int64_t backoff
    for t in range(nt):
        if entered[t] == 0:
            continue  # the runtime gave a smaller team
        members += 1
        busy += entered[2 * nt + t]
    # Lateness alone is no sign: a worker woken from sleep here often takes 0.5-4 ms to come
    # in, but the others work meanwhile (the items are handed out dynamically).  What counts
    # is the team's idle share: over half means one thread would have done as well.
    if elapsed > 1e-9 * mt_atomic_load64(&_late_ns) and busy < 0.5 * members * elapsed:
        backoff = mt_atomic_load64(&_backoff_ns)
        mt_atomic_store64(&_solo_until_ns, mt_now_ns() + backoff)
        mt_atomic_store64(&_backoff_ns, 2 * backoff if 2 * backoff < BACKOFF_MAX_NS
                          else BACKOFF_MAX_NS)
    else:
        mt_atomic_store64(&_backoff_ns, mt_atomic_load64(&_backoff_base_ns))


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


def _contention_backoff(late_seconds=None, backoff_seconds=None):
    """Get, or set, how late a team member may come in (s) before threaded calls back off to
    one thread, and for how long (s).  Returns the previous pair (for tests and experiments)."""
    cdef int64_t ns
    old = (1e-9 * mt_atomic_load64(&_late_ns), 1e-9 * mt_atomic_load64(&_backoff_base_ns))
    if late_seconds is not None:
        mt_atomic_store64(&_late_ns, <int64_t> round(late_seconds * 1e9))
    if backoff_seconds is not None:
        ns = <int64_t> round(backoff_seconds * 1e9)
        mt_atomic_store64(&_backoff_base_ns, ns)
        mt_atomic_store64(&_backoff_ns, ns)
        mt_atomic_store64(&_solo_until_ns, 0)
    return old
