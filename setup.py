"""Build the fastbn Cython extension, with OpenMP when the compiler has it.

Set ``FASTBN_OPENMP=0`` to build the serial version even where OpenMP works.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP_TEST = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or empty lists without it."""
    if os.environ.get("FASTBN_OPENMP", "1").strip().lower() in ("0", "false", "no", "off"):
        print("fastbn: OpenMP disabled by FASTBN_OPENMP", file=sys.stderr)
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    flags = ["-fopenmp"]
    cc = os.environ.get("CC", "cc").split()
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "omp.c")
        with open(src, "w") as f:
            f.write(OPENMP_TEST)
        result = subprocess.run(cc + flags + [src, "-o", os.path.join(tmp, "omp")],
                                capture_output=True)
        ok = result.returncode == 0
    except OSError:
        ok = False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        print("fastbn: compiler has no OpenMP, building serial kernels", file=sys.stderr)
        return [], []
    return flags, flags


compile_args, link_args = _openmp_flags()
if sys.platform != "win32":
    # -O3 for the vectoriser; no -march=native so that a built wheel runs on any x86-64
    # (fastbn/_kernels.h picks AVX2/AVX-512 versions at run time instead).
    # -fno-wrapv undoes the -fwrapv that Python adds for its own C code: no fastbn
    # code relies on signed overflow wrapping, and wrapping index arithmetic kept the
    # row kernels from vectorising well (about 20% slower, measured).
    compile_args = ["-O3", "-fno-wrapv"] + compile_args

extensions = [
    Extension(
        "fastbn._cpu",
        ["fastbn/_cpu.pyx"],
        depends=["fastbn/_kernels.h"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
