# Per-thread scratch buffers: each OS thread (a pool helper or a Python thread calling a
# kernel) owns its buffers, so no two calls ever share one, and they are reused across calls
# instead of being allocated each time.  Freed when the thread exits; a buffer larger than
# SCRATCH_KEEP_MAX is freed at the end of the call that asked for it (scratch_trim), so one
# huge call does not leave every thread of the pool holding its scratch.

cdef enum:
    SCRATCH_PACK_A = 0
    SCRATCH_PACK_B = 1
    SCRATCH_EXTRA = 2
    SCRATCH_EXTRA2 = 3
    SCRATCH_SLOTS = 4

# Bytes a thread may keep in one slot between calls (64 MiB: far above what GEMM packing
# needs with the default blocking, so ordinary calls never reallocate).
cdef enum:
    SCRATCH_KEEP_MAX = 64 * 1024 * 1024

# A 64-byte aligned buffer of at least nbytes for this thread's slot, or NULL when out of memory.
# Contents are undefined.  Valid until the same thread asks the same slot for more, or calls
# scratch_trim.
cdef void* scratch_get(int slot, size_t nbytes) noexcept nogil

# Free this thread's buffers larger than SCRATCH_KEEP_MAX.  Every driver that asks for
# scratch calls it on each of its threads once the call's work on that thread is done.
cdef void scratch_trim() noexcept nogil
