"""Gradient buckets: contiguous buffers reduced with non-blocking allreduces during backward.

The parameters are laid out, once, in the order backward finishes them (a Sequential's last
layer first; see ``microtile.nn._module.backward_leaves``) and cut into buckets of one dtype
and at most ``cap_bytes`` each (a larger parameter gets a bucket of its own).  During a
backward pass the layers report their gradients final through ``grads_ready_hook``; once
every parameter of a bucket is final, its gradients are copied into the bucket's buffer
(scaled by this rank's weight) and an ``Iallreduce`` (sum, in place) starts on it while the
layers before keep computing.  ``finish`` starts whatever has not started and waits.  When
every rank shares this machine, the buffers live in a shared-memory window and the sums are
made there instead (``_node.NodeExchange``), the weights applied as the slices are summed.

The gradients live in the buckets' buffers (``Parameter._move_grad_to``, when the buckets
are made), so a bucket is scaled in place and its sums are the gradients: copying every
gradient into its bucket and the sums back took 2.9 ms of a 36.7 ms two-rank MLP step
(784-1024-1024-10, batch 128 per rank), and the copies took 7 MB more per rank of a cache
the two ranks share.  A gradient that is not in its bucket's buffer any more (the model
wrapped again since) is copied in and out as before.

Every rank starts the buckets in the same order, bucket 0 first, whatever order its layers
finish in: MPI requires collectives on one communicator to be started in the same order on
every rank, and a bucket that is not ready yet holds back the ones after it.  A bucket
always goes out, on every rank, in every step, even when a parameter of it received no
gradient (it then contributes zeros): no rank can wait for a message that never comes.
"""
import time

import numpy as np

from microtile.distributed._mpi import MPI
from microtile.distributed._node import open_exchange
from microtile.nn._module import Module, backward_leaves

# Sum the buckets of ranks that share one machine through shared memory (see _node) rather
# than MPI's allreduce; the tests turn it off to run the MPI path on one machine too.
NODE_EXCHANGE = True


def _leaf_parameters(leaf):
    if isinstance(leaf, Module):
        return leaf.parameters()
    params = getattr(leaf, "parameters", None)
    return list(params()) if callable(params) else []


class _Bucket:
    """One contiguous buffer and the parameter slices it holds."""

    __slots__ = ("buffer", "entries", "size")

    def __init__(self, dtype, params, buffer=None):
        offsets = np.cumsum([0] + [p.size for p in params])
        self.buffer = np.zeros(int(offsets[-1]), dtype) if buffer is None else buffer
        # (parameter, start, end, the view of the buffer that holds its gradient)
        self.entries = []
        for p, a, b in zip(params, offsets, offsets[1:]):
            view = self.buffer[int(a):int(b)]
            p._move_grad_to(view)
            self.entries.append((p, int(a), int(b), view))
        self.size = len(params)

    @property
    def nbytes(self):
        return self.buffer.nbytes


def plan_order(module, params):
    """``(order, leaf_slots, owners)``: ``params`` in the order backward finishes them; for
    each leaf (by id) the positions in ``order`` of its parameters; for each position the
    number of leaf calls that finish it (0 for a parameter no leaf reports: it is reduced
    at the end of backward)."""
    wanted = {id(p): p for p in params}
    order, position = [], {}
    leaf_slots, owners = {}, []
    for leaf in backward_leaves(module):
        slots = leaf_slots.get(id(leaf))
        if slots is None:
            slots = []
            for p in _leaf_parameters(leaf):
                if id(p) not in wanted:
                    continue
                if id(p) not in position:
                    position[id(p)] = len(order)
                    order.append(p)
                    owners.append(0)
                if position[id(p)] not in slots:
                    slots.append(position[id(p)])
            leaf_slots[id(leaf)] = slots
        # A leaf that occurs twice is reported twice: its parameters are final only then.
        for pos in slots:
            owners[pos] += 1
    for p in params:
        if id(p) not in position:
            position[id(p)] = len(order)
            order.append(p)
            owners.append(0)
    return order, {k: v for k, v in leaf_slots.items() if v}, owners


def plan_buckets(order, cap_bytes):
    """Cut ``order`` into runs of one dtype whose bytes stay within ``cap_bytes`` (a
    parameter larger than that alone); returns ``[[param, ...], ...]``."""
    runs, run, used = [], [], 0
    for p in order:
        nbytes = p.size * p.dtype.itemsize
        if run and (p.dtype != run[0].dtype or used + nbytes > cap_bytes):
            runs.append(run)
            run, used = [], 0
        run.append(p)
        used += nbytes
    if run:
        runs.append(run)
    return runs


class GradientReducer:
    """Averages the gradients of ``params`` over ``comm`` in buckets, during backward.

    Use: ``begin(scale)`` before the backward pass, ``ready`` as its ``grads_ready_hook``
    callback, ``finish()`` after it (also when it failed).  ``scale`` is this rank's weight
    in the sum (``1 / world size`` for a plain average); ``begin(0.0, zero=True)`` then
    ``finish()`` is the part of a rank that has no samples in a step.
    """

    def __init__(self, comm, module, params, cap_bytes):
        self.comm = comm
        order, self._leaf_slots, self._owners = plan_order(module, params)
        runs = plan_buckets(order, cap_bytes)
        sizes = [sum(p.size for p in run) for run in runs]
        dtypes = [run[0].dtype for run in runs]
        # Every rank must cut the same buckets (same model, same bucket_cap_mb), or each
        # would sum another rank's bytes at the wrong offsets.
        layouts = comm.allgather([(n, dt.str) for n, dt in zip(sizes, dtypes)])
        for r, layout in enumerate(layouts[1:], start=1):
            if layout != layouts[0]:
                raise ValueError(
                    f"DistributedDataParallel: rank {r} cuts the gradients into buckets of "
                    f"{[n for n, _ in layout]} elements and rank 0 into "
                    f"{[n for n, _ in layouts[0]]}: every rank must pass the same "
                    f"bucket_cap_mb")
        # A collective: every rank takes the same path.
        self._exchange = open_exchange(comm, sizes, dtypes) if NODE_EXCHANGE else None
        self.transport = "mpi" if self._exchange is None else "shared memory"
        self.buckets = [_Bucket(run[0].dtype, run,
                                None if self._exchange is None else self._exchange.buffers[b])
                        for b, run in enumerate(runs)]
        where = {}
        for b, run in enumerate(runs):
            for p in run:
                where[id(p)] = b
        self._bucket_of = [where[id(p)] for p in order]
        # Whether ready() starts buckets (False: all start in finish, after backward;
        # tools/bench_distributed.py compares the two to see how much backward hides).
        self.overlap = True
        self.last_step = {}
        self._requests = []
        self._active = False
        self._remaining = []
        self._pending = []
        self._next = 0
        self._scale = 1.0
        self._zero = False
        self._late = False

    # -- a step -------------------------------------------------------------------------
    def begin(self, scale, zero=False):
        if self._active:
            # A step interrupted by KeyboardInterrupt: the other ranks reduce (or wait
            # for) every bucket of it, so this rank sends the rest too and waits, before
            # its buffers are reused.  Its replica may now differ from the others' (this
            # rank skipped that step's optimizer update): reload a checkpoint.
            self.finish(write=False)
        if self._exchange is not None:
            self._exchange.begin()
        self._remaining = list(self._owners)
        self._pending = [b.size for b in self.buckets]
        self._next = 0
        self._scale = float(scale)
        # A rank with no samples in this step sends zeros, whatever its gradients hold
        # (0 * NaN would not be zero).
        self._zero = bool(zero)
        self._late = False
        self._active = True
        self._launch_seconds = 0.0
        self._t_begin = time.perf_counter()

    def ready(self, leaf):
        """``grads_ready_hook`` callback: ``leaf``'s parameters are final."""
        if not self._active:
            return
        slots = self._leaf_slots.get(id(leaf))
        if slots:
            remaining, pending, bucket_of = self._remaining, self._pending, self._bucket_of
            for pos in slots:
                left = remaining[pos] - 1
                remaining[pos] = left
                if left == 0:
                    pending[bucket_of[pos]] -= 1
                elif left < 0:
                    # Reported once more than the model's structure says: gradient added
                    # after its bucket left would be missing from the average.
                    self._late = True
            if self.overlap:
                self._start_ready()
        if self._exchange is not None:
            self._exchange.progress()
        elif self._requests:
            # Open MPI moves a non-blocking collective along only inside MPI calls: a test
            # between layers lets the reductions already started progress during backward.
            MPI.Request.Testall(self._requests)

    def finish(self, write=True):
        """Start every bucket not yet started and wait for all; the gradients kept in the
        buckets then hold the averages, and (``write``) any other gets them copied in.
        Returns this step's timings (also ``last_step``)."""
        if not self._active:
            raise RuntimeError("GradientReducer.finish without begin")
        t_end = time.perf_counter()
        started_early = self._next
        while self._next < len(self.buckets):
            self._start(self._next)
        t0 = time.perf_counter()
        if self._exchange is not None:
            self._exchange.complete()
        MPI.Request.Waitall(self._requests)
        t1 = time.perf_counter()
        self._requests = []
        self._active = False
        for bucket in self.buckets:
            for p, _, _, view in bucket.entries:
                with p._lock:
                    if p._flat_grad is view:
                        p._grad_is_zero = False         # the sums are the gradient
                    elif write:
                        p._flat_grad[...] = view
                        p._grad_is_zero = False
        self.last_step = {
            "backward_seconds": t_end - self._t_begin,
            "launch_seconds": self._launch_seconds,
            "wait_seconds": t1 - t0,
            "buckets": len(self.buckets),
            "started_during_backward": started_early,
        }
        if self._late:
            raise RuntimeError(
                "DistributedDataParallel: a layer's backward reported its gradients final "
                "more often than the model's structure says (a layer run twice in one "
                "forward, or the model changed after wrapping): its later gradient is not "
                "in the average")
        return self.last_step

    # -- buckets --------------------------------------------------------------------------
    def _start_ready(self):
        pending = self._pending
        while self._next < len(pending) and pending[self._next] == 0:
            self._start(self._next)

    def _start(self, b):
        t0 = time.perf_counter()
        bucket = self.buckets[b]
        buf = bucket.buffer
        scale = self._scale
        if self._exchange is not None:
            scale = 1.0         # the exchange weights the slices as it sums them
        for p, a, c, view in bucket.entries:
            with p._lock:
                if p._grad_is_zero or self._zero:
                    view.fill(0)        # no gradient on this rank: it counts as zero
                elif p._flat_grad is view:
                    if scale != 1.0:
                        np.multiply(view, scale, out=view)
                elif scale == 1.0:
                    view[...] = p._flat_grad
                else:
                    np.multiply(p._flat_grad, scale, out=view)
        self._next = b + 1
        if self._exchange is not None:
            self._exchange.publish(b, self._scale)
        else:
            self._requests.append(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        self._launch_seconds += time.perf_counter() - t0
