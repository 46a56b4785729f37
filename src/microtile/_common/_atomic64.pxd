# Relaxed atomic loads, stores and adds on 64-bit integers, for state that several calling
# threads share without a lock (counters, time stamps).  Relaxed order: each access is whole
# (no torn or lost updates, no data race in C's sense), and nothing else is ordered by it.
# GCC and clang builtins, else C11 <stdatomic.h>, else MSVC's interlocked functions.
from libc.stdint cimport int64_t

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__GNUC__) || defined(__clang__)
    static inline int64_t mt_atomic_load64(const int64_t* p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void mt_atomic_store64(int64_t* p, int64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    static inline int64_t mt_atomic_add64(int64_t* p, int64_t v) {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
    #elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_ATOMICS__)
    #include <stdatomic.h>
    static inline int64_t mt_atomic_load64(const int64_t* p) {
        return atomic_load_explicit((_Atomic int64_t*) p, memory_order_relaxed);
    }
    static inline void mt_atomic_store64(int64_t* p, int64_t v) {
        atomic_store_explicit((_Atomic int64_t*) p, v, memory_order_relaxed);
    }
    static inline int64_t mt_atomic_add64(int64_t* p, int64_t v) {
        return atomic_fetch_add_explicit((_Atomic int64_t*) p, v, memory_order_relaxed);
    }
    #elif defined(_MSC_VER)
    #include <intrin.h>
    static __inline int64_t mt_atomic_load64(const int64_t* p) {
        return _InterlockedOr64((volatile __int64*) p, 0);
    }
    static __inline void mt_atomic_store64(int64_t* p, int64_t v) {
        _InterlockedExchange64((volatile __int64*) p, v);
    }
    static __inline int64_t mt_atomic_add64(int64_t* p, int64_t v) {
        return _InterlockedExchangeAdd64((volatile __int64*) p, v);
    }
    #else
    #error "microtile needs GCC/clang atomic builtins, C11 atomics or MSVC interlocked functions"
    #endif
    """
    int64_t mt_atomic_load64(const int64_t* p) nogil
    void mt_atomic_store64(int64_t* p, int64_t v) nogil
    int64_t mt_atomic_add64(int64_t* p, int64_t v) nogil
