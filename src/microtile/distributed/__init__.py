"""microtile.distributed: data-parallel training over MPI (mpi4py).

Run the same script on every rank, ``mpirun -n P python train.py``, on one machine or on
several (``mpirun -n 4 -H host1:2,host2:2 python train.py``)::

    from microtile import nn
    from microtile.distributed import DistributedDataParallel, rank

    model = DistributedDataParallel(build_model())   # rank 0's weights on every rank
    opt = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, batch_size=32, rng=0)  # 32 per rank
    nn.save(model, "model.npz")                       # written by rank 0

Needs mpi4py and an MPI library (``pip install "microtile[mpi]"`` and, for example,
Debian's ``openmpi-bin libopenmpi-dev``); importing this package without them raises
ImportError saying so.  Without mpirun a script runs as a world of one process.

Modules: ``_mpi`` (the import and its error), ``_world`` (rank, world_size, barrier and the
communicator's checks), ``_ddp`` (the wrapper), ``_buckets`` (gradient buckets reduced with
non-blocking allreduces during backward), ``_broadcast`` (rank 0's parameters and buffers
into every rank), ``_threads`` (each rank's share of its machine's CPUs).
"""
from microtile.distributed._mpi import MPI  # noqa: F401  (ImportError here when missing)
from microtile.distributed._ddp import DistributedDataParallel
from microtile.distributed._world import barrier, rank, world_size

__all__ = ["DistributedDataParallel", "rank", "world_size", "barrier"]
