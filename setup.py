"""Build script: compiles every ``.pyx`` under ``src/microtile``, found recursively.

A module's name is its path (``src/microtile/linalg/_gemm.pyx`` builds
``microtile.linalg._gemm``), so a new folder or module needs no edit here.  Extensions are
compiled in parallel on all usable CPUs unless ``build_ext -j N`` says otherwise (a fresh
``pip install .`` compiled serially took 104 s here; see the README for today's time).

``autotune`` stays pure Python (its timing probes are ``microtile._probes``): ``python -m
autotune`` run from the repository root imports the source directory, not the installed
package, so it must not need anything compiled of its own.

Modules whose file name ends in ``_avx2`` hold AVX2/FMA intrinsics; they are compiled with
``-mavx2 -mfma`` and only on x86-64, and the library imports them only after CPUID says
the CPU and the OS support those instructions.  Everything else is compiled for the
baseline ISA so that one wheel runs on any x86-64 (and builds on aarch64).

Environment switches:
  MICROTILE_DEBUG=1     bounds, wraparound and initialisation checks on; -O0 -g, not stripped.
  MICROTILE_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (GCC or Clang):
                        -fsanitize=address,undefined -fno-omit-frame-pointer -O1 -g, linked
                        with the same flags, not stripped (-O0 with MICROTILE_DEBUG=1).  The
                        interpreter is not instrumented, so the runtimes must be preloaded;
                        the README's "Building" section has the commands.
"""
import os
import platform
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("MICROTILE_DEBUG", "0") not in ("", "0")
SANITIZE = os.environ.get("MICROTILE_SANITIZE", "0") not in ("", "0")
# Strip symbols from release builds on Linux (Apple's linker takes other flags); sanitizer
# reports need them for file and line.
STRIP = not DEBUG and not SANITIZE and sys.platform.startswith("linux")
# -O1 keeps the sanitized kernels fast enough to run the test suite and the reports exact
# (higher levels can fold away the accesses being checked); frame pointers give whole stacks.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
X86_64 = platform.machine().lower() in ("x86_64", "amd64", "x64")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "nonecheck": DEBUG,
    "embedsignature": True,
}

ISA_FLAGS = {"_avx2": ["-mavx2", "-mfma"]}

# Modules whose loops wait on latency and need GCC's pass that schedules instructions
# before register allocation (off by default on x86-64) to interleave independent chains.
# The activation loops of nn/_act_simd.h take two vectors per turn for it: GELU 1.20 ->
# 1.03 ns per element on one core, its derivative 1.81 -> 1.47.  Clang ignores the flags.
SCHEDULE_FLAGS = ["-fschedule-insns", "-fsched-pressure"]
SCHEDULED_MODULES = {"microtile.nn._act_avx2"}

def usable_cpus():
    """CPUs this process may run on (affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        # Compile extensions in parallel unless -j was given: 40 modules, each 1-10 s.
        if not self.parallel:
            self.parallel = usable_cpus()

    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        # Threads are microtile's own pool on POSIX threads (_common/mt_pool.h), not OpenMP:
        # -pthread links libpthread where the C library does not include it (glibc < 2.34).
        threads = [] if msvc else ["-pthread"]
        if SANITIZE and msvc:
            raise SystemExit("MICROTILE_SANITIZE=1 needs GCC or Clang")
        for ext in self.extensions:
            # -fno-math-errno: sqrt and friends need not set errno, so loops over them
            # vectorize (Adam's update is 4x faster); nothing here reads errno.
            # -fno-trapping-math: a select between two computed values may be done with
            # both computed (an if-conversion GCC otherwise refuses, since a comparison or
            # product could raise a floating-point exception flag nothing here reads): the
            # LSTM's gate loops over the float32 sigmoid and tanh only vectorise with it.
            # Results are unchanged; only which exception flags get raised may differ.
            if DEBUG:
                level = ["-O0", "-g"]
            elif SANITIZE:
                level = ["-O1", "-g"]
            else:
                level = ["-O3", "-g0"]
            opt = [] if msvc else level + ["-fno-math-errno", "-fno-trapping-math"]
            if SANITIZE:
                opt += SANITIZE_FLAGS
                ext.extra_link_args = ext.extra_link_args + SANITIZE_FLAGS
            if ext.name in SCHEDULED_MODULES and not (msvc or DEBUG or SANITIZE):
                opt += SCHEDULE_FLAGS
            ext.extra_compile_args = opt + ext.extra_compile_args
            if STRIP and not msvc:
                # No symbols beyond the dynamic ones the interpreter needs: the shared
                # objects shrink about 3x.
                ext.extra_link_args = ext.extra_link_args + ["-s"]
            ext.extra_compile_args += threads
            ext.extra_link_args += threads
        super().build_extensions()


def extensions():
    """One Extension per ``.pyx`` below ``src/microtile``, named after its path."""
    exts = []
    for dirpath, _, files in sorted(os.walk(os.path.join("src", "microtile"))):
        for fname in sorted(files):
            if not fname.endswith(".pyx"):
                continue
            stem = fname[:-len(".pyx")]
            isa = [suffix for suffix in ISA_FLAGS if stem.endswith(suffix)]
            if isa and not X86_64:
                continue
            path = os.path.join(dirpath, fname)
            module = ".".join(os.path.relpath(path, "src")[:-len(".pyx")].split(os.sep))
            exts.append(Extension(
                module,
                [path],
                include_dirs=[np.get_include(), dirpath],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
                extra_compile_args=list(ISA_FLAGS[isa[0]]) if isa else [],
            ))
    return exts


setup(
    packages=find_packages("src") + ["autotune"],
    package_dir={"": "src", "autotune": "autotune"},
    # Declarations travel with the wheel so other Cython code can cimport the kernels;
    # generated C and the .pyx sources do not (they were 15 MB of a 29 MB install).
    package_data={"": ["*.pxd", "*.h"]},
    exclude_package_data={"": ["*.c", "*.pyx"]},
    include_package_data=False,
    ext_modules=cythonize(
        extensions(),
        compiler_directives=DIRECTIVES,
        include_path=["src"],
        nthreads=int(os.environ.get("MICROTILE_CYTHON_JOBS", "0")) or usable_cpus(),
    ),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
