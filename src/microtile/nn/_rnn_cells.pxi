# The item function of an LSTM/GRU step (see ``_rnn_cells.pxd``), included by
# ``_rnn_cells.pyx`` (baseline ISA) and ``_rnn_cells_avx2.pyx`` (AVX2/FMA).
from cpython.pycapsule cimport PyCapsule_New
from libc.string cimport memcpy, memset

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport imin
from microtile._kernels._ukernel cimport (kernel_set_t, MAX_MR, MAX_NR, ukr_mr, ukr_nr,
                                          ukr_gen, ukr_rows, ukr_dot, ukr_dot4)

cdef extern from *:
    """
    /* GCC dropped __builtin_prefetch here (no prefetch in the object code, GCC 12 -O3):
       on x86-64 the instructions go in as volatile asm, which is never removed.  _l2: into
       L2 (prefetcht1), for lines wanted after the item's product. */
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    #define mt_prefetch(p) __asm__ volatile("prefetcht0 %0" : : "m"(*(const char*) (p)))
    #define mt_prefetch_l2(p) __asm__ volatile("prefetcht1 %0" : : "m"(*(const char*) (p)))
    #elif defined(__GNUC__) || defined(__clang__)
    #define mt_prefetch(p) __builtin_prefetch((const void*) (p), 0, 3)
    #define mt_prefetch_l2(p) __builtin_prefetch((const void*) (p), 0, 2)
    #else
    #define mt_prefetch(p) ((void) 0)
    #define mt_prefetch_l2(p) ((void) 0)
    #endif
    """
    void mt_prefetch(const void* p) nogil
    void mt_prefetch_l2(const void* p) nogil


# Items of at most this many rows prefetch their rows' lines straight into L1 (see _item).
cdef enum:
    L1_ROWS = 2

# -- the cells, applied to one row's units j0 .. j0+w-1 ---------------------------------------
# ``t`` is the row's product tile: gate q's w values at t + q * ts.  The loops are C
# (``_rnn_cells.h``): one restrict-qualified loop per cell.

# Named for the build's dependency tracking (which follows only direct includes): a change
# to the float32 math, scalar or AVX2, rebuilds the cells.
cdef extern from "_act_math.h":
    pass
cdef extern from "_act_simd.h":
    pass

cdef extern from "_rnn_cells.h" nogil:
    void rnn_lstm_fwd_f(float* g, const float* t, idx_t ts, const float* cp, float* c,
                        float* h, idx_t H, idx_t w)
    void rnn_lstm_fwd_d(double* g, const double* t, idx_t ts, const double* cp, double* c,
                        double* h, idx_t H, idx_t w)
    void rnn_lstm_bwd_f(const float* g, const float* cp, const float* c, const float* dy,
                        const float* t, float* dc, float* d, idx_t H, idx_t w)
    void rnn_lstm_bwd_d(const double* g, const double* cp, const double* c, const double* dy,
                        const double* t, double* dc, double* d, idx_t H, idx_t w)
    void rnn_gru_fwd_f(float* g, const float* t, idx_t ts, const float* b, const float* hp,
                       float* h, float* hn, idx_t H, idx_t w)
    void rnn_gru_fwd_d(double* g, const double* t, idx_t ts, const double* b,
                       const double* hp, double* h, double* hn, idx_t H, idx_t w)
    void rnn_gru_bwd_f(const float* g, const float* hp, const float* hn, const float* dy,
                       const float* t, float* dhc, float* dx, float* dhh, idx_t H, idx_t w)
    void rnn_gru_bwd_d(const double* g, const double* hp, const double* hn,
                       const double* dy, const double* t, double* dhc, double* dx,
                       double* dhh, idx_t H, idx_t w)


cdef inline void _lstm_fwd_cell(const _step* s, idx_t r, idx_t j0, idx_t w, floating* t,
                                idx_t ts) noexcept nogil:
    cdef idx_t H = s.H
    cdef floating* g = <floating*> s.g + r * 4 * H + j0
    cdef const floating* cp = <const floating*> s.cprev + r * H + j0
    cdef floating* c = <floating*> s.c + r * H + j0
    cdef floating* h = <floating*> s.h + r * H + j0
    if floating is float:
        rnn_lstm_fwd_f(g, t, ts, cp, c, h, H, w)
    else:
        rnn_lstm_fwd_d(g, t, ts, cp, c, h, H, w)


cdef inline void _lstm_bwd_cell(const _step* s, idx_t r, idx_t j0, idx_t w, const floating* t,
                                idx_t ts) noexcept nogil:
    cdef idx_t H = s.H
    cdef const floating* g = <const floating*> s.g + r * 4 * H + j0
    cdef const floating* cp = <const floating*> s.cprev + r * H + j0
    cdef const floating* c = <const floating*> s.c + r * H + j0
    cdef const floating* dy = <const floating*> s.dy + r * s.dy_rs + j0
    cdef floating* dc = <floating*> s.dc + r * H + j0
    cdef floating* d = <floating*> s.dgx + r * 4 * H + j0
    if floating is float:
        rnn_lstm_bwd_f(g, cp, c, dy, t, dc, d, H, w)
    else:
        rnn_lstm_bwd_d(g, cp, c, dy, t, dc, d, H, w)


cdef inline void _gru_fwd_cell(const _step* s, idx_t r, idx_t j0, idx_t w, floating* t,
                               idx_t ts) noexcept nogil:
    cdef idx_t H = s.H
    cdef floating* g = <floating*> s.g + r * 3 * H + j0
    cdef const floating* hp = <const floating*> s.hprev + r * H + j0
    cdef floating* h = <floating*> s.h + r * H + j0
    cdef floating* hn = <floating*> s.hn + r * H + j0
    cdef const floating* b = <const floating*> s.b_hh
    if b != NULL:
        b += j0
    if floating is float:
        rnn_gru_fwd_f(g, t, ts, b, hp, h, hn, H, w)
    else:
        rnn_gru_fwd_d(g, t, ts, b, hp, h, hn, H, w)


cdef inline void _gru_bwd_cell(const _step* s, idx_t r, idx_t j0, idx_t w, const floating* t,
                               idx_t ts) noexcept nogil:
    cdef idx_t H = s.H
    cdef const floating* g = <const floating*> s.g + r * 3 * H + j0
    cdef const floating* hp = <const floating*> s.hprev + r * H + j0
    cdef const floating* hn = <const floating*> s.hn + r * H + j0
    cdef const floating* dy = <const floating*> s.dy + r * s.dy_rs + j0
    cdef floating* dhc = <floating*> s.dh + r * H + j0
    cdef floating* dx = <floating*> s.dgx + r * 3 * H + j0
    cdef floating* dhh = <floating*> s.dgh + r * 3 * H + j0
    if floating is float:
        rnn_gru_bwd_f(g, hp, hn, dy, t, dhc, dx, dhh, H, w)
    else:
        rnn_gru_bwd_d(g, hp, hn, dy, t, dhc, dx, dhh, H, w)


cdef inline void _cell(int kind, const _step* s, idx_t r, idx_t j0, idx_t w, floating* t,
                       idx_t ts) noexcept nogil:
    cdef floating* dh
    cdef idx_t j
    if kind == LSTM_FWD:
        _lstm_fwd_cell(s, r, j0, w, t, ts)
    elif kind == LSTM_BWD:
        _lstm_bwd_cell(s, r, j0, w, t, ts)
    elif kind == GRU_FWD:
        _gru_fwd_cell(s, r, j0, w, t, ts)
    elif kind == GRU_BWD:
        _gru_bwd_cell(s, r, j0, w, t, ts)
    else:
        # DH0: the carried part (GRU: dh z of step 0; LSTM: zeros) plus the product.
        dh = <floating*> s.dh + r * s.H + j0
        for j in range(w):
            dh[j] += t[j]


cdef void _dots(const kernel_set_t* ks, idx_t k, const floating* e, idx_t w, const floating* x,
                floating* out) noexcept nogil:
    """out[j] = e[j*k : j*k + k] . x for j < w: four rows at a time sharing the loads of x."""
    cdef idx_t j = 0
    while j + 4 <= w:
        ukr_dot4(ks, k, e + j * k, k, x, out + j)
        j += 4
    while j < w:
        out[j] = ukr_dot(ks, k, e + j * k, x)
        j += 1


cdef inline void _pf(const void* p, idx_t stride, int n, idx_t span, bint l1) noexcept nogil:
    """The first and last byte of n spans of ``span`` bytes, ``stride`` bytes apart, into
    L1 or L2."""
    cdef int q
    for q in range(n):
        if l1:
            mt_prefetch(<const char*> p + q * stride)
            mt_prefetch(<const char*> p + q * stride + span - 1)
        else:
            mt_prefetch_l2(<const char*> p + q * stride)
            mt_prefetch_l2(<const char*> p + q * stride + span - 1)


cdef void _prefetch_cell(const _loop* L, idx_t r, idx_t j0, idx_t w, bint l1,
                         floating tag) noexcept nogil:
    """Ask for the lines row r's cell reads (and its gate gradients, which it writes), into
    L1 or L2 (see _item for when): each row's gates are a few lines 4H elements apart in the big G, dG
    arrays, a pattern the hardware prefetcher does not follow, and the loads waiting for
    them were 30 % of an LSTM step (perf, 128->256, batch 32).  With the prefetches really
    emitted (see mt_prefetch) a 2-thread step took 265 instead of 288 us (medians of 7
    interleaved runs)."""
    cdef const _step* s = &L.s
    cdef idx_t H = L.H, sz = sizeof(floating), span = w * sizeof(floating)
    cdef idx_t gh = (4 if L.kind == LSTM_FWD or L.kind == LSTM_BWD else 3) * H
    cdef idx_t off = (r * H + j0) * sz
    cdef idx_t goff = (r * gh + j0) * sz
    cdef int ng = <int> (gh // H)
    if L.kind == DH0:
        return
    _pf(<const char*> s.g + goff, H * sz, ng, span, l1)
    if L.kind == LSTM_FWD:
        _pf(<const char*> s.cprev + off, 0, 1, span, l1)
    elif L.kind == GRU_FWD:
        _pf(<const char*> s.hprev + off, 0, 1, span, l1)
    else:
        _pf(<const char*> s.dy + (r * s.dy_rs + j0) * sz, 0, 1, span, l1)
        _pf(<const char*> s.dgx + goff, H * sz, ng, span, l1)
        if L.kind == LSTM_BWD:
            _pf(<const char*> s.cprev + off, 0, 1, span, l1)
            _pf(<const char*> s.c + off, 0, 1, span, l1)
        else:
            _pf(<const char*> s.hprev + off, 0, 1, span, l1)
            _pf(<const char*> s.hn + off, 0, 1, span, l1)
            _pf(<const char*> s.dgh + goff, H * sz, ng, span, l1)


cdef void _item(const _loop* L, idx_t it, floating tag) noexcept nogil:
    """Block it % n_blocks of units on row groups (it // n_blocks) * groups_per_item ...: the
    product's tiles of every group, one gate panel at a time (so that the panel, k x nr,
    stays in L1 while the groups' rows stream past it: group by group, the four panels of an
    LSTM block took turns in L1 and the product ran at half the micro-kernel's speed), then
    the cell row by row."""
    cdef const kernel_set_t* ks = L.ks
    cdef int mr = ukr_mr(ks, &tag), nr = ukr_nr(ks, &tag)
    cdef idx_t b = it % L.n_blocks
    cdef idx_t g0 = (it // L.n_blocks) * L.groups_per_item
    cdef idx_t ng = imin(L.n_groups, g0 + L.groups_per_item) - g0
    cdef idx_t j0 = b * nr, w = imin(nr, L.H - b * nr), k = L.k
    cdef idx_t r0 = g0 * mr, n_rows = imin(L.N, (g0 + ng) * mr) - r0
    cdef idx_t full = n_rows // mr           # whole groups; a partial one is the last
    cdef idx_t gs = mr * nr, ts = ng * gs    # a tile; a gate's tiles (gate q at q * ts)
    cdef idx_t gl, i, q, pc, kc
    cdef floating beta
    cdef bint partial_by_group
    cdef const floating* a = <const floating*> L.a
    cdef const floating* bp = <const floating*> L.bp
    cdef const floating* e = <const floating*> L.e
    cdef const floating* panel
    cdef floating tmp[MAX_GATES * MAX_ITEM_GROUPS * MAX_MR * MAX_NR]
    cdef floating last[MAX_MR * MAX_NR]
    # Into L2 while the product runs, and each row into L1 while the row before it goes
    # through the cell (row 0 right after the product): all 32 rows' lines at once into L1
    # (about 700 lines in backward, 45 KiB) did not fit it, and the backward cell's loads
    # waited on memory (18 % of a one-thread LSTM step).  A 2-thread LSTM step, 128->256
    # batch 32, then took 0.75-0.83x the time forward and 0.75-0.89x forward+backward (two
    # runs, medians of 8 alternating processes each).  An item of at most L1_ROWS rows
    # (batch 1) asks for L1 straight away.
    for i in range(n_rows):
        _prefetch_cell(L, r0 + i, j0, w, n_rows <= L1_ROWS, tag)
    if a == NULL:
        memset(tmp, 0, L.nq * ts * sizeof(floating))
    else:
        for q in range(L.nq):
            panel = bp + (b * L.nq + q) * k * nr
            if L.N < mr:
                # Fewer rows than a micro-panel (batch 1): dot products on the weight's
                # rows; a padded panel would do mr times the work.
                for i in range(n_rows):
                    _dots(ks, k, e + (q * L.H + j0) * k, w, a + (r0 + i) * L.lda,
                          tmp + q * ts + i * nr)
                continue
            # kc deep at a time, so that the panel's slice (kc x nr) stays in L1 while the
            # groups' rows stream past it: the backward's 1024-deep panel (64 KiB) did not,
            # and its product ran at half speed.
            pc = 0
            partial_by_group = False
            while pc < k:
                kc = imin(L.kc, k - pc)
                beta = 0 if pc == 0 else 1
                for gl in range(full):
                    ukr_gen(ks, kc, a + (r0 + gl * mr) * L.lda + pc, L.lda, 1, panel + pc * nr,
                            nr, tmp + q * ts + gl * gs, nr, 1, <floating> 1, beta)
                if full * mr < n_rows and not ukr_rows(
                        ks, kc, <int> (n_rows - full * mr), a + (r0 + full * mr) * L.lda + pc,
                        L.lda, 1, panel + pc * nr, nr, tmp + q * ts + full * gs, nr, 1,
                        <floating> 1, beta):
                    # A partial group on a kernel set without a rows kernel: the whole
                    # group that ends at the last row (it overlaps rows done already, whose
                    # results are dropped) -- as much work as padding the group, with
                    # nothing copied; dot products on W_hh's rows, read from L3 for every
                    # row, cost twice as much (2 of 32 rows took 80 of 310 us).  The rows
                    # kernel does 2 rows' work for batch 32's last 2 rows instead of 6.
                    ukr_gen(ks, kc, a + (L.N - mr) * L.lda + pc, L.lda, 1, panel + pc * nr,
                            nr, last, nr, 1, <floating> 1, beta)
                    partial_by_group = True
                pc += kc
            if partial_by_group:
                for i in range(full * mr, n_rows):
                    memcpy(tmp + q * ts + i * nr, last + (r0 + i - (L.N - mr)) * nr,
                           nr * sizeof(floating))
    if n_rows > L1_ROWS:
        _prefetch_cell(L, r0, j0, w, True, tag)
    for i in range(n_rows):
        if i + 1 < n_rows:
            _prefetch_cell(L, r0 + i + 1, j0, w, True, tag)
        _cell(L.kind, &L.s, r0 + i, j0, w, tmp + i * nr, ts)


cdef void _item_task(void* ctx, idx_t it, int tid) noexcept nogil:
    cdef const _loop* L = <const _loop*> ctx
    if L.dbl:
        _item(L, it, <double> 0)
    else:
        _item(L, it, <float> 0)



def item_task():
    """A capsule holding this module's step item function (a ``pool_item``)."""
    return PyCapsule_New(<void*> _item_task, b"microtile.rnn_item", NULL)
