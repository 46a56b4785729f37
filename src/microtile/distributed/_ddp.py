"""DistributedDataParallel: one model replica per MPI rank, gradients averaged over ranks."""
import math

import numpy as np

from microtile.distributed._broadcast import BufferBroadcast, broadcast_parameters
from microtile.distributed._buckets import GradientReducer
from microtile.distributed._mpi import MPI
from microtile.distributed._threads import share_threads
from microtile.distributed._world import as_comm
from microtile.nn._module import Module, check_real, grads_ready_hook

_OWNER = "DistributedDataParallel"
_MB = 1 << 20   # torch's bucket_cap_mb counts mebibytes


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _signature(module):
    """What every rank's replica must agree on: names, shapes and dtypes of the
    parameters and buffers, in order."""
    return ([("parameter", name, p.shape, p.dtype.str) for name, p in module.named_parameters()]
            + [("buffer", name, b.shape, b.dtype.str) for name, b in module.named_buffers()])


def _check_same_model(comm, module):
    """ValueError on every rank when some rank's replica differs from rank 0's (a hang or
    silently mixed gradients otherwise)."""
    signatures = comm.allgather(_signature(module))
    reference = signatures[0]
    for r, sig in enumerate(signatures[1:], start=1):
        if sig == reference:
            continue
        if len(sig) != len(reference):
            detail = (f"{len(sig)} parameters and buffers against rank 0's "
                      f"{len(reference)}")
        else:
            a, b = next((a, b) for a, b in zip(sig, reference) if a != b)
            detail = (f"{a[0]} {a[1]!r} with shape {a[2]} and dtype {a[3]} where rank 0 has "
                      f"{b[0]} {b[1]!r} with shape {b[2]} and dtype {b[3]}")
        raise ValueError(f"{_OWNER}: rank {r}'s model differs from rank 0's: {detail}")


class DistributedDataParallel(Module):
    """Data-parallel training over MPI: each rank holds a replica of ``module`` and trains
    on its own part of every batch; ``backward`` leaves the mean of all ranks' gradients
    in every replica, so the same optimizer step keeps the replicas identical.

    Run the script with ``mpirun -n P python train.py`` (one machine or several); without
    mpirun it is a world of one process and trains exactly as ``module`` alone.

    At construction, rank 0's parameters and buffers are copied into every rank (in place:
    an optimizer already holding the parameters keeps working).  During ``backward`` the
    gradients are summed in buckets of at most ``bucket_cap_mb``, each started as soon as
    its layers' gradients are final (the last layers' first), so communication overlaps the
    rest of backward; ``backward`` returns once all of them are complete.  When every rank
    shares one machine, the buckets live in an MPI shared-memory window and each rank sums
    its slice of them from the others' copies (a few times faster than MPI's allreduce for
    two ranks); otherwise each bucket is a non-blocking allreduce.  In training mode every
    ``forward`` first copies rank 0's buffers (BatchNorm's running statistics) into every
    rank, as torch's DDP does by default.

    Called like the module: ``ddp(x)``, ``ddp.forward``, ``ddp.backward(dy)``,
    ``ddp.parameters()``, ``ddp.train()``/``ddp.eval()``, ``ddp.zero_grad()``; its
    ``state_dict`` is the module's (same keys, no prefix).  ``nn.fit``, ``nn.save`` and
    ``nn.load`` know it (see Notes).

    Parameters
    ----------
    module : microtile.nn.Module
        The model (usually a Sequential).  Every rank must build the same architecture.
        Do not add or replace its parameters after wrapping.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that train together; default ``MPI.COMM_WORLD``.
    bucket_cap_mb : float
        Largest bucket, in MiB (``2**20`` bytes), as torch's.  Smaller buckets start
        sooner during backward; larger ones make fewer, more efficient messages.  A
        parameter larger than the cap gets a bucket of its own.  The buckets hold the
        gradients themselves: wrapping moves each parameter's ``grad`` into its bucket
        (its value kept), so an array taken from ``p.grad`` before wrapping no longer
        follows the gradient; take it again after.

    Raises
    ------
    TypeError
        ``module`` is not a microtile.nn Module (or is already wrapped), ``comm`` is not
        an mpi4py intra-communicator, ``bucket_cap_mb`` is not a number.
    ValueError
        ``bucket_cap_mb`` is not positive and finite; a rank's model differs from rank
        0's in its parameters' or buffers' names, shapes or dtypes (raised on every rank).

    Notes
    -----
    Construction is collective: every rank of ``comm`` must construct the wrapper, as it
    must call ``forward`` (in training mode) and ``backward`` as many times as the others.
    A rank that dies of an exception leaves the others waiting: run scripts as
    ``mpirun -n P python -m mpi4py train.py``, whose runner aborts every rank then.  A
    ``backward`` that raises on every rank alike (no forward before it, a shape error)
    raises on every rank and leaves the wrapper usable.

    Every rank's gradients of a step are summed even when a parameter received none on
    some rank (it counts as zero there): no rank waits for another forever.  The replicas
    stay bitwise identical as long as every rank gets the same sum (in shared memory each
    element is summed by one rank and copied by the others; Open MPI's and MPICH's
    allreduce algorithms sum each element once, or in the same pairs on every rank), since
    the optimizer then takes the same step on each.  The shared window lives until MPI is
    finalized (freeing it is a collective, which a garbage-collected wrapper cannot make).

    Threads: unless ``MICROTILE_NUM_THREADS`` or ``OMP_NUM_THREADS`` is set, or
    ``microtile.set_num_threads`` was called before, construction gives this rank its
    share of the CPUs of its machine, counting the ranks that share the machine with
    ``Split_type(COMM_TYPE_SHARED)``, so that ranks do not oversubscribe it.

    ``nn.fit(ddp, ...)``: ``batch_size`` is per rank; every rank uses rank 0's shuffled
    order and trains on its own slice of each global batch of ``P * batch_size`` samples
    (the last one split as evenly as possible); each rank's gradient is weighted by its
    share of the global batch's samples; the epoch's figures are over all ranks' samples;
    only rank 0 shows progress.  ``nn.save(ddp, path)`` writes on rank 0 only and returns
    on every rank once the file is complete; ``nn.load(ddp, path)`` reads on every rank.
    """

    def __init__(self, module, comm=None, bucket_cap_mb=25):
        if isinstance(module, DistributedDataParallel):
            raise TypeError(f"{_OWNER}: module is already wrapped")
        if not isinstance(module, Module):
            raise TypeError(f"{_OWNER}: module must be a microtile.nn Module, got "
                            f"{type(module).__name__}")
        comm = as_comm(comm, _OWNER)
        cap = check_real(bucket_cap_mb, "bucket_cap_mb", _OWNER, 0.0, math.inf)
        if not 0.0 < cap < math.inf:
            raise ValueError(f"{_OWNER}: bucket_cap_mb must be positive and finite, got "
                             f"{bucket_cap_mb!r}")
        self.module = module
        self._comm = comm
        self._rank = comm.Get_rank()
        self._size = comm.Get_size()
        self._bucket_cap_mb = cap
        # Every step below is a collective, in the same order on every rank.
        _check_same_model(comm, module)
        share_threads(comm)
        params = _unique(module.parameters())
        self._reducer = GradientReducer(comm, module, params, max(1, int(cap * _MB)))
        self._buffers = BufferBroadcast(comm, [b for _, b in module.named_buffers()])
        if self._size > 1:
            broadcast_parameters(comm, self._reducer.buckets)
            self._buffers()
        # This rank's weight in backward's sum (None: 1 / world size); see
        # _weighted_backward.
        self._grad_scale = None

    # -- what the wrapper is ----------------------------------------------------------------
    @property
    def comm(self):
        """The communicator the ranks train over."""
        return self._comm

    @property
    def bucket_cap_mb(self):
        """The largest bucket, in MiB."""
        return self._bucket_cap_mb

    @property
    def training(self):
        """The wrapped module's mode."""
        return self.module.training

    def train(self, mode=True):
        """Training mode (or evaluation mode) for the wrapped module; returns the wrapper."""
        self.module.train(mode)
        return self

    def _named_children(self):
        # modules() and nn.prune reach the layers through this; state-dict keys and
        # parameter names are the module's own (see below), without a "module." prefix.
        return [("module", self.module)]

    def named_parameters(self, prefix=""):
        """The module's ``named_parameters`` (no ``module.`` prefix)."""
        return self.module.named_parameters(prefix)

    def named_buffers(self, prefix=""):
        """The module's ``named_buffers`` (no ``module.`` prefix)."""
        return self.module.named_buffers(prefix)

    def _named_state(self, prefix=""):
        return self.module._named_state(prefix)

    # -- a step -----------------------------------------------------------------------------
    def forward(self, x):
        """The module's forward; in training mode rank 0's buffers are copied into every
        rank first (a collective: every rank must call it)."""
        if self._size > 1 and self._in_training():
            self._buffers()
        return self.module.forward(x)

    def backward(self, dy, *, need_input_grad=True):
        """The module's backward, then the mean over ranks of every parameter's gradient.

        The gradients are reduced in buckets while backward runs; when this returns they
        hold the average (weighted as ``nn.fit`` asks, else plain) on every rank.  A
        collective: every rank must call it once per step.

        Returns
        -------
        ndarray or None
            This rank's dL/dx, as the module's ``backward`` returns it.
        """
        reducer = self._reducer
        scale = 1.0 / self._size if self._grad_scale is None else self._grad_scale
        reducer.begin(scale)
        try:
            with grads_ready_hook(reducer.ready):
                dx = self.module.backward(dy, need_input_grad=need_input_grad)
        except Exception:
            # The other ranks are reducing this step's buckets: take part (with whatever
            # is there) so that they, and this rank's next step, do not hang.
            reducer.finish(write=False)
            raise
        reducer.finish()
        return dx

    # -- what nn.fit and nn.save call ---------------------------------------------------------
    @property
    def _dist_rank(self):
        return self._rank

    @property
    def _dist_size(self):
        return self._size

    def _weighted_backward(self, dy, weight):
        """``backward`` with this rank's gradient weighted by ``weight`` in the sum (its
        share of the step's samples) instead of ``1 / world size``."""
        self._grad_scale = weight
        try:
            self.backward(dy, need_input_grad=False)
        finally:
            self._grad_scale = None

    def _empty_step(self):
        """This rank's part of a training step in which it has no samples: the buffer copy
        of a forward and the gradient sums of a backward, contributing zero."""
        if self._size > 1 and self._in_training():
            self._buffers()
        self._reducer.begin(0.0, zero=True)
        self._reducer.finish()

    def _sync_buffers(self):
        """Rank 0's buffers into every rank (a collective)."""
        if self._size > 1:
            self._buffers()

    def _sum_over_ranks(self, values):
        """The sum over ranks of a few floats, the same bits on every rank (reduced on
        rank 0, then broadcast): decisions taken on it agree everywhere."""
        local = np.asarray(values, dtype=np.float64)
        total = np.empty_like(local)
        self._comm.Reduce(local, total, op=MPI.SUM, root=0)
        self._comm.Bcast(total, root=0)
        return total

    def _any_over_ranks(self, flag):
        return bool(self._comm.allreduce(bool(flag), op=MPI.LOR))

    def _broadcast_array(self, array):
        """Rank 0's ``array`` into every rank's (in place)."""
        if self._size > 1:
            self._comm.Bcast(array, root=0)

    def _check_same(self, what, values):
        """ValueError on every rank when a rank's ``values`` (a dict) differ from rank 0's:
        a rank running more steps than the others would wait for them forever."""
        everyone = self._comm.allgather(values)
        for r, theirs in enumerate(everyone[1:], start=1):
            for key, value in everyone[0].items():
                if theirs.get(key) != value:
                    raise ValueError(f"{what}: rank {r} has {key} {theirs.get(key)!r} but "
                                     f"rank 0 has {value!r}; every rank must pass the same")

    def _on_root(self, fn, what):
        """``fn()`` on rank 0 only; every rank returns once it has finished (a failure on
        rank 0 is raised on every rank)."""
        error = result = None
        if self._rank == 0:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised here, reported to the others
                error = exc
        message = None if error is None else f"{type(error).__name__}: {error}"
        message = self._comm.bcast(message, root=0)
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"{what} failed on rank 0: {message}")
        return result

    def __repr__(self):
        inner = repr(self.module).replace("\n", "\n  ")
        return f"DistributedDataParallel(\n  (module): {inner}\n)"
