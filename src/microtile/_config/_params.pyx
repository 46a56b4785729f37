"""The tunable parameters as C structs, read by every kernel wrapper before it drops the GIL.

``_context`` owns the rules (validation, defaults, profile); this module only holds the values
in a form that costs nothing to read: one struct copy per call, plus a ContextVar look-up for
``config_context`` overrides (which are per thread and per async task, like a NumPy errstate).
"""
import contextvars
import os


# Overrides set by config_context: None, or {"threads": int, "isa": int,
# 0: {field: value}, 1: {field: value}} with dtype codes as keys.
override = contextvars.ContextVar("microtile_config_override", default=None)

cdef gemm_params _base[2]
cdef int _threads = 1
# A forked child runs every kernel on one thread: the usual reason to fork is a pool of worker
# processes (multiprocessing), which already shares the cores out, and threads there would
# oversubscribe them.  (microtile's own thread pool would work there: it starts empty in a
# child, see mt_pool.h; GNU OpenMP's, used before, hung.)
cdef bint _forked = False


def _after_fork_in_child():
    global _forked
    _forked = True


def forked():
    """True in a process forked from one that imported microtile (kernels run single-threaded)."""
    return _forked


os.register_at_fork(after_in_child=_after_fork_in_child)

cdef void _apply(gemm_params* p, dict values) except *:
    # Through the struct's dict form, so the field names are written only in the struct and
    # in _schema (config_context overrides take this path; plain calls copy the struct).
    # The round trip costs ~600 instructions, so a context that overrides no field skips it.
    if not values:
        return
    cdef dict fields = p[0]
    fields.update(values)
    p[0] = fields


def set_base(int code, dict values):
    """Set the process-wide values of dtype ``code`` (already validated)."""
    _apply(&_base[code], values)


def set_isa(int isa):
    _base[0].isa = isa
    _base[1].isa = isa


def set_threads(int n):
    global _threads
    _threads = n


def get_threads():
    return _threads


cdef int current_params(int dtype_code, gemm_params* out) except -1:
    cdef dict ov = override.get()
    out[0] = _base[dtype_code]
    out.n_threads = _threads
    if ov is not None:
        if "threads" in ov:
            out.n_threads = ov["threads"]
        if "isa" in ov:
            out.isa = ov["isa"]
        if dtype_code in ov:
            _apply(out, ov[dtype_code])
    if _forked:
        out.n_threads = 1
    return 0


def effective(int code):
    """The values in effect for dtype ``code`` on this thread, as a dict (the struct's
    fields, ``isa`` and ``n_threads`` included)."""
    cdef gemm_params p
    current_params(code, &p)
    return p
