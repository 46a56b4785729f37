/* Dropout's masks, drawn on the thread pool from a counter-based scheme: the layer's
 * numpy Generator gives one 64-bit key per forward, and the random numbers of block b
 * (MT_DROP_BLOCK elements) come from generators seeded by (key, b) alone.  So the mask
 * depends on the key and the element's position, not on which thread drew it or how many
 * there were, and no thread waits for another's generator state.
 *
 * Why not the Generator itself: filling a float array with Generator.random took 20 of the
 * 27 ms of a 10^7-element forward (one thread, under the Generator's lock), and the
 * backward read those 4-byte uniforms back.  Here each element costs a few vector
 * operations and the backward reads one byte of mask.
 *
 * Per block: a splitmix64 sequence started at mix(key + mix(b + c)) (c a constant) seeds
 * MT_DROP_LANES xoshiro256++ generators (Blackman and Vigna's recommended seeding); each
 * step of the lanes gives 8 x 64 random bits, read as 16 uint32.  The lanes are
 * independent, so the lane loop vectorises (4 lanes per AVX2 register, 2 with SSE2).  An
 * element is kept when its uint32 is at least threshold = round(p 2^32), in [0, 2^32]: P(drop)
 * is p to within 2^-33, and a p within 2^-33 of 1 keeps nothing (torch's float32 draws
 * resolve 2^-24).
 *
 * Written once, compiled into _act_kernels (baseline ISA) and _act_avx2. */
#ifndef MICROTILE_DROPOUT_MASK_H
#define MICROTILE_DROPOUT_MASK_H

#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER)
#define MT_DROP_RESTRICT __restrict
#else
#define MT_DROP_RESTRICT __restrict__
#endif

#define MT_DROP_BLOCK 4096      /* elements per seeded block; shares are whole blocks */
#define MT_DROP_LANES 8         /* generators per block */
#define MT_DROP_RUN 256         /* uint32 drawn at a time into a 1 KiB buffer (L1) */

typedef struct {
    uint64_t s0[MT_DROP_LANES], s1[MT_DROP_LANES], s2[MT_DROP_LANES], s3[MT_DROP_LANES];
} mt_drop_gen;

/* splitmix64's output function (Steele, Lea and Flood 2014). */
static inline uint64_t mt_drop_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline void mt_drop_seed(mt_drop_gen* g, uint64_t key, uint64_t block) {
    /* Each block starts at its own pseudo-random point of the splitmix64 sequence (a start
       of key + block * gamma would give the next block the same seeds shifted by one). */
    uint64_t z = mt_drop_mix(key + mt_drop_mix(block + 0x632be59bd9b4e019ULL));
    int l;
    for (l = 0; l < MT_DROP_LANES; l++) {
        z += 0x9e3779b97f4a7c15ULL; g->s0[l] = mt_drop_mix(z);
        z += 0x9e3779b97f4a7c15ULL; g->s1[l] = mt_drop_mix(z);
        z += 0x9e3779b97f4a7c15ULL; g->s2[l] = mt_drop_mix(z);
        z += 0x9e3779b97f4a7c15ULL; g->s3[l] = mt_drop_mix(z);
    }
}

/* r[0 .. MT_DROP_RUN) <- the next random uint32 of the block's lanes.  GCC's and Clang's
   vector types hold four lanes each: written as a plain loop over the lanes, GCC 12 kept
   the state in scalar registers (0.88 ns per element of a forward on one core). */
#if defined(__GNUC__) && !defined(MT_DROP_SCALAR)
typedef uint64_t mt_drop_v4 __attribute__((vector_size(32), aligned(8)));
static inline void mt_drop_draw(mt_drop_gen* MT_DROP_RESTRICT g,
                                uint32_t* MT_DROP_RESTRICT r) {
    mt_drop_v4 s0[2], s1[2], s2[2], s3[2], a, t, o;
    int step, h;
    memcpy(s0, g->s0, sizeof s0);
    memcpy(s1, g->s1, sizeof s1);
    memcpy(s2, g->s2, sizeof s2);
    memcpy(s3, g->s3, sizeof s3);
    for (step = 0; step < MT_DROP_RUN / (2 * MT_DROP_LANES); step++) {
        for (h = 0; h < 2; h++) {
            a = s0[h] + s3[h];
            t = s1[h] << 17;
            o = ((a << 23) | (a >> 41)) + s0[h];
            memcpy(r + (step * 2 + h) * 8, &o, sizeof o);
            s2[h] ^= s0[h];
            s3[h] ^= s1[h];
            s1[h] ^= s2[h];
            s0[h] ^= s3[h];
            s2[h] ^= t;
            s3[h] = (s3[h] << 45) | (s3[h] >> 19);
        }
    }
    memcpy(g->s0, s0, sizeof s0);
    memcpy(g->s1, s1, sizeof s1);
    memcpy(g->s2, s2, sizeof s2);
    memcpy(g->s3, s3, sizeof s3);
}
#else
static inline void mt_drop_draw(mt_drop_gen* MT_DROP_RESTRICT g,
                                uint32_t* MT_DROP_RESTRICT r) {
    uint64_t o;
    int step, l;
    for (step = 0; step < MT_DROP_RUN / (2 * MT_DROP_LANES); step++) {
        for (l = 0; l < MT_DROP_LANES; l++) {
            uint64_t s0 = g->s0[l], s1 = g->s1[l], s2 = g->s2[l], s3 = g->s3[l];
            uint64_t a = s0 + s3, t = s1 << 17;
            o = ((a << 23) | (a >> 41)) + s0;
            memcpy(r + (step * MT_DROP_LANES + l) * 2, &o, sizeof o);
            s2 ^= s0;
            s3 ^= s1;
            s1 ^= s2;
            s0 ^= s3;
            s2 ^= t;
            s3 = (s3 << 45) | (s3 >> 19);
            g->s0[l] = s0; g->s1[l] = s1; g->s2[l] = s2; g->s3[l] = s3;
        }
    }
}
#endif

/* The uniform draws themselves, for the tests: r[i] for the elements [i0, i0 + n) of a
   mask with this key, i0 a multiple of MT_DROP_BLOCK. */
static inline void mt_drop_bits(uint64_t key, int64_t i0, int64_t n, uint32_t* r) {
    mt_drop_gen g;
    uint32_t buf[MT_DROP_RUN];
    int64_t i, j, len;
    for (i = 0; i < n; i += len) {
        if ((i0 + i) % MT_DROP_BLOCK == 0)
            mt_drop_seed(&g, key, (uint64_t) ((i0 + i) / MT_DROP_BLOCK));
        len = n - i < MT_DROP_RUN ? n - i : MT_DROP_RUN;
        mt_drop_draw(&g, buf);
        for (j = 0; j < len; j++)
            r[i + j] = buf[j];
    }
}

/* Forward over elements [i0, i1) (i0 a multiple of MT_DROP_BLOCK): keep[i] = 1 when the
   element's draw is at least the threshold (2^32: none is), y = x * (scale or 0) -- a
   product, so NaN and Inf in a dropped element propagate as torch's input * mask does.
   x may be y. */
#define MT_DROP_FORWARD(NAME, T)                                                          \
static inline void NAME(const T* x, T* y, uint8_t* keep, int64_t i0, int64_t i1,         \
                        uint64_t key, uint64_t threshold, T scale) {                     \
    mt_drop_gen g;                                                                        \
    uint32_t r[MT_DROP_RUN];                                                              \
    const uint32_t any = threshold <= 0xFFFFFFFFu;  /* some draw can reach it */          \
    const uint32_t t = any ? (uint32_t) threshold : 0;                                    \
    int64_t i, j, len;                                                                    \
    for (i = i0; i < i1; i += len) {                                                      \
        if (i % MT_DROP_BLOCK == 0)                                                       \
            mt_drop_seed(&g, key, (uint64_t) (i / MT_DROP_BLOCK));                        \
        len = i1 - i < MT_DROP_RUN ? i1 - i : MT_DROP_RUN;                                \
        mt_drop_draw(&g, r);                                                              \
        {                                                                                 \
            const T* xs = x + i;                                                          \
            T* ys = y + i;                                                                \
            uint8_t* MT_DROP_RESTRICT ks = keep + i;                                      \
            for (j = 0; j < len; j++) {                                                   \
                uint32_t k = (r[j] >= t) & any;                                           \
                ys[j] = xs[j] * (k ? scale : (T) 0);                                      \
                ks[j] = (uint8_t) k;                                                      \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
}
MT_DROP_FORWARD(mt_drop_forward_f, float)
MT_DROP_FORWARD(mt_drop_forward_d, double)

/* Backward (and any re-application of a mask): out = g * (scale where keep, else 0);
   out may be g. */
#define MT_DROP_APPLY(NAME, T)                                                            \
static inline void NAME(const T* g, const uint8_t* MT_DROP_RESTRICT keep, T* out,       \
                        int64_t n, T scale) {                                             \
    int64_t i;                                                                            \
    for (i = 0; i < n; i++)                                                               \
        out[i] = g[i] * (keep[i] ? scale : (T) 0);                                        \
}
MT_DROP_APPLY(mt_drop_apply_f, float)
MT_DROP_APPLY(mt_drop_apply_d, double)

#endif
