"""The build without OpenMP (FASTBN_OPENMP=0) works and gives the same bits."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from helpers import make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import fastbn
assert fastbn.__file__.startswith(sys.argv[1]), fastbn.__file__
from fastbn import _cpu
x = np.moveaxis(np.load(sys.argv[2]), -1, 1)   # back to the parent's channels-last view
y, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
gx, _, _ = fastbn.batch_norm_backward(x, x, None, None, None, sm, si, True, 1e-5)
np.savez(sys.argv[3], y=y, gx=gx, openmp=_cpu.HAVE_OPENMP, threads=fastbn.get_num_threads())
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_serial_build_matches_openmp_build(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "fastbn"), src / "fastbn",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    env = dict(os.environ, FASTBN_OPENMP="0")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "OpenMP disabled by FASTBN_OPENMP" in build.stderr
    x = make((6, 4, 9, 11), np.float32, offset=100.0, layout="channels_last")
    # saved as NHWC memory: np.save would make the NCHW view C-contiguous (another layout)
    np.save(tmp_path / "x.npy", np.moveaxis(x, 1, -1))
    subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "x.npy"),
                    str(tmp_path / "out.npz")], check=True, cwd=tmp_path)
    out = np.load(tmp_path / "out.npz")
    assert not bool(out["openmp"]) and int(out["threads"]) == 1
    y, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    gx, _, _ = fastbn.batch_norm_backward(x, x, None, None, None, sm, si, True, 1e-5)
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["gx"], gx)
