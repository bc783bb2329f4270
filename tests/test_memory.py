"""No call allocates more than its outputs plus O(C) scratch (traced with tracemalloc).

The kernels report their scratch to tracemalloc, so the peak below covers NumPy
arrays and kernel scratch alike. The output cache (fastbn/_memory.py) is off for
these checks, so that every call allocates its output; its own tests are in
test_output_cache.py.
"""
import tracemalloc

import numpy as np
import pytest

import fastbn
from helpers import make

# The first two cases and (16384, 64) are larger than the slack below, so an extra
# copy of the input is caught for each layout; the others check the scratch bound.
CASES = [((64, 8, 32, 32), "contiguous"), ((64, 8, 32, 32), "channels_last"),
         ((16384, 64), "contiguous"),
         ((2048, 256), "contiguous"), ((16, 3, 64, 64), "channels_last"),
         ((512, 16, 4), "contiguous")]


@pytest.fixture(autouse=True)
def no_output_cache():
    old = fastbn.set_output_cache(0)
    yield
    fastbn.set_output_cache(old)


def _peak(fn):
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, result


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_peak_memory_is_outputs_plus_small_scratch(shape, layout, dtype):
    fastbn.set_num_threads(2)
    x = make(shape, dtype, seed=51, layout=layout)
    gy = make(shape, dtype, seed=52, layout=layout)
    c = shape[1]
    w = np.ones(c, dtype)
    b = np.zeros(c, dtype)
    rm = np.zeros(c, dtype)
    rv = np.ones(c, dtype)
    # O(C) scratch: per-channel coefficients, and at most 64 blocks of partial sums
    # (3 doubles per column of a folded row: C values, or fewer than 1024 + 16 * C)
    slack = 64 * 1024 + (65 * 3 * 8 * (1024 + 16 * c)) + 64 * c * 8
    calls = {
        "train": lambda: fastbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5),
        "eval": lambda: fastbn.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5),
    }
    _, sm, si = calls["train"]()
    calls["backward"] = lambda: fastbn.batch_norm_backward(gy, x, w, None, None, sm, si,
                                                           True, 1e-5)
    for name, fn in calls.items():
        peak, _ = _peak(fn)
        assert peak <= x.nbytes + slack, (name, peak, x.nbytes, slack)
        assert peak >= x.nbytes, (name, peak)     # the output itself is traced
