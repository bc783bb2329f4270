"""Results are bit-identical for any thread count; thread settings behave."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from helpers import make

CASES = [((8, 5, 17, 19), "contiguous"), ((8, 5, 17, 19), "channels_last"),
         ((3000, 7), "contiguous"), ((2, 3, 5000), "contiguous"), ((1, 2, 40000), "contiguous")]


def _run_all(x, gy):
    rm = np.zeros(x.shape[1], x.dtype)
    rv = np.ones(x.shape[1], x.dtype)
    w = np.linspace(0.5, 1.5, x.shape[1]).astype(x.dtype)
    y, sm, si = fastbn.batch_norm_forward(x, w, None, rm, rv, True, 0.1, 1e-5)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5)
    ye = fastbn.batch_norm(x, rm, rv, w)
    return [y, sm, si, rm, rv, gx, gw, gb, ye]


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_n_threads_agnosticism(shape, layout, dtype, offset):
    x = make(shape, dtype, offset=offset, seed=31, layout=layout)
    gy = make(shape, dtype, seed=32, layout=layout)
    results = {}
    for n in (1, 2, 3, 7):
        fastbn.set_num_threads(n)
        results[n] = _run_all(x, gy)
    for n in (2, 3, 7):
        for a, b in zip(results[1], results[n]):
            np.testing.assert_array_equal(a, b)


def test_set_get_num_threads():
    from fastbn import _cpu

    fastbn.set_num_threads(3)
    assert fastbn.get_num_threads() == (3 if _cpu.HAVE_OPENMP else 1)


def _child(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, check=True).stdout


def test_omp_num_threads_is_honoured():
    from fastbn import _cpu

    out = _child("import fastbn; print(fastbn.get_num_threads())", OMP_NUM_THREADS="5")
    assert int(out) == (5 if _cpu.HAVE_OPENMP else 1)


def test_show_config(capsys):
    fastbn.show_config()
    out = capsys.readouterr().out
    for word in ("fastbn", "numpy", "openmp", "threads", "cuda"):
        assert word in out
    assert fastbn.__version__ in out
