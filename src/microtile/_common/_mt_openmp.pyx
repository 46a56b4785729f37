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
    /* An orphaned barrier: it binds to the parallel region of the caller.  Cython emits
       worksharing loops inside `with parallel()` as `omp for nowait` and has no barrier
       statement, so phases that depend on each other call this between them. */
    static void mt_omp_barrier(void) {
    #ifdef _OPENMP
        #pragma omp barrier
    #endif
    }
    """
    int MT_HAVE_OPENMP
    int omp_get_max_threads() nogil
    int omp_get_thread_num() nogil
    int omp_get_num_threads() nogil
    void mt_omp_barrier() nogil


cdef int mt_max_threads() noexcept nogil:
    return omp_get_max_threads()


cdef int mt_thread_num() noexcept nogil:
    return omp_get_thread_num()


cdef int mt_num_threads() noexcept nogil:
    return omp_get_num_threads()


cdef void mt_barrier() noexcept nogil:
    mt_omp_barrier()


def openmp_enabled():
    """True when the extension modules were compiled with OpenMP."""
    return bool(MT_HAVE_OPENMP)
