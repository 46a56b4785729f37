/* The LSTM and GRU cells of one row of a step (see _rnn_cells.pxi): w units of the row, the
 * step's product tile t (gate q's w values at t + q*ts) against the row's gates and states.
 *
 * Each is one loop over the units.  The pointers are restrict (the caller's arrays for one
 * row never overlap each other or the tile), so the loop vectorises with no run-time
 * overlap checks: written in Cython, as seven to eight loops of a few operands each, GCC
 * versioned each for aliasing, and the LSTM forward cell took 17 ns a unit (29 % of a
 * one-thread LSTM forward, 128->256 batch 32).
 *
 * Compiled in each translation unit that includes it (baseline and -mavx2 -mfma): float32
 * with the branch-free functions of _act_math.h on the baseline, with _act_simd.h's
 * intrinsics eight units at a time in the AVX2 build (the LSTM cells and the GRU forward;
 * the GRU backward has no exp); float64 with libm. */
#ifndef MICROTILE_RNN_CELLS_H
#define MICROTILE_RNN_CELLS_H

#include <stddef.h>
#include <math.h>

#include "_act_math.h"

#if defined(_MSC_VER)
#define RNN_RESTRICT __restrict
#else
#define RNN_RESTRICT __restrict__
#endif

/* Gates i, f, g, o from the projection (g, activations written back) plus the product;
   c = f*c_prev + i*g; h = o*tanh(c). */
#define RNN_LSTM_FWD(NAME, T, SIG, TANH)                                                   \
static inline void NAME(T* RNN_RESTRICT g, const T* RNN_RESTRICT t, ptrdiff_t ts,           \
                        const T* RNN_RESTRICT cp, T* RNN_RESTRICT c, T* RNN_RESTRICT h,     \
                        ptrdiff_t H, ptrdiff_t w) {                                         \
    ptrdiff_t j;                                                                            \
    for (j = 0; j < w; j++) {                                                               \
        T gi = SIG(g[j] + t[j]);                                                            \
        T gf = SIG(g[H + j] + t[ts + j]);                                                   \
        T gg = TANH(g[2 * H + j] + t[2 * ts + j]);                                          \
        T go = SIG(g[3 * H + j] + t[3 * ts + j]);                                           \
        T cn = gf * cp[j] + gi * gg;                                                        \
        g[j] = gi;                                                                          \
        g[H + j] = gf;                                                                      \
        g[2 * H + j] = gg;                                                                  \
        g[3 * H + j] = go;                                                                  \
        c[j] = cn;                                                                          \
        h[j] = go * TANH(cn);                                                               \
    }                                                                                       \
}

/* From dh = dy + t (the product dG_{t+1} W_hh) and the carried dc: the four gate
   pre-activation gradients (d, rows of 4H); the carried dc becomes dc * f.  tanh(c) is
   computed again rather than kept from forward (one more T*N*H array for a tanh). */
#define RNN_LSTM_BWD(NAME, T, TANH)                                                        \
static inline void NAME(const T* RNN_RESTRICT g, const T* RNN_RESTRICT cp,                  \
                        const T* RNN_RESTRICT c, const T* RNN_RESTRICT dy,                  \
                        const T* RNN_RESTRICT t, T* RNN_RESTRICT dc, T* RNN_RESTRICT d,     \
                        ptrdiff_t H, ptrdiff_t w) {                                         \
    ptrdiff_t j;                                                                            \
    for (j = 0; j < w; j++) {                                                               \
        T gi = g[j], gf = g[H + j], gg = g[2 * H + j], go = g[3 * H + j];                   \
        T tc = TANH(c[j]);                                                                  \
        T dh = dy[j] + t[j];                                                                \
        T dcv = dc[j] + dh * go * (1 - tc * tc);                                            \
        d[j] = dcv * gg * (gi * (1 - gi));                                                  \
        d[H + j] = dcv * cp[j] * (gf * (1 - gf));                                           \
        d[2 * H + j] = dcv * gi * (1 - gg * gg);                                            \
        d[3 * H + j] = dh * tc * (go * (1 - go));                                           \
        dc[j] = dcv * gf;                                                                   \
    }                                                                                       \
}

/* With p = the product plus b_hh (b may be NULL): r = sig(x_r + p_r), z = sig(x_z + p_z),
   n = tanh(x_n + r * p_n), h = n + z (h_prev - n) (torch's form of (1 - z) n + z h_prev);
   p_n is kept in hn for backward.  The loop is written twice, with and without the bias:
   a test of b inside it kept GCC from vectorising it.  Without one it adds -0.0, which the
   compiler drops (x + -0.0 is x for every x; + 0 is not, for x = -0). */
#define RNN_GRU_FWD_LOOP(T, SIG, TANH, BR, BZ, BN)                                         \
    for (j = 0; j < w; j++) {                                                               \
        T pn = t[2 * ts + j] + (BN);                                                        \
        T r = SIG(g[j] + (t[j] + (BR)));                                                    \
        T z = SIG(g[H + j] + (t[ts + j] + (BZ)));                                           \
        T n = TANH(g[2 * H + j] + r * pn);                                                  \
        hn[j] = pn;                                                                         \
        g[j] = r;                                                                           \
        g[H + j] = z;                                                                       \
        g[2 * H + j] = n;                                                                   \
        h[j] = n + z * (hp[j] - n);                                                         \
    }
#define RNN_GRU_FWD(NAME, T, SIG, TANH)                                                    \
static inline void NAME(T* RNN_RESTRICT g, const T* RNN_RESTRICT t, ptrdiff_t ts,           \
                        const T* RNN_RESTRICT b, const T* RNN_RESTRICT hp,                  \
                        T* RNN_RESTRICT h, T* RNN_RESTRICT hn, ptrdiff_t H, ptrdiff_t w) {  \
    ptrdiff_t j;                                                                            \
    if (b) {                                                                                \
        RNN_GRU_FWD_LOOP(T, SIG, TANH, b[j], b[H + j], b[2 * H + j])                        \
    } else {                                                                                \
        RNN_GRU_FWD_LOOP(T, SIG, TANH, (T) -0.0, (T) -0.0, (T) -0.0)                        \
    }                                                                                       \
}

/* dh = dy + t (the product dGh_{t+1} W_hh) + the carried dh z (dhc); the gate gradients
   on the input side (dx) and the hidden side (dhh: the n part scaled by r, which multiplied
   the hidden projection); the carried dh becomes dh * z. */
#define RNN_GRU_BWD(NAME, T)                                                               \
static inline void NAME(const T* RNN_RESTRICT g, const T* RNN_RESTRICT hp,                  \
                        const T* RNN_RESTRICT hn, const T* RNN_RESTRICT dy,                 \
                        const T* RNN_RESTRICT t, T* RNN_RESTRICT dhc, T* RNN_RESTRICT dx,   \
                        T* RNN_RESTRICT dhh, ptrdiff_t H, ptrdiff_t w) {                    \
    ptrdiff_t j;                                                                            \
    for (j = 0; j < w; j++) {                                                               \
        T gr = g[j], gz = g[H + j], gn = g[2 * H + j];                                      \
        T dh = dy[j] + t[j] + dhc[j];                                                       \
        T dan = dh * (1 - gz) * (1 - gn * gn);                                              \
        T daz = dh * (hp[j] - gn) * (gz * (1 - gz));                                        \
        T dar = dan * hn[j] * (gr * (1 - gr));                                              \
        dx[j] = dar;                                                                        \
        dhh[j] = dar;                                                                       \
        dx[H + j] = daz;                                                                    \
        dhh[H + j] = daz;                                                                   \
        dx[2 * H + j] = dan;                                                                \
        dhh[2 * H + j] = dan * gr;                                                          \
        dhc[j] = dh * gz;                                                                   \
    }                                                                                       \
}

RNN_LSTM_FWD(rnn_lstm_fwd_d, double, mt_sigmoid_d, tanh)
RNN_LSTM_BWD(rnn_lstm_bwd_d, double, tanh)
RNN_GRU_FWD(rnn_gru_fwd_d, double, mt_sigmoid_d, tanh)
RNN_GRU_BWD(rnn_gru_bwd_f, float)
RNN_GRU_BWD(rnn_gru_bwd_d, double)

#if defined(__AVX2__) && defined(__FMA__)
/* float32 cells with AVX2/FMA: the same formulas eight units at a time on _act_simd.h's
   sigmoid and tanh.  GCC's vectorisation of the scalar functions took 1.04 ns an element
   for sigmoid and 1.30 for tanh on one core, the intrinsics 0.65 and 0.80 (same run);
   an LSTM forward unit takes three sigmoids and two tanh.  The last partial vector goes
   through the same code with masked loads and stores, so a unit's result does not
   depend on where a row's share of units starts or ends (the thread-count tests). */
#include "_act_simd.h"

#define RNN_LD(p, m, full) ((full) ? _mm256_loadu_ps(p) : _mm256_maskload_ps((p), (m)))
#define RNN_ST(p, m, full, v) \
    do { if (full) _mm256_storeu_ps((p), (v)); else _mm256_maskstore_ps((p), (m), (v)); } \
    while (0)
/* CELL8(j, mask, full) over the w units: whole vectors, then the masked rest. */
#define RNN_BY_VECTORS(w, CELL8)                                                           \
    do {                                                                                    \
        ptrdiff_t j_;                                                                       \
        for (j_ = 0; j_ + 8 <= (w); j_ += 8)                                                \
            CELL8(j_, _mm256_set1_epi32(-1), 1);                                            \
        if (j_ < (w))                                                                       \
            CELL8(j_, mt_lanes8((w) - j_), 0);                                              \
    } while (0)

static inline void rnn_lstm_fwd8(float* RNN_RESTRICT g, const float* RNN_RESTRICT t,
                                 ptrdiff_t ts, const float* RNN_RESTRICT cp,
                                 float* RNN_RESTRICT c, float* RNN_RESTRICT h, ptrdiff_t H,
                                 ptrdiff_t j, __m256i m, int full) {
    __m256 gi = mt_sigmoid8(_mm256_add_ps(RNN_LD(g + j, m, full), RNN_LD(t + j, m, full)));
    __m256 gf = mt_sigmoid8(_mm256_add_ps(RNN_LD(g + H + j, m, full),
                                          RNN_LD(t + ts + j, m, full)));
    __m256 gg = mt_tanh8(_mm256_add_ps(RNN_LD(g + 2 * H + j, m, full),
                                       RNN_LD(t + 2 * ts + j, m, full)));
    __m256 go = mt_sigmoid8(_mm256_add_ps(RNN_LD(g + 3 * H + j, m, full),
                                          RNN_LD(t + 3 * ts + j, m, full)));
    __m256 cn = _mm256_fmadd_ps(gf, RNN_LD(cp + j, m, full), _mm256_mul_ps(gi, gg));
    RNN_ST(g + j, m, full, gi);
    RNN_ST(g + H + j, m, full, gf);
    RNN_ST(g + 2 * H + j, m, full, gg);
    RNN_ST(g + 3 * H + j, m, full, go);
    RNN_ST(c + j, m, full, cn);
    RNN_ST(h + j, m, full, _mm256_mul_ps(go, mt_tanh8(cn)));
}
static inline void rnn_lstm_fwd_f(float* RNN_RESTRICT g, const float* RNN_RESTRICT t,
                                  ptrdiff_t ts, const float* RNN_RESTRICT cp,
                                  float* RNN_RESTRICT c, float* RNN_RESTRICT h, ptrdiff_t H,
                                  ptrdiff_t w) {
#define RNN_LSTM_FWD8(j, m, full) rnn_lstm_fwd8(g, t, ts, cp, c, h, H, j, m, full)
    RNN_BY_VECTORS(w, RNN_LSTM_FWD8);
#undef RNN_LSTM_FWD8
}

static inline void rnn_lstm_bwd8(const float* RNN_RESTRICT g, const float* RNN_RESTRICT cp,
                                 const float* RNN_RESTRICT c, const float* RNN_RESTRICT dy,
                                 const float* RNN_RESTRICT t, float* RNN_RESTRICT dc,
                                 float* RNN_RESTRICT d, ptrdiff_t H, ptrdiff_t j, __m256i m,
                                 int full) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 gi = RNN_LD(g + j, m, full), gf = RNN_LD(g + H + j, m, full);
    __m256 gg = RNN_LD(g + 2 * H + j, m, full), go = RNN_LD(g + 3 * H + j, m, full);
    __m256 tc = mt_tanh8(RNN_LD(c + j, m, full));
    __m256 dh = _mm256_add_ps(RNN_LD(dy + j, m, full), RNN_LD(t + j, m, full));
    __m256 dcv = _mm256_fmadd_ps(_mm256_mul_ps(dh, go), _mm256_fnmadd_ps(tc, tc, one),
                                 RNN_LD(dc + j, m, full));
    RNN_ST(d + j, m, full, _mm256_mul_ps(_mm256_mul_ps(dcv, gg),
                                         _mm256_mul_ps(gi, _mm256_sub_ps(one, gi))));
    RNN_ST(d + H + j, m, full,
           _mm256_mul_ps(_mm256_mul_ps(dcv, RNN_LD(cp + j, m, full)),
                         _mm256_mul_ps(gf, _mm256_sub_ps(one, gf))));
    RNN_ST(d + 2 * H + j, m, full, _mm256_mul_ps(_mm256_mul_ps(dcv, gi),
                                                 _mm256_fnmadd_ps(gg, gg, one)));
    RNN_ST(d + 3 * H + j, m, full, _mm256_mul_ps(_mm256_mul_ps(dh, tc),
                                                 _mm256_mul_ps(go, _mm256_sub_ps(one, go))));
    RNN_ST(dc + j, m, full, _mm256_mul_ps(dcv, gf));
}
static inline void rnn_lstm_bwd_f(const float* RNN_RESTRICT g, const float* RNN_RESTRICT cp,
                                  const float* RNN_RESTRICT c, const float* RNN_RESTRICT dy,
                                  const float* RNN_RESTRICT t, float* RNN_RESTRICT dc,
                                  float* RNN_RESTRICT d, ptrdiff_t H, ptrdiff_t w) {
#define RNN_LSTM_BWD8(j, m, full) rnn_lstm_bwd8(g, cp, c, dy, t, dc, d, H, j, m, full)
    RNN_BY_VECTORS(w, RNN_LSTM_BWD8);
#undef RNN_LSTM_BWD8
}

/* b NULL: -0.0 added, as the scalar loop (x + -0.0 is x). */
static inline void rnn_gru_fwd8(float* RNN_RESTRICT g, const float* RNN_RESTRICT t,
                                ptrdiff_t ts, const float* RNN_RESTRICT b,
                                const float* RNN_RESTRICT hp, float* RNN_RESTRICT h,
                                float* RNN_RESTRICT hn, ptrdiff_t H, ptrdiff_t j, __m256i m,
                                int full) {
    const __m256 nz = _mm256_set1_ps(-0.0f);
    __m256 br = b ? RNN_LD(b + j, m, full) : nz, bz = b ? RNN_LD(b + H + j, m, full) : nz;
    __m256 bn = b ? RNN_LD(b + 2 * H + j, m, full) : nz;
    __m256 pn = _mm256_add_ps(RNN_LD(t + 2 * ts + j, m, full), bn);
    __m256 r = mt_sigmoid8(_mm256_add_ps(RNN_LD(g + j, m, full),
                                         _mm256_add_ps(RNN_LD(t + j, m, full), br)));
    __m256 z = mt_sigmoid8(_mm256_add_ps(RNN_LD(g + H + j, m, full),
                                         _mm256_add_ps(RNN_LD(t + ts + j, m, full), bz)));
    __m256 n = mt_tanh8(_mm256_fmadd_ps(r, pn, RNN_LD(g + 2 * H + j, m, full)));
    RNN_ST(hn + j, m, full, pn);
    RNN_ST(g + j, m, full, r);
    RNN_ST(g + H + j, m, full, z);
    RNN_ST(g + 2 * H + j, m, full, n);
    RNN_ST(h + j, m, full, _mm256_fmadd_ps(z, _mm256_sub_ps(RNN_LD(hp + j, m, full), n), n));
}
static inline void rnn_gru_fwd_f(float* RNN_RESTRICT g, const float* RNN_RESTRICT t,
                                 ptrdiff_t ts, const float* RNN_RESTRICT b,
                                 const float* RNN_RESTRICT hp, float* RNN_RESTRICT h,
                                 float* RNN_RESTRICT hn, ptrdiff_t H, ptrdiff_t w) {
#define RNN_GRU_FWD8(j, m, full) rnn_gru_fwd8(g, t, ts, b, hp, h, hn, H, j, m, full)
    RNN_BY_VECTORS(w, RNN_GRU_FWD8);
#undef RNN_GRU_FWD8
}
#else
RNN_LSTM_FWD(rnn_lstm_fwd_f, float, mt_sigmoidf_fast, mt_tanhf_fast)
RNN_LSTM_BWD(rnn_lstm_bwd_f, float, mt_tanhf_fast)
RNN_GRU_FWD(rnn_gru_fwd_f, float, mt_sigmoidf_fast, mt_tanhf_fast)
#endif

#endif
