# The Winograd transforms (see ``_winograd``'s notes), included by ``_winograd`` (baseline
# ISA) and ``_winograd_avx2`` (-mavx2 -mfma): the same plain loops, which GCC vectorises
# 4 wide (SSE2) or 8 wide with FMA.  Every step is ``_apply``: rows of n contiguous values
# (n tiles, or n channels for the filters) as combinations of a few such rows, so any
# point set vectorises; only gathering an input window and scattering an output tile are
# scalar.  Measured F(4x4) C64 56x56 batch 8, 1 thread (callgrind): input transform 38M
# instructions, output 18M, the GEMMs 77M; a first version that found each tile's place by
# division per channel and combined one row at a time took 2x the GEMMs in time.
#
# Requires: idx_t, floating, wplan, WINO_TB, WINO_MAX_ALPHA, ACT_RELU, imin, imax in scope.

cdef extern from "_winograd_apply.h" nogil:
    void wino_apply_f(float* dst, idx_t dstep, const float* src, idx_t sstep,
                      const double* cf, int rows, int ncf, idx_t n, float base)
    void wino_apply_d(double* dst, idx_t dstep, const double* src, idx_t sstep,
                      const double* cf, int rows, int ncf, idx_t n, double base)
    void wino_gather_f(float* D, idx_t tb, const float* x0, idx_t xs2, idx_t xs3, int a)
    void wino_gather_d(double* D, idx_t tb, const double* x0, idx_t xs2, idx_t xs3, int a)
    void wino_scatter_f(float* y0, idx_t ldy, const float* O, idx_t tb, int m)
    void wino_scatter_d(double* y0, idx_t ldy, const double* O, idx_t tb, int m)


cdef inline void _apply(floating* dst, idx_t dstep, const floating* src, idx_t sstep,
                        const double* cf, idx_t rows, idx_t ncf, idx_t n,
                        floating base) noexcept nogil:
    """dst[i*dstep + t] = base + sum_q cf[i*ncf + q] * src[q*sstep + t] for i < rows,
    t < n (``_winograd_apply.h``); the rows of dst and src do not overlap."""
    if floating is float:
        wino_apply_f(dst, dstep, src, sstep, cf, <int> rows, <int> ncf, n, base)
    else:
        wino_apply_d(dst, dstep, src, sstep, cf, <int> rows, <int> ncf, n, base)


cdef inline void _nonfinite_acc(floating* Z, const floating* v, idx_t n) noexcept nogil:
    """Z[t] += v[t] - v[t]: stays 0 while every v is finite, NaN for good after one is not
    (a vector of flags, so the loop vectorises; one scalar test at the end)."""
    cdef idx_t t
    for t in range(n):
        Z[t] = Z[t] + (v[t] - v[t])


cdef inline bint _any_nan(const floating* Z, idx_t n) noexcept nogil:
    cdef idx_t t
    for t in range(n):
        if Z[t] != Z[t]:
            return True
    return False


cdef inline void _tile_at(const wplan* p, idx_t tg, idx_t* n, idx_t* r0,
                          idx_t* c0) noexcept nogil:
    """Image and top-left output position of tile ``tg`` (tiles numbered image by image,
    row by row)."""
    cdef idx_t rem, ti
    n[0] = tg // p.tpi
    rem = tg - n[0] * p.tpi
    ti = rem // p.tc
    r0[0] = ti * p.m
    c0[0] = (rem - ti * p.tc) * p.m


cdef void _filter_t(const wplan* p, const floating* w, idx_t k, idx_t kk, idx_t kcur,
                    floating* U, floating* scr) noexcept nogil:
    """U[xi][kk, c] = (G w[k, c] GT)[xi] for every channel c, TB channels at a time."""
    cdef idx_t a = p.alpha, cb, c0, nc, ci, r, s, i, j
    cdef floating* gk = scr                    # 9 rows of TB channels
    cdef floating* t = scr + 9 * WINO_TB       # alpha x 3 rows
    cdef const floating* wp
    for cb in range((p.C + WINO_TB - 1) // WINO_TB):
        c0 = cb * WINO_TB
        nc = imin(WINO_TB, p.C - c0)
        for ci in range(nc):
            wp = w + k * p.ws[0] + (c0 + ci) * p.ws[1]
            for r in range(3):
                for s in range(3):
                    gk[(r * 3 + s) * WINO_TB + ci] = wp[r * p.ws[2] + s * p.ws[3]]
        # t[i*3 + s] = sum_r G[i, r] g[r*3 + s]
        for s in range(3):
            _apply(t + s * WINO_TB, 3 * WINO_TB, gk + s * WINO_TB, 3 * WINO_TB, p.g, a, 3,
                   nc, 0)
        # U[i*a + j] = sum_s G[j, s] t[i*3 + s]
        for i in range(a):
            _apply(U + (i * a * kcur + kk) * p.C + c0, kcur * p.C, t + i * 3 * WINO_TB,
                   WINO_TB, p.g, a, 3, nc, 0)


cdef bint _input_t(const wplan* p, const floating* x, idx_t c0, idx_t c1, idx_t t0,
                   idx_t b0, idx_t nb, floating* V, floating* scr) noexcept nogil:
    """V[xi][c, b0:b0+nb] = (BT d B)[xi] for channels c0 <= c < c1 and the chunk's tiles
    b0 ... b0+nb-1 (chunk starting at tile t0)."""
    cdef idx_t a = p.alpha, tl, r, s, i, j, t, c, n, r0, q0
    cdef idx_t off[WINO_TB]
    cdef idx_t rr[WINO_TB]
    cdef idx_t cc[WINO_TB]
    cdef bint inside[WINO_TB]
    cdef int rlo[WINO_TB]
    cdef int rhi[WINO_TB]
    cdef int slo[WINO_TB]
    cdef int shi[WINO_TB]
    cdef floating* D = scr
    cdef floating* E = scr + p.a2 * WINO_TB
    cdef floating* Z = E + p.a2 * WINO_TB
    cdef const floating* xc
    cdef const floating* row
    cdef floating* v
    cdef idx_t xs2 = p.xs[2], xs3 = p.xs[3]
    for tl in range(nb):
        _tile_at(p, t0 + b0 + tl, &n, &r0, &q0)
        rr[tl] = r0 - p.pt
        cc[tl] = q0 - p.pl
        off[tl] = n * p.xs[0] + rr[tl] * xs2 + cc[tl] * xs3
        inside[tl] = (rr[tl] >= 0 and rr[tl] + a <= p.H and cc[tl] >= 0
                      and cc[tl] + a <= p.W)
        # An edge tile's window rows and columns inside x, worked out once for every
        # channel; its other entries of D are zeroed here once, and no channel writes them.
        # (Per element, bounds tests and zero stores for every channel took as long as the
        # inside tiles' gathers on C64 56x56: perf, 1 thread.)
        if not inside[tl]:
            rlo[tl] = <int> imin(a, imax(0, -rr[tl]))
            rhi[tl] = <int> imax(rlo[tl], imin(a, p.H - rr[tl]))
            slo[tl] = <int> imin(a, imax(0, -cc[tl]))
            shi[tl] = <int> imax(slo[tl], imin(a, p.W - cc[tl]))
            for r in range(a * a):
                D[r * WINO_TB + tl] = 0
    for t in range(nb):
        Z[t] = 0
    for c in range(c0, c1):
        xc = x + c * p.xs[1]
        # Gather: D[r*a + s][tl] = x[n, c, rr + r, cc + s], zero outside x.
        for tl in range(nb):
            if inside[tl]:
                if floating is float:
                    wino_gather_f(D + tl, WINO_TB, xc + off[tl], xs2, xs3, <int> a)
                else:
                    wino_gather_d(D + tl, WINO_TB, xc + off[tl], xs2, xs3, <int> a)
                continue
            for r in range(rlo[tl], rhi[tl]):
                row = xc + off[tl] + r * xs2
                for s in range(slo[tl], shi[tl]):
                    D[(r * a + s) * WINO_TB + tl] = row[s * xs3]
        # Rows: E[i*a + s] = sum_r BT[i, r] D[r*a + s].
        for s in range(a):
            _apply(E + s * WINO_TB, a * WINO_TB, D + s * WINO_TB, a * WINO_TB, p.bt, a, a,
                   nb, 0)
        # Columns: V[i*a + j][c] = sum_s BT[j, s] E[i*a + s].
        for i in range(a):
            v = V + (i * a * p.C + c) * p.T + b0
            _apply(v, p.C * p.T, E + i * a * WINO_TB, WINO_TB, p.bt, a, a, nb, 0)
            for j in range(a):
                _nonfinite_acc(Z, v + j * p.C * p.T, nb)
    return _any_nan(Z, nb)


cdef bint _output_t(const wplan* p, const floating* M, idx_t k0, idx_t kk0, idx_t kk1,
                    idx_t kcur, idx_t t0, idx_t b0, idx_t nb, const floating* bias,
                    floating* y, floating* scr) noexcept nogil:
    """y[n, k0+kk] for kk0 <= kk < kk1 over the chunk's tiles b0 ... b0+nb-1:
    AT M A + bias (then the activation), edge tiles clipped to P x Q."""
    cdef idx_t a = p.alpha, m = p.m, i2, j2, j, t, tl, kk, n, r0, q0
    cdef idx_t yoff[WINO_TB]
    cdef int nr[WINO_TB]
    cdef int ncl[WINO_TB]
    cdef floating* F = scr
    cdef floating* O = scr + p.a2 * WINO_TB
    cdef floating* Z = O + p.a2 * WINO_TB
    cdef floating* o
    cdef floating* yk
    cdef floating bk
    cdef idx_t PQ = p.P * p.Q
    for tl in range(nb):
        _tile_at(p, t0 + b0 + tl, &n, &r0, &q0)
        yoff[tl] = n * p.K * PQ + r0 * p.Q + q0
        nr[tl] = <int> imin(m, p.P - r0)
        ncl[tl] = <int> imin(m, p.Q - q0)
    for t in range(nb):
        Z[t] = 0
    for kk in range(kk0, kk1):
        bk = 0 if bias == NULL else bias[k0 + kk]
        # Rows: F[i2*a + j] = sum_i AT[i2, i] M[i*a + j].
        for j in range(a):
            _apply(F + j * WINO_TB, a * WINO_TB, M + (j * kcur + kk) * p.T + b0,
                   a * kcur * p.T, p.at, m, a, nb, 0)
        # Columns: O[i2*m + j2] = bias + sum_j AT[j2, j] F[i2*a + j].
        for i2 in range(m):
            _apply(O + i2 * m * WINO_TB, WINO_TB, F + i2 * a * WINO_TB, WINO_TB, p.at, m, a,
                   nb, bk)
        for i2 in range(m * m):
            o = O + i2 * WINO_TB
            _nonfinite_acc(Z, o, nb)
            if p.act == ACT_RELU:
                for t in range(nb):
                    if o[t] < 0:
                        o[t] = 0
        yk = y + (k0 + kk) * PQ
        for tl in range(nb):
            if nr[tl] == m and ncl[tl] == m:
                if floating is float:
                    wino_scatter_f(yk + yoff[tl], p.Q, O + tl, WINO_TB, <int> m)
                else:
                    wino_scatter_d(yk + yoff[tl], p.Q, O + tl, WINO_TB, <int> m)
            else:
                for i2 in range(nr[tl]):
                    for j2 in range(ncl[tl]):
                        yk[yoff[tl] + i2 * p.Q + j2] = O[(i2 * m + j2) * WINO_TB + tl]
    return _any_nan(Z, nb)


cdef void _s_filter(const wplan* p, const float* w, idx_t k, idx_t kk, idx_t kcur,
                    float* U, float* scr) noexcept nogil:
    _filter_t(p, w, k, kk, kcur, U, scr)


cdef bint _s_input(const wplan* p, const float* x, idx_t c0, idx_t c1, idx_t t0, idx_t b0,
                   idx_t nb, float* V, float* scr) noexcept nogil:
    return _input_t(p, x, c0, c1, t0, b0, nb, V, scr)


cdef bint _s_output(const wplan* p, const float* M, idx_t k0, idx_t kk0, idx_t kk1,
                    idx_t kcur, idx_t t0, idx_t b0, idx_t nb, const float* bias, float* y,
                    float* scr) noexcept nogil:
    return _output_t(p, M, k0, kk0, kk1, kcur, t0, b0, nb, bias, y, scr)


cdef void _d_filter(const wplan* p, const double* w, idx_t k, idx_t kk, idx_t kcur,
                    double* U, double* scr) noexcept nogil:
    _filter_t(p, w, k, kk, kcur, U, scr)


cdef bint _d_input(const wplan* p, const double* x, idx_t c0, idx_t c1, idx_t t0, idx_t b0,
                   idx_t nb, double* V, double* scr) noexcept nogil:
    return _input_t(p, x, c0, c1, t0, b0, nb, V, scr)


cdef bint _d_output(const wplan* p, const double* M, idx_t k0, idx_t kk0, idx_t kk1,
                    idx_t kcur, idx_t t0, idx_t b0, idx_t nb, const double* bias, double* y,
                    double* scr) noexcept nogil:
    return _output_t(p, M, k0, kk0, kk1, kcur, t0, b0, nb, bias, y, scr)


cdef void _fill_table(wino_kernels_t* tab) noexcept nogil:
    tab.s_filter = _s_filter
    tab.s_input = _s_input
    tab.s_output = _s_output
    tab.d_filter = _d_filter
    tab.d_input = _d_input
    tab.d_output = _d_output
