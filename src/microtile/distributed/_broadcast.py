"""Rank 0's parameters and buffers, copied in place into every other rank's model.

In place (``np.copyto`` into the arrays the model owns) so that an optimizer built on the
parameters before the model was wrapped keeps updating the same arrays, and a layer that
holds a view of a buffer keeps seeing it.
"""
import numpy as np

# Offsets in the packed buffer are rounded up to this many bytes, so each array's slice is
# aligned for its dtype (numpy copies unaligned data too, only more slowly).
_ALIGN = 16


def broadcast_parameters(comm, buckets):
    """Rank 0's parameter values into every rank, one bucket buffer at a time."""
    root = comm.Get_rank() == 0
    for bucket in buckets:
        # Not the bucket's buffer: it holds the gradients (see _buckets).
        buf = np.empty_like(bucket.buffer)
        if root:
            for p, a, b, _ in bucket.entries:
                buf[a:b] = p._flat_data
        comm.Bcast(buf, root=0)
        if not root:
            for p, a, b, _ in bucket.entries:
                p._flat_data[...] = buf[a:b]


class BufferBroadcast:
    """Rank 0's buffers (BatchNorm's running statistics, ...) into every rank in one
    ``Bcast`` of a packed byte buffer that is kept and reused."""

    def __init__(self, comm, buffers):
        self.comm = comm
        self.arrays = [a for a in buffers if a.size]
        self._slices = []
        offset = 0
        for a in self.arrays:
            offset = -(-offset // _ALIGN) * _ALIGN
            self._slices.append((offset, offset + a.nbytes))
            offset += a.nbytes
        self.packed = np.zeros(offset, np.uint8)
        self._views = [self.packed[a:b].view(arr.dtype).reshape(arr.shape)
                       for arr, (a, b) in zip(self.arrays, self._slices)]

    def __bool__(self):
        return bool(self.arrays)

    def __call__(self):
        if not self.arrays:
            return
        root = self.comm.Get_rank() == 0
        if root:
            for arr, view in zip(self.arrays, self._views):
                np.copyto(view, arr)
        self.comm.Bcast(self.packed, root=0)
        if not root:
            for arr, view in zip(self.arrays, self._views):
                np.copyto(arr, view)
