"""Signal polling for long kernels (see ``_interrupt.pxd``).

Only the thread that released the GIL for a public call polls, and only from the main thread
of the interpreter: other threads never run signal handlers, so a poll there would only take
the GIL from whoever holds it.  Every POLL_NS the poll takes the GIL (a few microseconds when
it is free, up to the interpreter's switch interval, 5 ms, when another thread is running
Python), so a call shorter than POLL_NS never takes it.
"""
import threading

from libc.stdint cimport int64_t
from microtile._common._clock cimport mt_now_ns
from microtile._common._atomic64 cimport mt_atomic_load64, mt_atomic_store64

cdef extern from "Python.h":
    ctypedef struct PyObject
    int PyErr_CheckSignals()
    unsigned long PyThread_get_thread_ident()
    void PyErr_Fetch(PyObject** t, PyObject** v, PyObject** tb)
    void PyErr_Restore(PyObject* t, PyObject* v, PyObject* tb)

cdef extern from *:
    """
    #if defined(_MSC_VER)
    static __declspec(thread) void* mt_caller_poll = 0;
    #else
    static __thread void* mt_caller_poll = 0;
    #endif
    """
    void* mt_caller_poll

# 50 ms between looks: with a block of work in between (a GEMM work item is ~1-2 ms on this
# machine, a convolution chunk a few ms), Ctrl-C takes effect within about 60 ms.
cdef int64_t POLL_NS = 50000000
cdef int64_t NEVER = 1 << 62
cdef unsigned long _main_ident = threading.main_thread().ident


cdef signal_poll* caller_poll() noexcept nogil:
    return <signal_poll*> mt_caller_poll


cdef void open_poll(signal_poll* p) noexcept:
    p.next_ns = mt_now_ns() + POLL_NS
    p.stop_step = NEVER
    p.exc_type = p.exc_value = p.exc_tb = NULL
    global mt_caller_poll
    mt_caller_poll = <void*> p if PyThread_get_thread_ident() == _main_ident else NULL


cdef void close_poll() noexcept nogil:
    global mt_caller_poll
    mt_caller_poll = NULL


cdef int raise_for_rc(int rc, signal_poll* p, str func) except -1:
    if rc == INTERRUPTED:
        # The exception poll_step fetched is set again (PyErr_Restore takes the references);
        # returning -1 propagates it.
        PyErr_Restore(<PyObject*> p.exc_type, <PyObject*> p.exc_value, <PyObject*> p.exc_tb)
        p.exc_type = p.exc_value = p.exc_tb = NULL
        return -1
    if rc != 0:
        raise MemoryError(f"microtile: out of memory in {func}")
    return 0


cdef bint poll_step(signal_poll* p, int64_t step) noexcept nogil:
    cdef int rc
    if p == NULL:
        return False
    if mt_atomic_load64(&p.stop_step) != NEVER:
        return True
    if mt_now_ns() < p.next_ns:
        return False
    with gil:
        rc = PyErr_CheckSignals()
        if rc != 0:     # kept for raise_for_rc, not left set while the kernels finish
            PyErr_Fetch(<PyObject**> &p.exc_type, <PyObject**> &p.exc_value,
                        <PyObject**> &p.exc_tb)
    p.next_ns = mt_now_ns() + POLL_NS
    if rc != 0:
        mt_atomic_store64(&p.stop_step, step + 1)
        return True
    return False


cdef bint stop_before(signal_poll* p, int64_t step) noexcept nogil:
    return p != NULL and mt_atomic_load64(&p.stop_step) <= step


cdef bint interrupted(signal_poll* p) noexcept nogil:
    return p != NULL and mt_atomic_load64(&p.stop_step) != NEVER
