"""Gradient sums among the ranks of one machine, through memory they share.

Two ranks on this 2-core machine summing 7.1 MB of float32 gradients (the 784-1024-1024-10
MLP) with Open MPI 4.1's shared-memory transport (single-copy CMA), medians of 30 calls:
``Allreduce`` 2.4 ms, ``Iallreduce`` + ``Wait`` 6.0 ms (libnbc's default algorithm; its
ring 2.7 ms); each rank reading the other's buffer in a shared window, 0.5 ms.  So when
every rank of the communicator is on one machine, the buckets live in an MPI shared-memory
window (``MPI_Win_allocate_shared``), and the sum is a reduce-scatter and an allgather made
of plain loads and stores: each rank adds the others' copies of its own slice of a bucket
into its copy, then copies the others' summed slices into the rest of its copy.  No message
is sent and nothing goes through MPI's buffers.  Each slice is summed by one rank only, so
every rank ends with the same bits.

Protocol, for bucket ``b`` in step ``s`` (steps are numbered alike on every rank).  Each rank
owns three counters per bucket in its segment of the window, each the last step that passed
that point, and writes only its own counters and its own copy of the buckets:

- ``READY``: its gradients of ``b`` are final, and its weight in the step's sum is beside
  its counters; it writes neither again until every rank has ``COPIED``;
- ``SUMMED``: its slice of its copy holds the sum; it reads the others' copies of that slice
  no more;
- ``COPIED``: it holds every other slice's sum; it reads the others' copies no more.

A rank sums its slice once every rank is ``READY``, copies the others' slices once every
rank has ``SUMMED``, and returns from the step (after which its next backward writes its
copy again) only once every rank has ``COPIED``.  Each counter is written after a memory barrier
(``MPI_Win_sync``) and read before one, so the data it announces is visible with it on
machines with weaker ordering than x86.  A rank never sees another's counter past its own
step (each waits for every rank's ``COPIED`` before it starts the next one); one that does
raises, since the ranks' steps no longer match.
"""
import contextlib
import os
import signal
import threading
import time

import numpy as np

from microtile.distributed import _world
from microtile.distributed._mpi import MPI

# The counters (rows of each rank's counter array).
READY, SUMMED, COPIED = 0, 1, 2
# Where this rank is with a bucket in the current step.
_UNPUBLISHED, _TO_SUM, _TO_COPY, _DONE = range(4)
_LINE = 64          # each rank's counters and each bucket start on their own cache line
_SPINS = 64         # polls of a counter before yielding the CPU between polls
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C held back until the block is done (and raised right after): a sum added in
    place and the record that it was added must not be separated by a KeyboardInterrupt,
    or the step finished after it would add the other ranks' gradients twice.  Python runs
    signal handlers in the main thread only, between bytecodes: the block swaps in a
    handler that notes the signal.  (Blocking SIGINT in this thread is not enough: MPI's
    own threads leave it unblocked and take it.)  Only SIGINT is held: an exception from
    another signal's Python handler can still land inside the block."""
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or old is None:
        # Handlers run in the main thread: nothing interrupts this one.  None: a handler
        # installed outside Python (an embedding program's), which Python cannot put back.
        yield
        return
    caught = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
        yield
    finally:
        # signal.signal runs pending handlers first: one that raises (a SIGALRM timeout)
        # must not leave the noting handler installed for good.
        error = None
        while True:
            try:
                signal.signal(signal.SIGINT, old)
                break
            except BaseException as exc:   # noqa: BLE001 - re-raised below
                error = exc
        if error is not None:
            raise error
        if caught:
            if callable(old):
                old(signal.SIGINT, caught[0])       # default_int_handler raises
            elif old == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


def _aligned(nbytes):
    return -(-nbytes // _LINE) * _LINE


def open_exchange(comm, sizes, dtypes):
    """A ``NodeExchange`` for buckets of ``sizes`` elements of ``dtypes`` when every rank
    of ``comm`` (more than one) shares this machine and the MPI library gives a shared
    window; else None (the buckets then go through MPI's allreduce).  A collective."""
    if comm.Get_size() < 2:
        return None
    node = _world.node_comm(comm)
    if node.Get_size() != comm.Get_size():
        node.Free()
        return None
    try:
        exchange = NodeExchange(node, sizes, dtypes)
    except MPI.Exception:
        # No shared window from this MPI (one without MPI-3 shared memory, or short of
        # it): fall back to MPI's allreduce -- on every rank if on any, and only once every
        # rank has zeroed its counters (this allreduce is also that barrier).
        exchange = None
    if not node.allreduce(exchange is not None, op=MPI.LAND):
        if exchange is None:
            node.Free()
        return None
    return exchange


class NodeExchange:
    """The buckets of every rank on one machine in one shared window; ``buffers[b]`` is
    this rank's copy of bucket ``b`` (where its gradients live).

    Use per step: ``begin()``; ``publish(b, weight)`` once bucket ``b``'s gradients are final,
    ``progress()`` whenever there is a moment, ``complete()`` at the end (it returns once
    every published bucket is summed on every rank and no rank reads this rank's copy any
    more).  Every rank must publish every bucket in every step.
    """

    def __init__(self, node, sizes, dtypes):
        self.node = node
        self.rank = node.Get_rank()
        self.size = node.Get_size()
        nb = len(sizes)
        head = _aligned((3 * nb + 1) * 8)     # the counters, then this rank's weight
        offsets, at = [], head
        for n, dt in zip(sizes, dtypes):
            offsets.append(at)
            at += _aligned(n * np.dtype(dt).itemsize)
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")   # each rank's segment page-aligned
        try:
            self.win = MPI.Win.Allocate_shared(at, 1, info, comm=node)
        finally:
            info.Free()
        # A passive-target epoch for the whole life of the window: MPI_Win_sync (the
        # memory barrier below) is defined inside one.
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.counters, self.weights, self.copies = [], [], []
        for q in range(self.size):
            mem, _ = self.win.Shared_query(q)
            raw = np.frombuffer(mem, dtype=np.uint8, count=at)
            self.counters.append(raw[:3 * nb * 8].view(np.int64).reshape(3, nb))
            self.weights.append(raw[3 * nb * 8:(3 * nb + 1) * 8].view(np.float64))
            self.copies.append([raw[o:o + n * np.dtype(dt).itemsize].view(dt)
                                for o, n, dt in zip(offsets, sizes, dtypes)])
        self.buffers = self.copies[self.rank]
        self.counters[self.rank][...] = 0
        self.slices = [[(q * n // self.size, (q + 1) * n // self.size)
                        for q in range(self.size)] for n in sizes]
        self.others = [q for q in range(self.size) if q != self.rank]
        # For sums with unequal weights (an uneven last batch): another rank's slice times
        # its weight, per dtype, the size of the largest slice; made when first needed.
        self._scratch = {}
        self._largest = {}
        for sl, dt in zip(self.slices, dtypes):
            dt = np.dtype(dt)
            self._largest[dt] = max([self._largest.get(dt, 0)] + [hi - lo for lo, hi in sl])
        self.step = 0
        self._state = [_DONE] * nb
        self.win.Sync()     # the zeros visible before open_exchange's closing allreduce

    # -- the protocol ---------------------------------------------------------------------
    def begin(self):
        self.step += 1
        self._state = [_UNPUBLISHED] * len(self._state)

    def publish(self, b, weight):
        """This rank's copy of bucket ``b`` is final for this step; the sum is to take it
        times ``weight`` (the same for every bucket of a step)."""
        with _interrupts_held():
            self.weights[self.rank][0] = weight
            self._set(READY, b)
            self._state[b] = _TO_SUM
        self.progress()

    def progress(self):
        """Do whatever the other ranks' counters already allow, without waiting."""
        for b, state in enumerate(self._state):
            if state == _TO_SUM and self._reached(READY, b):
                self._sum(b)
                state = _TO_COPY
            if state == _TO_COPY and self._reached(SUMMED, b):
                self._copy(b)

    def complete(self):
        """Finish every published bucket, waiting for the other ranks as needed."""
        for b, state in enumerate(self._state):
            if state == _TO_SUM:
                self._wait(READY, b)
                self._sum(b)
        for b, state in enumerate(self._state):
            if state == _TO_COPY:
                self._wait(SUMMED, b)
                self._copy(b)
        for b, state in enumerate(self._state):
            if state != _UNPUBLISHED:
                self._wait(COPIED, b)

    # -- the steps --------------------------------------------------------------------------
    def _sum(self, b):
        # The weights are applied here, on a slice, not by each rank to its whole copy
        # before publishing it: equal weights (every step but an uneven last batch) cost
        # one multiplication of the summed slice, where scaling first was a pass over all
        # of the gradients (0.7-1.9 ms per MLP step above).  Python floats, as the MPI path
        # scales by: a float32 slice is multiplied in float32.
        with _interrupts_held():
            lo, hi = self.slices[b][self.rank]
            if hi > lo:
                mine = self.buffers[b][lo:hi]
                w = float(self.weights[self.rank][0])
                if all(float(self.weights[q][0]) == w for q in self.others):
                    for q in self.others:
                        np.add(mine, self.copies[q][b][lo:hi], out=mine)
                    if w != 1.0:
                        np.multiply(mine, w, out=mine)
                else:
                    dt = mine.dtype
                    if dt not in self._scratch:
                        self._scratch[dt] = np.empty(self._largest[dt], dt)
                    tmp = self._scratch[dt][:hi - lo]
                    np.multiply(mine, w, out=mine)
                    for q in self.others:
                        np.multiply(self.copies[q][b][lo:hi], float(self.weights[q][0]),
                                    out=tmp)
                        np.add(mine, tmp, out=mine)
            self._set(SUMMED, b)
            self._state[b] = _TO_COPY

    def _copy(self, b):
        # Held too: copied again after the last COPIED, a slice could already hold the
        # other rank's next gradients.
        with _interrupts_held():
            mine = self.buffers[b]
            for q in self.others:
                lo, hi = self.slices[b][q]
                if hi > lo:
                    mine[lo:hi] = self.copies[q][b][lo:hi]
            self._set(COPIED, b)
            self._state[b] = _DONE

    # -- counters ---------------------------------------------------------------------------
    def _set(self, which, b):
        self.win.Sync()                     # what the counter announces is visible first
        self.counters[self.rank][which, b] = self.step

    def _reached(self, which, b):
        step = self.step
        for q in self.others:
            seen = self.counters[q][which, b]
            if seen < step:
                return False
            if seen > step:
                self._ahead(q, seen)
        self.win.Sync()                     # then read what it announces
        return True

    def _wait(self, which, b):
        step = self.step
        for q in self.others:
            counter = self.counters[q][which]
            spins = 0
            while counter[b] < step:
                spins += 1
                if spins > _SPINS:
                    # The other rank may have lost its core (a busy machine): give it ours.
                    _yield()
            if counter[b] > step:
                self._ahead(q, counter[b])
        self.win.Sync()

    def _ahead(self, q, seen):
        raise RuntimeError(
            f"DistributedDataParallel: rank {q} of this machine is at gradient step {seen} "
            f"and this rank at {self.step}: the ranks' backward calls no longer match (a "
            f"step interrupted on some ranks only?)")
