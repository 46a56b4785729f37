"""Softmax cross-entropy in one pass: the loss and its gradient with respect to the logits.

For each row the log-sum-exp is taken around the row's maximum (no overflow for any finite
logits), the loss term is ``lse - x[label]``, and the gradient ``(softmax - onehot) * scale``
is written in the same sweep, so the backward pass costs nothing but returning the buffer.
Sums are kept in float64 whatever the logits' dtype.
"""
from cython.parallel cimport prange
from libc.math cimport exp, expf, log

from microtile._common._typedefs cimport idx_t, floating
from microtile.linalg._gemm cimport gemm_params
from microtile._config._params cimport current_params

cdef idx_t PAR_MIN = 1 << 15


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
        for i in prange(n, num_threads=nt, schedule="static", nogil=True):
            total += _row(px + i * c, c, labels[i], pg + i * c, scale)
    return total
