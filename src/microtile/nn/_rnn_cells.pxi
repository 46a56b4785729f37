# The item function of an LSTM/GRU step (see ``_rnn_cells.pxd``), included by
# ``_rnn_cells.pyx`` (baseline ISA) and ``_rnn_cells_avx2.pyx`` (AVX2/FMA).
from cpython.pycapsule cimport PyCapsule_New
from libc.string cimport memcpy, memset

from microtile._common._typedefs cimport idx_t, floating
from microtile._common._inline cimport imin
from microtile._kernels._ukernel cimport (kernel_set_t, MAX_MR, MAX_NR, ukr_mr, ukr_nr,
                                          ukr_gen, ukr_dot, ukr_dot4)
from microtile.nn._act_math cimport sigmoid, tanh_

cdef extern from *:
    """
    /* GCC dropped __builtin_prefetch here (no prefetch in the object code, GCC 12 -O3):
       on x86-64 the instruction goes in as volatile asm, which is never removed. */
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    #define mt_prefetch(p) __asm__ volatile("prefetcht0 %0" : : "m"(*(const char*) (p)))
    #elif defined(__GNUC__) || defined(__clang__)
    #define mt_prefetch(p) __builtin_prefetch((const void*) (p))
    #else
    #define mt_prefetch(p) ((void) 0)
    #endif
    """
    void mt_prefetch(const void* p) nogil


# A step's gate pass goes to more than one thread from this many gate elements (N * k * H)

# -- the cells, applied to one row's units j0 .. j0+w-1 ---------------------------------------
# ``t`` is the row's product tile: gate q's w values at t + q * ts.

cdef void _lstm_fwd_cell(const _step* s, idx_t r, idx_t j0, idx_t w, floating* t,
                         idx_t ts) noexcept nogil:
    """Gates i, f, g, o from the projection plus the product; c = f*c_prev + i*g;
    h = o*tanh(c)."""
    cdef idx_t H = s.H, j
    cdef floating* g = <floating*> s.g + r * 4 * H + j0
    cdef const floating* cp = <const floating*> s.cprev + r * H + j0
    cdef floating* c = <floating*> s.c + r * H + j0
    cdef floating* h = <floating*> s.h + r * H + j0
    cdef const floating* t1 = t + ts
    cdef const floating* t2 = t + 2 * ts
    cdef const floating* t3 = t + 3 * ts
    # One loop per gate, each a map over contiguous elements that the compiler vectorises
    # (one loop over all four and c, h did not: too many possible overlaps to check).
    for j in range(w):
        g[j] = sigmoid(g[j] + t[j])
    for j in range(w):
        g[H + j] = sigmoid(g[H + j] + t1[j])
    for j in range(w):
        g[2 * H + j] = tanh_(g[2 * H + j] + t2[j])
    for j in range(w):
        g[3 * H + j] = sigmoid(g[3 * H + j] + t3[j])
    # The cell update in three simple loops through the (local) tile row, which the compiler
    # vectorises; as one loop it stayed scalar (14 % of an LSTM step, perf).
    for j in range(w):
        t[j] = g[H + j] * cp[j] + g[j] * g[2 * H + j]
    for j in range(w):
        c[j] = t[j]
    for j in range(w):
        h[j] = g[3 * H + j] * tanh_(t[j])


cdef void _lstm_bwd_cell(const _step* s, idx_t r, idx_t j0, idx_t w, const floating* t,
                         idx_t ts) noexcept nogil:
    """From dh = dy + the product (dG_{t+1} W_hh) and the carried dc: the four gate
    pre-activation gradients; the carried dc becomes dc * f (its share for step t-1)."""
    cdef idx_t H = s.H, j
    cdef const floating* gi = <const floating*> s.g + r * 4 * H + j0
    cdef const floating* gf = gi + H
    cdef const floating* gg = gi + 2 * H
    cdef const floating* go = gi + 3 * H
    cdef const floating* cp = <const floating*> s.cprev + r * H + j0
    cdef const floating* c = <const floating*> s.c + r * H + j0
    cdef const floating* dy = <const floating*> s.dy + r * s.dy_rs + j0
    cdef floating* dc = <floating*> s.dc + r * H + j0
    cdef floating* di = <floating*> s.dgx + r * 4 * H + j0
    cdef floating* df = di + H
    cdef floating* dgg = di + 2 * H
    cdef floating* do = di + 3 * H
    cdef floating tc[MAX_NR]
    cdef floating dh[MAX_NR]
    cdef floating dcv[MAX_NR]
    # Loops of a few operands each, through local rows: as one loop over the eleven arrays
    # the compiler did not vectorise it (a third of a backward step, perf).  tanh(c) again
    # rather than kept from forward: one more array of T*N*H saved for a tanh per element.
    for j in range(w):
        tc[j] = tanh_(c[j])
    for j in range(w):
        dh[j] = dy[j] + t[j]
    for j in range(w):
        dcv[j] = dc[j] + dh[j] * go[j] * (1 - tc[j] * tc[j])
    for j in range(w):
        di[j] = dcv[j] * gg[j] * (gi[j] * (1 - gi[j]))
    for j in range(w):
        df[j] = dcv[j] * cp[j] * (gf[j] * (1 - gf[j]))
    for j in range(w):
        dgg[j] = dcv[j] * gi[j] * (1 - gg[j] * gg[j])
    for j in range(w):
        do[j] = dh[j] * tc[j] * (go[j] * (1 - go[j]))
    for j in range(w):
        dc[j] = dcv[j] * gf[j]


cdef void _gru_fwd_cell(const _step* s, idx_t r, idx_t j0, idx_t w, floating* t,
                        idx_t ts) noexcept nogil:
    """With p = h_prev W_hh^T + b_hh (the tiles plus the bias): r = sig(x_r + p_r),
    z = sig(x_z + p_z), n = tanh(x_n + r * p_n), h = n + z (h_prev - n) (torch's form of
    (1 - z) n + z h_prev)."""
    cdef idx_t H = s.H, j
    cdef floating* g = <floating*> s.g + r * 3 * H + j0
    cdef const floating* hp = <const floating*> s.hprev + r * H + j0
    cdef floating* h = <floating*> s.h + r * H + j0
    cdef floating* hn = <floating*> s.hn + r * H + j0
    cdef const floating* b = <const floating*> s.b_hh
    cdef floating* t1 = t + ts
    cdef floating* t2 = t + 2 * ts
    if b != NULL:
        b += j0
        for j in range(w):
            t[j] += b[j]
            t1[j] += b[H + j]
            t2[j] += b[2 * H + j]
    # Loops of two or three operands each, which the compiler vectorises.
    for j in range(w):
        g[j] = sigmoid(g[j] + t[j])
    for j in range(w):
        g[H + j] = sigmoid(g[H + j] + t1[j])
    for j in range(w):
        hn[j] = t2[j]
    for j in range(w):
        g[2 * H + j] = tanh_(g[2 * H + j] + g[j] * t2[j])
    for j in range(w):
        h[j] = g[2 * H + j] + g[H + j] * (hp[j] - g[2 * H + j])


cdef void _gru_bwd_cell(const _step* s, idx_t r, idx_t j0, idx_t w, const floating* t,
                        idx_t ts) noexcept nogil:
    """dh = dy + the product (dGh_{t+1} W_hh) + the carried dh z; gate gradients on the
    input side (dgx) and the hidden side (dgh: the n part scaled by r, which multiplies the
    hidden projection); the carried dh becomes dh * z."""
    cdef idx_t H = s.H, j
    cdef const floating* gr = <const floating*> s.g + r * 3 * H + j0
    cdef const floating* gz = gr + H
    cdef const floating* gn = gr + 2 * H
    cdef const floating* hp = <const floating*> s.hprev + r * H + j0
    cdef const floating* hn = <const floating*> s.hn + r * H + j0
    cdef const floating* dy = <const floating*> s.dy + r * s.dy_rs + j0
    cdef floating* dhc = <floating*> s.dh + r * H + j0
    cdef floating* dxr = <floating*> s.dgx + r * 3 * H + j0
    cdef floating* dhr = <floating*> s.dgh + r * 3 * H + j0
    cdef floating dh[MAX_NR]
    cdef floating dan[MAX_NR]
    cdef floating daz[MAX_NR]
    cdef floating dar[MAX_NR]
    # Loops of a few operands each, through local rows (see _lstm_bwd_cell).
    for j in range(w):
        dh[j] = dy[j] + t[j] + dhc[j]
    for j in range(w):
        dan[j] = dh[j] * (1 - gz[j]) * (1 - gn[j] * gn[j])
    for j in range(w):
        daz[j] = dh[j] * (hp[j] - gn[j]) * (gz[j] * (1 - gz[j]))
    for j in range(w):
        dar[j] = dan[j] * hn[j] * (gr[j] * (1 - gr[j]))
    for j in range(w):
        dxr[j] = dar[j]
        dhr[j] = dar[j]
    for j in range(w):
        dxr[H + j] = daz[j]
        dhr[H + j] = daz[j]
    for j in range(w):
        dxr[2 * H + j] = dan[j]
        dhr[2 * H + j] = dan[j] * gr[j]
    for j in range(w):
        dhc[j] = dh[j] * gz[j]


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


cdef inline void _pf(const void* p, idx_t stride, int n, idx_t span) noexcept nogil:
    """The first and last byte of n spans of ``span`` bytes, ``stride`` bytes apart."""
    cdef int q
    for q in range(n):
        mt_prefetch(<const char*> p + q * stride)
        mt_prefetch(<const char*> p + q * stride + span - 1)


cdef void _prefetch_cell(const _loop* L, idx_t r, idx_t j0, idx_t w, floating tag) noexcept nogil:
    """Ask for the lines row r's cell reads (and its gate gradients, which it writes), before
    the item's product: each row's gates are a few lines 4H elements apart in the big G, dG
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
    _pf(<const char*> s.g + goff, H * sz, ng, span)
    if L.kind == LSTM_FWD:
        _pf(<const char*> s.cprev + off, 0, 1, span)
    elif L.kind == GRU_FWD:
        _pf(<const char*> s.hprev + off, 0, 1, span)
    else:
        _pf(<const char*> s.dy + (r * s.dy_rs + j0) * sz, 0, 1, span)
        _pf(<const char*> s.dgx + goff, H * sz, ng, span)
        if L.kind == LSTM_BWD:
            _pf(<const char*> s.cprev + off, 0, 1, span)
            _pf(<const char*> s.c + off, 0, 1, span)
        else:
            _pf(<const char*> s.hprev + off, 0, 1, span)
            _pf(<const char*> s.hn + off, 0, 1, span)
            _pf(<const char*> s.dgh + goff, H * sz, ng, span)


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
    cdef const floating* a = <const floating*> L.a
    cdef const floating* bp = <const floating*> L.bp
    cdef const floating* e = <const floating*> L.e
    cdef const floating* panel
    cdef floating tmp[MAX_GATES * MAX_ITEM_GROUPS * MAX_MR * MAX_NR]
    cdef floating last[MAX_MR * MAX_NR]
    for i in range(n_rows):
        _prefetch_cell(L, r0 + i, j0, w, tag)
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
            while pc < k:
                kc = imin(L.kc, k - pc)
                beta = 0 if pc == 0 else 1
                for gl in range(full):
                    ukr_gen(ks, kc, a + (r0 + gl * mr) * L.lda + pc, L.lda, 1, panel + pc * nr,
                            nr, tmp + q * ts + gl * gs, nr, 1, <floating> 1, beta)
                if full * mr < n_rows:
                    # A partial group: the whole group that ends at the last row (it
                    # overlaps rows done already, whose results are dropped) -- as much work
                    # as padding the group, with nothing copied; dot products on W_hh's
                    # rows, read from L3 for every row, cost twice as much (2 of 32 rows
                    # took 80 of 310 us).
                    ukr_gen(ks, kc, a + (L.N - mr) * L.lda + pc, L.lda, 1, panel + pc * nr,
                            nr, last, nr, 1, <floating> 1, beta)
                pc += kc
            for i in range(full * mr, n_rows):
                memcpy(tmp + q * ts + i * nr, last + (r0 + i - (L.N - mr)) * nr,
                       nr * sizeof(floating))
    for i in range(n_rows):
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
