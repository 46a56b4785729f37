# Atomic loads, stores, adds and compare-and-swap on 64-bit integers, for state that several
# threads share without a lock (counters, time stamps, flags).  The plain forms are relaxed:
# each access is whole (no torn or lost updates, no data race in C's sense), and nothing else
# is ordered by it; the _acq / _rel forms also publish the data written before them.
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
    static inline int64_t mt_atomic_load64_acq(const int64_t* p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void mt_atomic_store64_rel(int64_t* p, int64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline int64_t mt_atomic_add64_rel(int64_t* p, int64_t v) {
        return __atomic_fetch_add(p, v, __ATOMIC_RELEASE);
    }
    static inline int mt_atomic_cas64(int64_t* p, int64_t expect, int64_t v) {
        return __atomic_compare_exchange_n(p, &expect, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
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
    static inline int64_t mt_atomic_load64_acq(const int64_t* p) {
        return atomic_load_explicit((_Atomic int64_t*) p, memory_order_acquire);
    }
    static inline void mt_atomic_store64_rel(int64_t* p, int64_t v) {
        atomic_store_explicit((_Atomic int64_t*) p, v, memory_order_release);
    }
    static inline int64_t mt_atomic_add64_rel(int64_t* p, int64_t v) {
        return atomic_fetch_add_explicit((_Atomic int64_t*) p, v, memory_order_release);
    }
    static inline int mt_atomic_cas64(int64_t* p, int64_t expect, int64_t v) {
        return atomic_compare_exchange_strong((_Atomic int64_t*) p, &expect, v);
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
    /* Interlocked operations are full barriers. */
    static __inline int64_t mt_atomic_load64_acq(const int64_t* p) { return mt_atomic_load64(p); }
    static __inline void mt_atomic_store64_rel(int64_t* p, int64_t v) { mt_atomic_store64(p, v); }
    static __inline int64_t mt_atomic_add64_rel(int64_t* p, int64_t v) { return mt_atomic_add64(p, v); }
    static __inline int mt_atomic_cas64(int64_t* p, int64_t expect, int64_t v) {
        return _InterlockedCompareExchange64((volatile __int64*) p, v, expect) == expect;
    }
    #else
    #error "microtile needs GCC/clang atomic builtins, C11 atomics or MSVC interlocked functions"
    #endif
    #if defined(_WIN32)
    #include <windows.h>
    static __inline void mt_yield(void) { SwitchToThread(); }
    #else
    #include <sched.h>
    static inline void mt_yield(void) { sched_yield(); }
    #endif
    /* In a spin-wait: let the sibling hyperthread run and save power. */
    #if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    static inline void mt_cpu_relax(void) { __builtin_ia32_pause(); }
    #elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
    static inline void mt_cpu_relax(void) { __asm__ __volatile__("yield"); }
    #elif defined(_MSC_VER)
    static __inline void mt_cpu_relax(void) { YieldProcessor(); }
    #else
    static inline void mt_cpu_relax(void) { }
    #endif
    """
    int64_t mt_atomic_load64(const int64_t* p) nogil
    void mt_atomic_store64(int64_t* p, int64_t v) nogil
    int64_t mt_atomic_add64(int64_t* p, int64_t v) nogil
    # Acquire / release forms, for a flag that publishes data written before it.
    int64_t mt_atomic_load64_acq(const int64_t* p) nogil
    void mt_atomic_store64_rel(int64_t* p, int64_t v) nogil
    int64_t mt_atomic_add64_rel(int64_t* p, int64_t v) nogil
    # True when *p held ``expect`` and now holds ``v``.
    bint mt_atomic_cas64(int64_t* p, int64_t expect, int64_t v) nogil
    void mt_cpu_relax() nogil
    void mt_yield() nogil
