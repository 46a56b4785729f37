# A monotonic clock for the drivers' timing decisions (contention back-off, signal polling).
from libc.stdint cimport int64_t

cdef extern from *:
    """
    #ifndef MT_CLOCK_DEFINED
    #define MT_CLOCK_DEFINED
    #include <stdint.h>
    #include <time.h>
    static double mt_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    static int64_t mt_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000 + (int64_t)ts.tv_nsec;
    }
    #endif
    """
    double mt_now() nogil
    int64_t mt_now_ns() nogil
