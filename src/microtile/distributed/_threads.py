"""Each rank's share of its machine's CPUs, so ranks on one machine do not oversubscribe it."""
import os

from microtile._config import _hwinfo
from microtile._config._context import get_num_threads, set_num_threads, threads_chosen
from microtile.distributed import _world


def _affinity():
    """The CPUs this process may run on, as a frozenset, or None where the OS cannot say."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def fair_share(usable, mine, others, index):
    """Threads for the rank at ``index`` of a machine's ranks whose CPU sets are ``others``.

    The ranks that can run on some CPU of ``mine`` (this rank included) compete for the
    ``usable`` CPUs this rank sees, so they split them: evenly, the first ones getting one
    more when the split is uneven, and never fewer than one each.  Ranks that mpirun bound
    to CPUs of their own (Open MPI binds each rank to a core when there are at most two)
    compete with nobody and keep their own CPUs.  A None set (the OS could not say)
    overlaps every other set.
    """
    competing = [i for i, s in enumerate(others)
                 if i == index or s is None or mine is None or s & mine]
    k = len(competing)
    position = competing.index(index)
    return max(1, usable // k + (1 if position < usable % k else 0))


def share_threads(comm):
    """Set this rank's thread count to its share of the machine's usable CPUs.

    The ranks of ``comm`` that share this machine's memory are counted with
    ``Split_type(COMM_TYPE_SHARED)`` (a collective over ``comm``: every rank must call
    it).  Nothing changes when the count was chosen (``MICROTILE_NUM_THREADS`` or
    ``OMP_NUM_THREADS``, or ``set_num_threads`` before the call) or when this rank is
    alone on its machine.

    Returns
    -------
    int
        The thread count in force afterwards.
    """
    local = _world.node_comm(comm)
    try:
        # Collective over the machine's ranks: every rank takes part even when its own
        # count was chosen, so the call is the same on all of them.
        mine = _affinity()
        sets = local.allgather(mine)
        index = local.Get_rank()
    finally:
        local.Free()
    if len(sets) > 1 and not threads_chosen():
        n = fair_share(_hwinfo.usable_cpus(), mine, sets, index)
        if n != get_num_threads():
            set_num_threads(n)
    return get_num_threads()
