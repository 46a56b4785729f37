"""Run-time choice of the kernel set.

The AVX2/FMA module is imported only when CPUID reports AVX2 and FMA and XGETBV reports
that the OS saves the YMM registers, so a wheel built here never executes an instruction the
CPU lacks.  ``MICROTILE_ISA=generic`` forces the portable kernels.
"""
import os
import warnings

from cpython.pycapsule cimport PyCapsule_GetPointer

from microtile._kernels._ukernel cimport kernel_set_t, skernels_t, dkernels_t

cdef extern from "_cpu_features.h":
    int mt_cpu_features()

ISA_NAMES = ("generic", "avx2-fma")

cdef kernel_set_t _sets[2]
cdef bint _have[2]


cdef const kernel_set_t* kernel_set(int isa) noexcept nogil:
    if isa < 0 or isa > 1 or not _have[isa]:
        return &_sets[0]
    return &_sets[isa]


cdef _load(int isa, module):
    s_cap, d_cap = module.tables()
    _sets[isa].s = (<skernels_t*> PyCapsule_GetPointer(s_cap, b"microtile.skernels"))[0]
    _sets[isa].d = (<dkernels_t*> PyCapsule_GetPointer(d_cap, b"microtile.dkernels"))[0]
    _have[isa] = True


def cpu_features():
    """What the CPU and OS support: a dict of booleans."""
    cdef int f = mt_cpu_features()
    return {"avx2_fma": bool(f & 1), "avx512f": bool(f & 2)}


def available_isas():
    """ISA names whose kernels this process can run, best last."""
    return tuple(name for i, name in enumerate(ISA_NAMES) if _have[i])


def isa_id(name):
    """The id of an available ISA name; ValueError otherwise."""
    if name in ISA_NAMES and _have[ISA_NAMES.index(name)]:
        return ISA_NAMES.index(name)
    raise ValueError(f"isa must be one of {available_isas()}, got {name!r}")


def kernel_shape(name, dtype_code):
    """(mr, nr) of an available ISA's micro-kernel; dtype_code 0 is float32, 1 float64."""
    cdef const kernel_set_t* ks = kernel_set(isa_id(name))
    return (ks.s.mr, ks.s.nr) if dtype_code == 0 else (ks.d.mr, ks.d.nr)


def default_isa():
    """The ISA chosen at import: the best available unless MICROTILE_ISA says otherwise."""
    want = os.environ.get("MICROTILE_ISA", "").strip().lower()
    isas = available_isas()
    best = isas[len(isas) - 1]
    if not want or want == "auto":
        return best
    if want in ("generic", "portable"):
        return "generic"
    if want in available_isas():
        return want
    warnings.warn(f"MICROTILE_ISA={want!r} is not available here; using {best!r}",
                  RuntimeWarning, stacklevel=2)
    return best


from microtile._kernels import _generic
_load(0, _generic)
if (mt_cpu_features() & 1) and os.environ.get("MICROTILE_ISA", "").strip().lower() not in ("generic", "portable"):
    try:
        from microtile._kernels import _avx2
    except ImportError:  # built on a non-x86 machine: the module does not exist
        pass
    else:
        _load(1, _avx2)
