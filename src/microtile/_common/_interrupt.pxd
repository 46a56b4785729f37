# Ctrl-C inside long kernels.  A public call made from the main thread (the only one that runs
# signal handlers) opens a poll for its duration; the drivers' calling thread then runs the
# pending handlers every POLL_NS between blocks of work, taking the GIL only for that.  When a
# handler raises (KeyboardInterrupt), every thread of the call stops at the next step both
# can agree on, the driver returns INTERRUPTED, and the wrapper re-raises the pending
# exception.  The result is then unspecified; the process, the pools and the scratch are not.
from libc.stdint cimport int64_t

cdef enum:
    INTERRUPTED = -2      # a driver's return code: a signal handler raised

ctypedef struct signal_poll:
    int64_t next_ns       # when the calling thread looks for signals next
    int64_t stop_step     # the step no thread starts (see poll_step); large until a raise
    void* exc_type        # the handler's exception, fetched (owned references) so that the
    void* exc_value       # wrapper may run Python code to clean up before raise_for_rc
    void* exc_tb

# The poll the calling thread opened (NULL on any other thread, or outside a public call).
cdef signal_poll* caller_poll() noexcept nogil
# For a public call's wrapper, with the GIL: open a poll in ``p`` if this is the main thread;
# close it after the nogil block.  ``raise_for_rc`` turns the driver's return code into the
# exception: the handler's (INTERRUPTED), MemoryError naming ``func`` (any other nonzero).
cdef void open_poll(signal_poll* p) noexcept
cdef void close_poll() noexcept nogil
cdef int raise_for_rc(int rc, signal_poll* p, str func) except -1
# For the calling thread only: run pending signal handlers when due; when one raised, mark
# ``step + 1`` as the step no thread may start and return True.
cdef bint poll_step(signal_poll* p, int64_t step) noexcept nogil
# Any thread: whether step ``step`` may not start (workers stop taking work).
cdef bint stop_before(signal_poll* p, int64_t step) noexcept nogil
# Whether a handler raised during the call.
cdef bint interrupted(signal_poll* p) noexcept nogil
