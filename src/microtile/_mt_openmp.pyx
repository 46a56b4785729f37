"""OpenMP helpers and microtile's thread-count setting.

This extension's file name is what threadpoolctl matches to list microtile's pool
(see ``_threadpool.py``), so keep its name stable.
"""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define MT_HAVE_OPENMP 1
    #else
    #define MT_HAVE_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    static int omp_get_num_threads(void) { return 1; }
    #endif
    """
    int MT_HAVE_OPENMP
    int omp_get_max_threads() nogil
    int omp_get_thread_num() nogil
    int omp_get_num_threads() nogil


cdef int mt_max_threads() noexcept nogil:
    return omp_get_max_threads()


cdef int mt_thread_num() noexcept nogil:
    return omp_get_thread_num()


cdef int mt_num_threads() noexcept nogil:
    return omp_get_num_threads()


def openmp_enabled():
    """True when the extension modules were compiled with OpenMP."""
    return bool(MT_HAVE_OPENMP)
