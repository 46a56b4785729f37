"""rank, world_size, barrier: the helpers over a communicator, and its validation."""
from microtile.distributed._mpi import MPI


def as_comm(comm, owner):
    """``comm`` (None: ``MPI.COMM_WORLD``) checked to be a usable intra-communicator.

    Raises
    ------
    TypeError
        ``comm`` is not an ``mpi4py.MPI.Intracomm`` (an inter-communicator has no
        allreduce over one group of ranks).
    ValueError
        ``comm`` is ``MPI.COMM_NULL`` (freed, or this rank is not in it).
    """
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"{owner}: comm must be an mpi4py communicator (MPI.Comm), got "
                        f"{type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError(f"{owner}: comm is MPI.COMM_NULL")
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"{owner}: comm must be an intra-communicator, got "
                        f"{type(comm).__name__}")
    return comm


def node_comm(comm):
    """The ranks of ``comm`` on this rank's machine (``Split_type(COMM_TYPE_SHARED)``, a
    collective); the caller frees it.  Tests replace it to make one machine look like
    several."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def rank(comm=None):
    """This process's rank in ``comm``.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    int
        From 0 to ``world_size(comm) - 1``; 0 in a process started without mpirun.
    """
    return as_comm(comm, "rank").Get_rank()


def world_size(comm=None):
    """The number of processes in ``comm``.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    int
        ``P`` under ``mpirun -n P``; 1 in a process started without mpirun.
    """
    return as_comm(comm, "world_size").Get_size()


def barrier(comm=None):
    """Return once every process of ``comm`` has called ``barrier``.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD``.
    """
    as_comm(comm, "barrier").Barrier()
