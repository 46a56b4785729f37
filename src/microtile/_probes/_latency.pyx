"""Pointer chasing: the load-to-use latency of a buffer of a given size.

Each visited slot of the buffer holds the address of the next slot; the order is a random
cycle (chosen by the caller), so every load depends on the one before and no prefetcher can
guess the next address.  The time per load steps up where the buffer stops fitting in a
cache level.
"""
import numpy as np

from libc.stdint cimport intptr_t

# Buffers start on a 2 MiB boundary so that a transparent huge page can back them and the
# slot-to-set mapping does not depend on where the allocator put the array.
_ALIGN = 2 * 1024 * 1024


cdef intptr_t _chase(intptr_t p, Py_ssize_t count) noexcept nogil:
    cdef Py_ssize_t i
    # Unrolled so the loop's own overhead stays far below one load's latency.
    for i in range(count // 8):
        p = (<intptr_t*> p)[0]
        p = (<intptr_t*> p)[0]
        p = (<intptr_t*> p)[0]
        p = (<intptr_t*> p)[0]
        p = (<intptr_t*> p)[0]
        p = (<intptr_t*> p)[0]
        p = (<intptr_t*> p)[0]
        p = (<intptr_t*> p)[0]
    return p


cdef class Chain:
    """A buffer of ``nbytes`` whose slots ``order[i] * stride_bytes`` form one cycle.

    The buffer is private, so ``chase`` can only ever follow addresses this object wrote.
    """
    cdef object _mem
    cdef intptr_t _start
    cdef readonly Py_ssize_t nbytes, slots

    def __init__(self, Py_ssize_t nbytes, order, Py_ssize_t stride_bytes):
        cdef const long long[::1] ord_
        cdef Py_ssize_t n, i, stride, nwords
        cdef intptr_t* base
        if stride_bytes < <Py_ssize_t> sizeof(intptr_t) or stride_bytes % sizeof(intptr_t):
            raise ValueError("stride_bytes must be a positive multiple of the pointer size")
        if nbytes < stride_bytes:
            raise ValueError("buffer smaller than one slot")
        ord_ = np.ascontiguousarray(order, dtype=np.int64)
        n = ord_.shape[0]
        stride = stride_bytes // sizeof(intptr_t)
        nwords = nbytes // sizeof(intptr_t)
        if n == 0:
            raise ValueError("empty order")
        for i in range(n):
            if ord_[i] < 0 or (ord_[i] + 1) * stride > nwords:
                raise ValueError("order names a slot outside the buffer")
        raw = np.zeros(nbytes + _ALIGN, dtype=np.uint8)
        off = (-raw.ctypes.data) % _ALIGN
        self._mem = raw[off:off + nbytes]
        base = <intptr_t*> <intptr_t> self._mem.ctypes.data
        with nogil:
            for i in range(n - 1):
                base[ord_[i] * stride] = <intptr_t> &base[ord_[i + 1] * stride]
            base[ord_[n - 1] * stride] = <intptr_t> &base[ord_[0] * stride]
        self._start = <intptr_t> &base[ord_[0] * stride]
        self.nbytes = nbytes
        self.slots = n

    def chase(self, Py_ssize_t count):
        """Follow the cycle for ``count`` loads (rounded down to a multiple of 8) without the
        GIL.  Returns where it stopped, so the loads cannot be optimised away; the next call
        continues from there."""
        cdef intptr_t p = self._start
        with nogil:
            p = _chase(p, count)
        self._start = p
        return p
