"""Cache geometry straight from the CPU: CPUID leaf 4 (Intel) or 0x8000001D (AMD).

A second opinion beside the OS (some hypervisors hide sysfs cache entries but pass CPUID
through, others fake one or the other).  Empty on non-x86 CPUs and compilers without
<cpuid.h>.
"""

cdef extern from *:
    """
    #if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    #include <cpuid.h>
    static int mt_cpuid(unsigned int leaf, unsigned int sub, unsigned int* r) {
        unsigned int maxl = __get_cpuid_max(leaf & 0x80000000u, 0);
        if (maxl == 0 || leaf > maxl) return 0;
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
        return 1;
    }
    #else
    static int mt_cpuid(unsigned int leaf, unsigned int sub, unsigned int* r) {
        (void)leaf; (void)sub; (void)r; return 0;
    }
    #endif
    """
    int mt_cpuid(unsigned int leaf, unsigned int sub, unsigned int* r) nogil


def raw(unsigned int leaf, unsigned int sub=0):
    """(eax, ebx, ecx, edx) of a CPUID leaf, or None when the leaf is not available."""
    cdef unsigned int r[4]
    if not mt_cpuid(leaf, sub, r):
        return None
    return (r[0], r[1], r[2], r[3])


def vendor():
    """'GenuineIntel', 'AuthenticAMD', ... or '' when CPUID is not available."""
    regs = raw(0)
    if regs is None:
        return ""
    return b"".join(x.to_bytes(4, "little") for x in (regs[1], regs[3], regs[2])).decode(
        "ascii", "replace")


def _cache_leaf():
    v = vendor()
    if v == "GenuineIntel":
        return 4
    if v in ("AuthenticAMD", "HygonGenuine"):
        ext = raw(0x80000001)
        # TopologyExtensions (ECX bit 22) says leaf 0x8000001D is implemented.
        if ext is not None and (ext[2] >> 22) & 1:
            return 0x8000001D
    return None


def caches():
    """Data and unified caches as ``[{"level", "type", "size", "line", "ways", "sets",
    "shared_cpus"}]`` sorted by level, the same shape ``microtile._config._hwinfo.read_caches`` gives;
    empty when CPUID does not describe them."""
    leaf = _cache_leaf()
    out = []
    if leaf is None:
        return out
    for sub in range(16):
        regs = raw(leaf, sub)
        if regs is None:
            break
        eax, ebx, ecx, _ = regs
        ctype = eax & 0x1F
        if ctype == 0:           # no more caches
            break
        if ctype not in (1, 3):  # 1 data, 2 instruction, 3 unified
            continue
        ways = ((ebx >> 22) & 0x3FF) + 1
        parts = ((ebx >> 12) & 0x3FF) + 1
        line = (ebx & 0xFFF) + 1
        sets = ecx + 1
        # Fully associative caches report sets == 1 and ways meaning nothing useful.
        out.append({
            "level": (eax >> 5) & 0x7,
            "type": "Data" if ctype == 1 else "Unified",
            "size": ways * parts * line * sets,
            "line": line,
            "ways": ways,
            "sets": sets,
            "shared_cpus": ((eax >> 14) & 0xFFF) + 1,
        })
    out.sort(key=lambda c: c["level"])
    return out
