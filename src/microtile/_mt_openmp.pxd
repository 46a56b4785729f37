# OpenMP access for every module: one place with a fallback when the build has no OpenMP.
cdef int mt_max_threads() noexcept nogil
cdef int mt_thread_num() noexcept nogil
cdef int mt_num_threads() noexcept nogil
# Every thread of the current parallel region waits here for the others.
cdef void mt_barrier() noexcept nogil
