/* Run-time ISA detection: CPUID says what the CPU has, XGETBV says whether the OS saves
 * the YMM state on a context switch; AVX2 code is safe only when both agree. */
#ifndef MICROTILE_CPU_FEATURES_H
#define MICROTILE_CPU_FEATURES_H

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>

static unsigned long long mt_xgetbv0(void) {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}

/* Bit 0: AVX2 and FMA usable.  Bit 1: AVX-512F usable. */
static int mt_cpu_features(void) {
    unsigned int a, b, c, d;
    int out = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int has_fma = (c >> 12) & 1, has_osxsave = (c >> 27) & 1, has_avx = (c >> 28) & 1;
    if (!(has_osxsave && has_avx)) return 0;
    unsigned long long xcr0 = mt_xgetbv0();
    int ymm_os = (xcr0 & 0x6) == 0x6;              /* XMM and YMM state */
    int zmm_os = (xcr0 & 0xe6) == 0xe6;            /* plus opmask and ZMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int has_avx2 = (b >> 5) & 1, has_avx512f = (b >> 16) & 1;
    if (ymm_os && has_avx2 && has_fma) out |= 1;
    if (zmm_os && has_avx512f) out |= 2;
    return out;
}
#else
static int mt_cpu_features(void) { return 0; }
#endif

#endif
