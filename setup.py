"""Build script: compiles every ``.pyx`` under ``src/microtile``.

``autotune`` stays pure Python (its timing probes are ``microtile._probe_*``): ``python -m
autotune`` run from the repository root imports the source directory, not the installed
package, so it must not need anything compiled of its own.

Modules whose name ends in ``_avx2`` hold AVX2/FMA intrinsics; they are compiled with
``-mavx2 -mfma`` and only on x86-64, and the library imports them only after CPUID says
the CPU and the OS support those instructions.  Everything else is compiled for the
baseline ISA so that one wheel runs on any x86-64 (and builds on aarch64).

Environment switches:
  MICROTILE_DEBUG=1     bounds, wraparound and initialisation checks on; -O0 -g.
  MICROTILE_NO_OPENMP=1 build without OpenMP even where the compiler has it.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("MICROTILE_DEBUG", "0") not in ("", "0")
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

OPENMP_TEST = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _try_compile(compiler, cflags, ldflags):
    """True when ``compiler`` builds and links a tiny OpenMP program with these flags."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "omp_test.c")
        with open(src, "w") as f:
            f.write(OPENMP_TEST)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        compiler.link_executable(objs, os.path.join(tmp, "omp_test"), extra_postargs=ldflags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def openmp_flags(compiler):
    """Find the OpenMP flags this compiler accepts; ``(None, None)`` when none works."""
    if os.environ.get("MICROTILE_NO_OPENMP", "0") not in ("", "0"):
        return None, None
    ctype = getattr(compiler, "compiler_type", "")
    if ctype == "msvc":
        candidates = [(["/openmp"], [])]
    else:
        candidates = [
            (["-fopenmp"], ["-fopenmp"]),
            (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),  # Apple clang with libomp
        ]
    for cflags, ldflags in candidates:
        if _try_compile(compiler, cflags, ldflags):
            return cflags, ldflags
    return None, None


class BuildExt(build_ext):
    def build_extensions(self):
        cflags, ldflags = openmp_flags(self.compiler)
        if cflags is None:
            print("microtile: OpenMP not found; building single-threaded kernels", file=sys.stderr)
        msvc = self.compiler.compiler_type == "msvc"
        for ext in self.extensions:
            # -fno-math-errno: sqrt and friends need not set errno, so loops over them
            # vectorize (Adam's update is 4x faster); nothing here reads errno.
            opt = [] if msvc else (["-O0", "-g"] if DEBUG else ["-O3"]) + ["-fno-math-errno"]
            ext.extra_compile_args = opt + ext.extra_compile_args
            if cflags:
                ext.extra_compile_args += cflags
                ext.extra_link_args += ldflags
        super().build_extensions()


def extensions():
    exts = []
    sources = sorted(glob.glob("src/microtile/*.pyx"))
    for path in sources:
        stem = os.path.splitext(os.path.basename(path))[0]
        pkg = "microtile"
        isa = [suffix for suffix in ISA_FLAGS if stem.endswith(suffix)]
        if isa and not X86_64:
            continue
        ext = Extension(
            f"{pkg}.{stem}",
            [path],
            include_dirs=[np.get_include(), "src/microtile"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
            extra_compile_args=list(ISA_FLAGS[isa[0]]) if isa else [],
        )
        exts.append(ext)
    return exts


setup(
    packages=["microtile", "microtile.nn", "autotune"],
    package_dir={"microtile": "src/microtile", "autotune": "autotune"},
    package_data={"microtile": ["*.pxd", "*.h"]},
    ext_modules=cythonize(
        extensions(),
        compiler_directives=DIRECTIVES,
        include_path=["src"],
        nthreads=int(os.environ.get("MICROTILE_CYTHON_JOBS", "0")) or None,
    ),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
