# Per-thread scratch buffers: each OS thread (an OpenMP worker or a Python thread calling a
# kernel) owns its buffers, so no two calls ever share one, and they are reused across calls
# instead of being allocated each time.  Freed when the thread exits.

cdef enum:
    SCRATCH_PACK_A = 0
    SCRATCH_PACK_B = 1
    SCRATCH_EXTRA = 2
    SCRATCH_EXTRA2 = 3
    SCRATCH_SLOTS = 4

# A 64-byte aligned buffer of at least nbytes for this thread's slot, or NULL when out of memory.
# Contents are undefined.  Valid until the same thread asks the same slot for more.
cdef void* scratch_get(int slot, size_t nbytes) noexcept nogil
