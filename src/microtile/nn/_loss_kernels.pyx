"""Softmax cross-entropy in one pass: the loss and its gradient with respect to the logits.

For each row the log-sum-exp is taken around the row's maximum (no overflow for any finite
logits), the loss term is ``lse - x[label]``, and the gradient ``(softmax - onehot) * scale``
is written in the same sweep, so the backward pass costs nothing but returning the buffer.
Sums are kept in float64 whatever the logits' dtype.
"""
from libc.math cimport exp, expf, log
from libc.stdlib cimport calloc, free

from microtile._common._typedefs cimport idx_t, floating
from microtile.linalg._gemm cimport gemm_params
from microtile._config._params cimport current_params
from microtile._common._mt_pool cimport mt_share, mt_share_end
from microtile._common._mt_pool cimport pool_items

cdef idx_t PAR_MIN = 1 << 15


ctypedef struct _xent_job:
    bint dbl
    idx_t n, c, share
    const void* x
    const Py_ssize_t* labels
    void* g
    double scale
    double* totals      # one per share, summed in share order (the same total every run)


cdef double _rows(const _xent_job* j, idx_t r0, idx_t r1, const floating* x,
                  floating* g) noexcept nogil:
    cdef idx_t i
    cdef double total = 0
    for i in range(r0, r1):
        total += _row(x + i * j.c, j.c, j.labels[i], g + i * j.c, j.scale)
    return total


cdef void _xent_item(void* ctx, idx_t t, int tid) noexcept nogil:
    cdef _xent_job* j = <_xent_job*> ctx
    cdef idx_t r0 = t * j.share, r1 = mt_share_end(r0, j.share, j.n)
    if r0 >= r1:
        return
    if j.dbl:
        j.totals[t] = _rows(j, r0, r1, <const double*> j.x, <double*> j.g)
    else:
        j.totals[t] = _rows(j, r0, r1, <const float*> j.x, <float*> j.g)


cdef double _row(const floating* x, idx_t c, idx_t label, floating* g,
                 double scale) noexcept nogil:
    """One row: returns lse(x) - x[label], writes g = (softmax(x) - onehot(label)) * scale."""
    cdef idx_t j
    cdef double m = x[0], s = 0, inv
    cdef floating e
    for j in range(1, c):
        if x[j] > m:
            m = x[j]
    for j in range(c):
        if floating is float:
            e = expf(<float> (x[j] - m))
        else:
            e = exp(x[j] - m)
        g[j] = e
        s += e
    inv = scale / s
    for j in range(c):
        g[j] = <floating> (g[j] * inv)
    g[label] = <floating> (g[label] - scale)
    return m + log(s) - x[label]


def check_labels(const Py_ssize_t[::1] labels, idx_t n_classes):
    """Index of the first label outside [0, n_classes), or -1 when all are valid."""
    cdef idx_t i, n = labels.shape[0]
    cdef idx_t bad = -1
    with nogil:
        for i in range(n):
            if labels[i] < 0 or labels[i] >= n_classes:
                bad = i
                break
    return bad


def softmax_xent(const floating[:, ::1] logits, const Py_ssize_t[::1] labels,
                 floating[:, ::1] grad, double scale):
    """Sum over rows of the cross-entropy; ``grad`` = (softmax - onehot) * scale.

    Labels must already have been checked with ``check_labels``.
    """
    cdef idx_t n = logits.shape[0], c = logits.shape[1], i
    cdef double total = 0
    cdef int nt = 1
    cdef gemm_params prm
    cdef _xent_job job
    if labels.shape[0] != n or grad.shape[0] != n or grad.shape[1] != c:
        raise ValueError("softmax_xent: logits, labels and grad disagree in shape")
    if n == 0:
        return 0.0
    if c == 0:
        raise ValueError("softmax_xent: logits have no classes")
    if n * c >= PAR_MIN and n >= 2:
        current_params(0, &prm)
        nt = prm.n_threads if prm.n_threads > 1 else 1
    cdef const floating* px = &logits[0, 0]
    cdef floating* pg = &grad[0, 0]
    if nt == 1:
        with nogil:
            for i in range(n):
                total += _row(px + i * c, c, labels[i], pg + i * c, scale)
    else:
        job.dbl = floating is double
        job.n = n
        job.c = c
        job.share = mt_share(n, nt)
        job.x = px
        job.labels = &labels[0]
        job.g = pg
        job.scale = scale
        job.totals = <double*> calloc(nt, sizeof(double))
        if job.totals == NULL:
            raise MemoryError("softmax_xent: out of memory")
        with nogil:
            pool_items(nt, (n + job.share - 1) // job.share, _xent_item, &job)
            for i in range(nt):
                total += job.totals[i]
        free(job.totals)
    return total
