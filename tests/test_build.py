"""Variant builds work and give the same bits as the default one.

FASTBN_OPENMP=0 builds the serial kernels; -DFASTBN_NO_VECTOR_EXT takes the scalar
spelling of the kernels in fastbn/_kernels.h (what compilers without GCC's vector
extensions compile), which sums in the same order as the vector one.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import backward_outputs as compute, make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import fastbn
assert fastbn.__file__.startswith(sys.argv[1]), fastbn.__file__
from fastbn import _cpu
from helpers import backward_outputs as compute
inputs = np.load(sys.argv[2])
out = {}
for key in inputs.files:
    for i, a in enumerate(compute(np.moveaxis(inputs[key], -1, 1) if key.startswith("cl")
                                  else inputs[key])):
        out[f"{key}_{i}"] = a
np.savez(sys.argv[3], openmp=_cpu.HAVE_OPENMP, threads=fastbn.get_num_threads(), **out)
"""

# float32 planes and rows long enough for the float32 partials, channels-last, and a
# plane whose pilot shift is far from its mean (the float64 fallback)
INPUTS = {"nchw": ((6, 4, 12, 13), "contiguous", None),
          "cl_nhwc": ((6, 4, 9, 11), "channels_last", None),
          "nc": ((515, 600), "contiguous", None),
          "outlier": ((4, 3, 16, 16), "contiguous", 1e8),
          "nchw64": ((3, 4, 10, 11), "contiguous", None)}

# CPPFLAGS, not CFLAGS: distutils lets CFLAGS replace Python's own compile flags
# (-DNDEBUG among them), and float64 bits did change with that
VARIANTS = {"serial": ({"FASTBN_OPENMP": "0"}, "OpenMP disabled by FASTBN_OPENMP", False),
            "scalar": ({"CPPFLAGS": "-DFASTBN_NO_VECTOR_EXT"}, None, True)}


def _inputs():
    out = {}
    for key, (shape, layout, first) in INPUTS.items():
        dtype = np.float64 if key.endswith("64") else np.float32
        x = make(shape, dtype, offset=100.0, layout=layout, seed=len(out))
        if first is not None:
            # the 16 values of plane (0, 0) its pilot shift averages
            x.reshape(x.shape[0], x.shape[1], -1)[0, 0, ::16] = first
        out[key] = x
    return out


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_build_matches_default_build(variant, tmp_path):
    env_extra, build_note, openmp = VARIANTS[variant]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "fastbn"), src / "fastbn",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    env = dict(os.environ, **env_extra)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    if build_note:
        assert build_note in build.stderr
    inputs = _inputs()
    # channels-last inputs are saved as NHWC memory: np.save would make the NCHW view
    # C-contiguous, which is another layout with other bits
    np.savez(tmp_path / "x.npz", **{k: np.moveaxis(v, 1, -1) if k.startswith("cl") else v
                                    for k, v in inputs.items()})
    tests = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "x.npz"),
                    str(tmp_path / "out.npz")], check=True, cwd=tmp_path,
                   env=dict(os.environ, PYTHONPATH=tests))
    out = np.load(tmp_path / "out.npz")
    assert bool(out["openmp"]) == (openmp and _have_openmp())
    if not openmp:
        assert int(out["threads"]) == 1
    for key, x in inputs.items():
        for i, want in enumerate(compute(x)):
            got = out[f"{key}_{i}"]
            if variant == "scalar" and x.dtype == np.float64:
                # the float64 sums contract multiply-adds differently (fastbn/_kernels.h)
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12,
                                           err_msg=f"{key} output {i}")
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{key} output {i}")


def _have_openmp():
    from fastbn import _cpu
    return bool(_cpu.HAVE_OPENMP)

