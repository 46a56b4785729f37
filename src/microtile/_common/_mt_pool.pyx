"""microtile's own thread pool (see ``_mt_pool.pxd`` and ``mt_pool.h`` for why it exists).

Every threaded kernel runs on it.  This extension's file name is what threadpoolctl matches
to list microtile's pool (see ``_config/_threadpool.py``), so keep its name stable.
"""
from libc.stdint cimport int64_t

from microtile._common._typedefs cimport idx_t
from microtile._common._atomic64 cimport mt_atomic_add64

cdef extern from "mt_pool.h" nogil:
    int MT_POOL_THREADS
    ctypedef void (*mt_task_fn)(void* ctx, int tid) noexcept nogil
    int mt_pool_run(int nt, mt_task_fn fn, void* ctx)
    int mt_pool_init()
    int mt_pool_helpers()
    int64_t mt_pool_get_spin_ns()
    void mt_pool_set_spin_ns(int64_t ns)
    int64_t mt_pool_jobs()
    int64_t mt_pool_helped()
    int64_t mt_pool_waited_ns()


cdef int pool_run(int nt, pool_task fn, void* ctx) noexcept nogil:
    return mt_pool_run(nt, <mt_task_fn> fn, ctx)


ctypedef struct _items:
    int64_t next        # the next unclaimed item (atomic)
    int64_t back        # pool_items_ends: items the helpers took from the back (atomic)
    int64_t taken       # pool_items_ends: items claimed at either end (atomic)
    int64_t n
    pool_item fn
    void* ctx


cdef void _items_task(void* vctx, int tid) noexcept nogil:
    cdef _items* its = <_items*> vctx
    cdef int64_t it
    while True:
        it = mt_atomic_add64(&its.next, 1)
        if it >= its.n:
            return
        its.fn(its.ctx, <idx_t> it, tid)


cdef void _ends_task(void* vctx, int tid) noexcept nogil:
    cdef _items* its = <_items*> vctx
    cdef int64_t it
    while True:
        # At most n claims in all, so the front and the back never take the same item.
        if mt_atomic_add64(&its.taken, 1) >= its.n:
            return
        if tid == 0:
            it = mt_atomic_add64(&its.next, 1)
        else:
            it = its.n - 1 - mt_atomic_add64(&its.back, 1)
        its.fn(its.ctx, <idx_t> it, tid)


cdef inline void _run_items(int nt, idx_t n_items, pool_item fn, void* ctx,
                            pool_task task) noexcept nogil:
    """Items 0 .. n_items-1 on the calling thread alone, or claimed by ``task`` on the pool."""
    cdef _items its
    cdef idx_t i
    if n_items <= 0:
        return
    if nt <= 1 or n_items == 1:
        for i in range(n_items):
            fn(ctx, i, 0)
        return
    its.next = 0
    its.back = 0
    its.taken = 0
    its.n = n_items
    its.fn = fn
    its.ctx = ctx
    pool_run(nt if nt < n_items else <int> n_items, task, &its)


cdef void pool_items_ends(int nt, idx_t n_items, pool_item fn, void* ctx) noexcept nogil:
    _run_items(nt, n_items, fn, ctx, _ends_task)


cdef void pool_items(int nt, idx_t n_items, pool_item fn, void* ctx) noexcept nogil:
    _run_items(nt, n_items, fn, ctx, _items_task)


ctypedef struct _ranges:
    idx_t n, share
    pool_range fn
    void* ctx


cdef void _range_item(void* vctx, idx_t item, int tid) noexcept nogil:
    cdef _ranges* rg = <_ranges*> vctx
    cdef idx_t i0 = item * rg.share
    cdef idx_t i1 = mt_share_end(i0, rg.share, rg.n)
    if i0 < i1:
        rg.fn(rg.ctx, i0, i1, tid)


cdef void pool_ranges(int nt, idx_t n, int pieces, idx_t grain, pool_range fn,
                      void* ctx) noexcept nogil:
    cdef _ranges rg
    if n <= 0:
        return
    if nt <= 1 or pieces <= 1:
        fn(ctx, 0, n, 0)
        return
    rg.n = n
    if grain < 1:
        grain = 1
    rg.share = ((n + pieces - 1) // pieces + grain - 1) // grain * grain
    rg.fn = fn
    rg.ctx = ctx
    pool_items(nt, (n + rg.share - 1) // rg.share, _range_item, &rg)


if mt_pool_init() != 0:
    raise ImportError("microtile: pthread_atfork failed for the thread pool")


def pool_info():
    """The pool's state, for tests and diagnostics: helper threads started, the idle spin
    in seconds, jobs run on the pool, helper joins and the seconds callers spent waiting
    for helpers to finish their last work so far, and whether the build has threads."""
    return {"helpers": mt_pool_helpers(), "spin": 1e-9 * mt_pool_get_spin_ns(),
            "jobs": mt_pool_jobs(), "helped": mt_pool_helped(),
            "waited": 1e-9 * mt_pool_waited_ns(),
            "threads": bool(MT_POOL_THREADS)}


def set_pool_spin(seconds):
    """Set how long an idle helper spins before it sleeps; returns the previous value."""
    old = 1e-9 * mt_pool_get_spin_ns()
    seconds = float(seconds)
    if not 0 <= seconds <= 1:
        raise ValueError(f"spin must be between 0 and 1 s, got {seconds}")
    mt_pool_set_spin_ns(<int64_t> round(seconds * 1e9))
    return old


# --- a self-check for the tests: every item claimed exactly once, by a valid thread --------

ctypedef struct _claims:
    int64_t next
    int64_t n
    int nt
    int* owner          # the thread number that ran each item
    int64_t* runs       # how many times each item ran (must end at 1)


cdef void _claim_task(void* ctx, int tid) noexcept nogil:
    cdef _claims* cl = <_claims*> ctx
    cdef int64_t it
    cdef int spin
    while True:
        it = mt_atomic_add64(&cl.next, 1)
        if it >= cl.n:
            return
        cl.owner[it] = tid
        mt_atomic_add64(&cl.runs[it], 1)
        for spin in range(2000):     # a little work, so helpers have time to join
            mt_atomic_add64(&cl.runs[cl.n], 1)


def _claim_check(int nt, int n_items):
    """Run a task of ``n_items`` claimed items on ``nt`` threads; return (owner per item,
    runs per item, threads that took part)."""
    import numpy as np
    owner = np.full(n_items, -1, dtype=np.intc)
    runs = np.zeros(n_items + 1, dtype=np.int64)
    cdef int[::1] o = owner
    cdef int64_t[::1] r = runs
    cdef _claims cl
    cdef int took
    if n_items <= 0 or nt <= 0:
        raise ValueError("nt and n_items must be positive")
    cl.next = 0
    cl.n = n_items
    cl.nt = nt
    cl.owner = &o[0]
    cl.runs = &r[0]
    with nogil:
        took = pool_run(nt, _claim_task, &cl)
    return owner, runs[:n_items], took
