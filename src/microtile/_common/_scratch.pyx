"""Per-thread, reusable, aligned scratch memory (see ``_scratch.pxd``)."""
from libc.stdlib cimport calloc, free
from libc.stdint cimport uintptr_t

cdef extern from *:
    """
    #include <stdlib.h>
    #if defined(_WIN32)
    #include <malloc.h>
    static void* mt_aligned_alloc(size_t n) { return _aligned_malloc(n, 64); }
    static void mt_aligned_free(void* p) { _aligned_free(p); }
    #else
    static void* mt_aligned_alloc(size_t n) {
        void* p = NULL;
        return posix_memalign(&p, 64, n) == 0 ? p : NULL;
    }
    static void mt_aligned_free(void* p) { free(p); }
    #endif
    """
    void* mt_aligned_alloc(size_t n) nogil
    void mt_aligned_free(void* p) nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned int pthread_key_t
    int pthread_key_create(pthread_key_t* key, void (*destructor)(void*))
    void* pthread_getspecific(pthread_key_t key)
    int pthread_setspecific(pthread_key_t key, const void* value)


ctypedef struct thread_scratch:
    void* ptr[SCRATCH_SLOTS]
    size_t cap[SCRATCH_SLOTS]


cdef pthread_key_t _key
cdef bint _key_ok = False


cdef void _release(void* p) noexcept nogil:
    cdef thread_scratch* s = <thread_scratch*> p
    cdef int i
    if s == NULL:
        return
    for i in range(SCRATCH_SLOTS):
        if s.ptr[i] != NULL:
            mt_aligned_free(s.ptr[i])
    free(s)


cdef void* scratch_get(int slot, size_t nbytes) noexcept nogil:
    cdef thread_scratch* s
    cdef size_t want
    if not _key_ok or slot < 0 or slot >= SCRATCH_SLOTS:
        return NULL
    s = <thread_scratch*> pthread_getspecific(_key)
    if s == NULL:
        s = <thread_scratch*> calloc(1, sizeof(thread_scratch))
        if s == NULL:
            return NULL
        if pthread_setspecific(_key, s) != 0:
            free(s)
            return NULL
    if s.cap[slot] < nbytes or s.ptr[slot] == NULL:
        if s.ptr[slot] != NULL:
            mt_aligned_free(s.ptr[slot])
            s.ptr[slot] = NULL
            s.cap[slot] = 0
        # Round up so that slowly growing requests do not reallocate every call.
        want = ((nbytes + nbytes // 8 + 4095) // 4096) * 4096
        s.ptr[slot] = mt_aligned_alloc(want)
        if s.ptr[slot] == NULL:
            return NULL
        s.cap[slot] = want
    return s.ptr[slot]


if pthread_key_create(&_key, _release) == 0:
    _key_ok = True
else:
    raise MemoryError("microtile: could not create the per-thread scratch key")
