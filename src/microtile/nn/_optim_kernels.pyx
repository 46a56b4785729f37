"""In-place optimizer updates (SGD, Adam, AdamW, AdaGrad, RMSprop) as nogil loops.

Each update follows torch.optim's single-tensor code operation by operation (the same
intermediate roundings in float32: scalars are rounded to the parameter's dtype as torch does
for a Python scalar, the moment updates use torch's lerp / addcmul / addcdiv forms), so a model
trained here and one trained with torch from the same start agree to float tolerance.

A parameter is one flat C-contiguous array; so are its gradient and state buffers.  Large
tensors are split into one contiguous chunk per thread; the inner loops are plain pointer
loops whose loop-invariant branches the compiler unswitches, so they vectorise.
"""
from libc.math cimport sqrt, sqrtf

from microtile._common._mt_pool cimport pool_ranges
from microtile._common._typedefs cimport idx_t, floating
from microtile.linalg._gemm cimport gemm_params
from microtile._config._params cimport current_params

# Below this many elements one thread streams the tensor faster than two can start.
cdef idx_t PAR_MIN = 1 << 15

cdef enum:
    OP_SGD = 0
    OP_ADAM = 1
    OP_ADAGRAD = 2
    OP_RMSPROP = 3

cdef enum:
    F_WD = 1          # weight decay: the gradient used is g + wd * p
    F_MOM_FIRST = 2   # SGD momentum, first step: buf = g
    F_MOM = 4         # SGD: buf = momentum * buf + g; RMSprop: buf = momentum * buf + g / avg
    F_NESTEROV = 8    # SGD: step along g + momentum * buf instead of buf
    F_DECOUPLED = 16  # AdamW: p *= 1 - lr * wd before the Adam step; g is left alone
    F_CENTERED = 32   # RMSprop: avg = sqrt(square_avg - grad_avg**2) + eps

ctypedef struct hyper_t:
    double lr        # the step's multiplier (Adam: lr / bias_correction1)
    double a         # SGD momentum; Adam 1 - beta1 (a lerp weight); RMSprop alpha
    double b         # Adam beta2
    double c         # Adam 1 - beta2; RMSprop 1 - alpha (also grad_avg's lerp weight)
    double d         # Adam sqrt(bias_correction2)
    double mom       # RMSprop momentum
    double shrink    # AdamW 1 - lr * weight_decay
    double eps
    double wd
    int flags


cdef inline floating _sqrt(floating v) noexcept nogil:
    if floating is float:
        return sqrtf(v)
    else:
        return sqrt(v)


cdef inline floating _lerp(floating start, floating end, floating w, floating rest,
                           bint small) noexcept nogil:
    # torch.lerp: start + w * (end - start) when |w| < 0.5, else end - (end - start) * rest
    # with rest = 1 - w in the tensor's precision; each form is exact at its own end.
    if small:
        return start + w * (end - start)
    return end - (end - start) * rest


cdef void _chunk(int op, const hyper_t* h, floating* p, const floating* g, floating* s1,
                 floating* s2, floating* s3, idx_t n) noexcept nogil:
    cdef idx_t i
    cdef floating gi, m, v, den, ga
    cdef floating neg_lr = <floating> (-h.lr)
    cdef floating a = <floating> h.a, b = <floating> h.b, c = <floating> h.c
    cdef floating dd = <floating> h.d, eps = <floating> h.eps, wd = <floating> h.wd
    cdef floating mu = <floating> h.mom, shrink = <floating> h.shrink
    cdef floating one = 1
    # The lerp weights (Adam's a, RMSprop's c) and one minus each, rounded as torch rounds them.
    cdef floating a_rest = one - a, c_rest = one - c
    cdef bint a_small = -0.5 < a < 0.5, c_small = -0.5 < c < 0.5
    cdef bint has_wd = (h.flags & F_WD) != 0
    cdef bint mom_first = (h.flags & F_MOM_FIRST) != 0, mom = (h.flags & F_MOM) != 0
    cdef bint nesterov = (h.flags & F_NESTEROV) != 0
    cdef bint decoupled = (h.flags & F_DECOUPLED) != 0
    cdef bint centered = (h.flags & F_CENTERED) != 0
    if op == OP_SGD:
        for i in range(n):
            gi = g[i]
            if has_wd:
                gi = gi + wd * p[i]
            if mom_first:
                s1[i] = gi
            elif mom:
                s1[i] = s1[i] * a + gi
            if mom_first or mom:
                if nesterov:
                    gi = gi + a * s1[i]
                else:
                    gi = s1[i]
            p[i] = p[i] + neg_lr * gi
    elif op == OP_ADAM:
        for i in range(n):
            gi = g[i]
            if has_wd:
                gi = gi + wd * p[i]
            if decoupled:
                p[i] = p[i] * shrink
            m = _lerp(s1[i], gi, a, a_rest, a_small)
            v = s2[i] * b + c * gi * gi
            s1[i] = m
            s2[i] = v
            den = _sqrt(v) / dd + eps
            p[i] = p[i] + neg_lr * (m / den)
    elif op == OP_ADAGRAD:
        for i in range(n):
            gi = g[i]
            if has_wd:
                gi = gi + wd * p[i]
            v = s1[i] + gi * gi
            s1[i] = v
            den = _sqrt(v) + eps
            p[i] = p[i] + neg_lr * (gi / den)
    elif op == OP_RMSPROP:
        # s1 square_avg; s2 grad_avg (centered only); s3 momentum_buffer (momentum only)
        for i in range(n):
            gi = g[i]
            if has_wd:
                gi = gi + wd * p[i]
            v = s1[i] * a + c * gi * gi
            s1[i] = v
            if centered:
                ga = _lerp(s2[i], gi, c, c_rest, c_small)
                s2[i] = ga
                den = _sqrt(v - ga * ga) + eps
            else:
                den = _sqrt(v) + eps
            if mom:
                m = s3[i] * mu + gi / den
                s3[i] = m
                p[i] = p[i] + neg_lr * m
            else:
                p[i] = p[i] + neg_lr * (gi / den)


cdef floating* _ptr(floating[::1] s, idx_t n, str what) except? NULL:
    # A state buffer the update reads: present (when needed) and as long as the parameter.
    if s is None:
        return NULL
    if s.shape[0] != n:
        raise ValueError(f"optimizer: {what} has {s.shape[0]} elements, the parameter {n}")
    return &s[0] if n else NULL


cdef int _run(int op, const hyper_t* h, floating[::1] p, const floating[::1] g,
              floating[::1] s1, floating[::1] s2, floating[::1] s3) except -1:
    cdef idx_t n = p.shape[0]
    cdef int nt = 1
    cdef gemm_params prm
    cdef _opt_job job
    if g.shape[0] != n:
        raise ValueError("optimizer: parameter and gradient sizes differ")
    cdef floating* p1 = _ptr(s1, n, "a state buffer")
    cdef floating* p2 = _ptr(s2, n, "a state buffer")
    cdef floating* p3 = _ptr(s3, n, "a state buffer")
    if n == 0:
        return 0
    cdef floating* pp = &p[0]
    cdef const floating* pg = &g[0]
    if n >= PAR_MIN:
        current_params(0, &prm)
        nt = prm.n_threads if prm.n_threads > 1 else 1
    if nt == 1:
        with nogil:
            _chunk(op, h, pp, pg, p1, p2, p3, n)
        return 0
    job.op = op
    job.h = h
    job.dbl = floating is double
    job.p = pp
    job.g = pg
    job.s1 = p1
    job.s2 = p2
    job.s3 = p3
    with nogil:
        pool_ranges(nt, n, 4 * nt, 16, _opt_range, &job)
    return 0


ctypedef struct _opt_job:
    int op
    const hyper_t* h
    bint dbl
    void* p
    const void* g
    void* s1
    void* s2
    void* s3


cdef inline floating* _at(void* base, idx_t i, floating tag) noexcept nogil:
    return (<floating*> base) + i if base != NULL else NULL


cdef void _opt_range(void* ctx, idx_t i0, idx_t i1, int tid) noexcept nogil:
    cdef const _opt_job* j = <const _opt_job*> ctx
    cdef float f = 0
    cdef double d = 0
    if j.dbl:
        _chunk(j.op, j.h, (<double*> j.p) + i0, (<const double*> j.g) + i0, _at(j.s1, i0, d),
               _at(j.s2, i0, d), _at(j.s3, i0, d), i1 - i0)
    else:
        _chunk(j.op, j.h, (<float*> j.p) + i0, (<const float*> j.g) + i0, _at(j.s1, i0, f),
               _at(j.s2, i0, f), _at(j.s3, i0, f), i1 - i0)


cdef void _clear(hyper_t* h) noexcept:
    h.lr = h.a = h.b = h.c = h.d = h.mom = h.eps = h.wd = 0
    h.shrink = 1
    h.flags = 0


def sgd_step(floating[::1] p, const floating[::1] g, floating[::1] buf, double lr, double momentum,
             double weight_decay, bint nesterov, bint first):
    """torch.optim.SGD (dampening 0); ``buf`` is the momentum buffer (None without momentum)."""
    cdef hyper_t h
    cdef floating[::1] _NONE = None  # typed, so the fused call resolves
    _clear(&h)
    h.lr = lr
    h.a = momentum
    h.wd = weight_decay
    h.flags = F_WD if weight_decay != 0 else 0
    if momentum != 0:
        if buf is None:
            raise ValueError("sgd_step: momentum needs a buffer")
        h.flags |= F_MOM_FIRST if first else F_MOM
        if nesterov:
            h.flags |= F_NESTEROV
    _run(OP_SGD, &h, p, g, buf, _NONE, _NONE)


def adam_step(floating[::1] p, const floating[::1] g, floating[::1] exp_avg,
              floating[::1] exp_avg_sq, double lr, double beta1, double beta2, double eps,
              double weight_decay, long step, bint decoupled=False):
    """torch.optim.Adam (amsgrad off) for step number ``step`` (1 on the first call); with
    ``decoupled`` torch.optim.AdamW (the parameter shrinks by ``1 - lr * weight_decay``)."""
    cdef hyper_t h
    cdef floating[::1] _NONE = None
    if exp_avg is None or exp_avg_sq is None:
        raise ValueError("adam_step: state buffers required")
    if step < 1:
        raise ValueError(f"adam_step: step must be at least 1, got {step}")
    _clear(&h)
    h.lr = lr / (1.0 - beta1 ** step)
    h.a = 1.0 - beta1
    h.b = beta2
    h.c = 1.0 - beta2
    h.d = sqrt(1.0 - beta2 ** step)
    h.eps = eps
    if weight_decay != 0:
        if decoupled:
            h.shrink = 1.0 - lr * weight_decay
            h.flags = F_DECOUPLED
        else:
            h.wd = weight_decay
            h.flags = F_WD
    _run(OP_ADAM, &h, p, g, exp_avg, exp_avg_sq, _NONE)


def adagrad_step(floating[::1] p, const floating[::1] g, floating[::1] state_sum, double lr,
                 double eps, double weight_decay=0.0):
    """torch.optim.Adagrad (lr_decay 0, initial accumulator 0)."""
    cdef hyper_t h
    cdef floating[::1] _NONE = None
    if state_sum is None:
        raise ValueError("adagrad_step: state buffer required")
    _clear(&h)
    h.lr = lr
    h.eps = eps
    h.wd = weight_decay
    h.flags = F_WD if weight_decay != 0 else 0
    _run(OP_ADAGRAD, &h, p, g, state_sum, _NONE, _NONE)


def rmsprop_step(floating[::1] p, const floating[::1] g, floating[::1] square_avg,
                 floating[::1] grad_avg, floating[::1] momentum_buffer, double lr, double alpha,
                 double eps, double weight_decay=0.0, double momentum=0.0):
    """torch.optim.RMSprop: centered when ``grad_avg`` is given; ``momentum_buffer`` is
    needed (and used) when ``momentum > 0``."""
    cdef hyper_t h
    if square_avg is None:
        raise ValueError("rmsprop_step: state buffer required")
    _clear(&h)
    h.lr = lr
    h.a = alpha
    h.c = 1.0 - alpha
    h.eps = eps
    h.wd = weight_decay
    h.flags = F_WD if weight_decay != 0 else 0
    if grad_avg is not None:
        h.flags |= F_CENTERED
    if momentum > 0:
        if momentum_buffer is None:
            raise ValueError("rmsprop_step: momentum needs a buffer")
        h.mom = momentum
        h.flags |= F_MOM
    else:
        momentum_buffer = None  # torch ignores a buffer kept from an earlier momentum
    _run(OP_RMSPROP, &h, p, g, square_avg, grad_avg, momentum_buffer)
