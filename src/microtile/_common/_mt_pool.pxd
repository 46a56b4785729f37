# microtile's thread pool: the calling thread and up to nt - 1 persistent helpers run one task.
#
# pool_run(nt, fn, ctx) calls fn(ctx, 0) on the calling thread and fn(ctx, t) (0 < t < nt) on
# each helper that joins while the caller is still in fn; it returns once the caller's fn has
# returned and no helper is inside fn, with the number of threads that took part.  A helper
# that wakes too late never calls fn, so the caller never waits for a thread the OS has not
# run.  The task must therefore be written so that thread 0 alone can do all of it: threads
# claim work from a shared atomic counter until none is left, and nothing waits for a given
# thread number.  A call made while another thread owns the pool runs with thread 0 only.
#
# Helpers block every signal, spin `pool_spin_ns` after a job, then sleep; a forked child
# starts with an empty pool.

from microtile._common._typedefs cimport idx_t

# Each thread's share when n elements are split over nt threads: a multiple of 16 elements, so
# shares start on whole vectors and cache lines.  Share t is [t * chunk, min(n, ...)).
cdef inline idx_t mt_share(idx_t n, int nt) noexcept nogil:
    return ((n + nt - 1) // nt + 15) & ~(<idx_t> 15)


cdef inline idx_t mt_share_end(idx_t t0, idx_t chunk, idx_t n) noexcept nogil:
    return t0 + chunk if t0 + chunk < n else n


ctypedef void (*pool_task)(void* ctx, int tid) noexcept nogil

cdef int pool_run(int nt, pool_task fn, void* ctx) noexcept nogil

# The common case on top of pool_run: items 0 .. n_items-1, each claimed by one running thread
# (the caller does them all if no helper comes), fn(ctx, item, tid) with tid < nt.  Kernels
# that used ``for t in prange(nt)`` over per-thread shares make each share an item: the work
# is the same, but a share no longer waits for a particular thread.  With nt == 1 or one item
# it runs on the calling thread without touching the pool.
ctypedef void (*pool_item)(void* ctx, idx_t item, int tid) noexcept nogil

cdef void pool_items(int nt, idx_t n_items, pool_item fn, void* ctx) noexcept nogil

# The same, with the caller taking items from the front and the helpers from the back: when a
# job of equal items repeats (a recurrent layer's time steps), each thread mostly gets the
# same items every time, so the data they read stays in its core's cache.
cdef void pool_items_ends(int nt, idx_t n_items, pool_item fn, void* ctx) noexcept nogil

# Ranges: [0, n) cut into about ``pieces`` shares (kernels ask for four per thread, so the
# caller's wait for the last share a helper took is short), each a multiple of ``grain`` (16 for
# elements, so shares start on whole vectors and cache lines; 1 for rows, channels, planes),
# each an item: fn(ctx, i0, i1, tid) for every non-empty share.
ctypedef void (*pool_range)(void* ctx, idx_t i0, idx_t i1, int tid) noexcept nogil

cdef void pool_ranges(int nt, idx_t n, int pieces, idx_t grain, pool_range fn,
                      void* ctx) noexcept nogil
