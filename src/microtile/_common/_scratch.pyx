"""Per-thread, reusable, aligned scratch memory (see ``_scratch.pxd``)."""
from libc.stdlib cimport calloc, free
from libc.stdint cimport int64_t

from microtile._common._atomic64 cimport mt_atomic_add64, mt_atomic_load64

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
# Bytes held by all threads' buffers together (for tests and diagnostics).
cdef int64_t _held = 0


cdef inline void _free_slot(thread_scratch* s, int slot) noexcept nogil:
    if s.ptr[slot] != NULL:
        mt_aligned_free(s.ptr[slot])
        mt_atomic_add64(&_held, -<int64_t> s.cap[slot])
    s.ptr[slot] = NULL
    s.cap[slot] = 0


cdef void _release(void* p) noexcept nogil:
    cdef thread_scratch* s = <thread_scratch*> p
    cdef int i
    if s == NULL:
        return
    for i in range(SCRATCH_SLOTS):
        _free_slot(s, i)
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
        _free_slot(s, slot)
        # Round up so that slowly growing requests do not reallocate every call.
        want = ((nbytes + nbytes // 8 + 4095) // 4096) * 4096
        if want < nbytes:
            return NULL     # the rounding wrapped around: no such allocation exists
        s.ptr[slot] = mt_aligned_alloc(want)
        if s.ptr[slot] == NULL:
            return NULL
        s.cap[slot] = want
        mt_atomic_add64(&_held, <int64_t> want)
    return s.ptr[slot]


cdef void scratch_trim() noexcept nogil:
    cdef thread_scratch* s
    cdef int i
    if not _key_ok:
        return
    s = <thread_scratch*> pthread_getspecific(_key)
    if s == NULL:
        return
    for i in range(SCRATCH_SLOTS):
        if s.cap[i] > SCRATCH_KEEP_MAX:
            _free_slot(s, i)


def held_bytes():
    """Bytes of scratch that all threads together hold right now."""
    return mt_atomic_load64(&_held)


def keep_max():
    """The largest buffer (bytes) a thread keeps in one slot between calls."""
    return SCRATCH_KEEP_MAX


if pthread_key_create(&_key, _release) == 0:
    _key_ok = True
else:
    raise MemoryError("microtile: could not create the per-thread scratch key")
