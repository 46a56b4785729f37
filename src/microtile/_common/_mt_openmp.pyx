"""Whether the build has OpenMP, and the share helpers every kernel uses (``.pxd``).

Kernels no longer run OpenMP regions: every threaded kernel runs on microtile's own pool
(``_pool``), whose caller never waits for a helper that is not running.  This extension's
file name is what threadpoolctl matches to list microtile's pool (see ``_threadpool.py``),
so keep its name stable.
"""

cdef extern from *:
    """
    #ifdef _OPENMP
    #define MT_HAVE_OPENMP 1
    #else
    #define MT_HAVE_OPENMP 0
    #endif
    """
    int MT_HAVE_OPENMP


def openmp_enabled():
    """True when the extension modules were compiled with OpenMP."""
    return bool(MT_HAVE_OPENMP)
