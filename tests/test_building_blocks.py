"""The step-by-step CPU functions (used by SyncBatchNorm) agree with the fused kernels."""
import numpy as np
import pytest

import fastbn
from fastbn import _cpu_backend as cpu
import reference as ref
from helpers import make

CASES = [((6, 5, 7, 9), "contiguous"), ((6, 5, 7, 9), "channels_last"), ((300, 7), "contiguous"),
         ((4, 3, 50), "contiguous"), ((2, 3, 11, 5), "transposed")]


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_steps_equal_fused(shape, layout, dtype):
    x = make(shape, dtype, offset=1e5, seed=41, layout=layout)
    gy = make(shape, dtype, seed=42, layout=layout)
    c = shape[1]
    w = np.linspace(0.5, 2, c).astype(dtype)
    b = np.linspace(-1, 1, c).astype(dtype)
    y, sm, si = fastbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5)

    mean, m2, count = cpu.moments(x)
    rmean, rvar = ref.moments(x)
    np.testing.assert_allclose(mean, rmean, rtol=1e-13)
    np.testing.assert_allclose(m2 / count, rvar, rtol=1e-9)
    invstd = 1.0 / np.sqrt(m2 / count + 1e-5)
    np.testing.assert_array_equal(cpu.normalize(x, mean, invstd, w, b), y)

    sum_dy, sum_dyx, sum_x = cpu.grad_sums(gy, x, mean)
    rgx, rgw, rgb = ref.backward(gy, x, w, rmean, rvar, 1e-5, True)
    np.testing.assert_allclose(sum_dy, rgb, rtol=1e-6, atol=1e-6 * count)
    np.testing.assert_allclose(sum_dyx * invstd, rgw, rtol=1e-5, atol=1e-5 * count)
    assert np.abs(sum_x).max() < 1e-6 * count
    g = cpu.grad_input(gy, x, w, mean, invstd, sum_dy, sum_dyx, count)
    tol = 2e-6 if dtype == np.float32 else 1e-10
    assert np.abs(g - gx).max() <= tol * np.abs(gx).max()
    assert np.abs(g - rgx).max() <= tol * np.abs(rgx).max()


def test_empty_inputs():
    x = np.zeros((0, 3, 4), np.float32)
    mean, m2, count = cpu.moments(x)
    assert count == 0 and mean.shape == (3,)
    assert cpu.normalize(x, mean, mean, None, None).shape == x.shape
    s = cpu.grad_sums(x, x, mean)
    assert all(v.shape == (3,) and not v.any() for v in s)
    assert cpu.grad_input(x, x, None, mean, mean, *s[:2], 5).shape == x.shape


def test_building_blocks_with_no_channels():
    """C = 0 (values per channel, but no channel): empty results, no kernel call (the
    channel-inner blocking divided by C and killed the process)."""
    from fastbn import _cpu_backend

    x = np.zeros((2, 0), np.float32)
    mean, m2, count = _cpu_backend.moments(x)
    assert mean.shape == m2.shape == (0,) and count == 2
    none = np.zeros(0)
    assert _cpu_backend.normalize(x, none, none, None, None).shape == (2, 0)
    assert all(s.shape == (0,) for s in _cpu_backend.grad_sums(x, x, none))
    assert _cpu_backend.grad_input(x, x, None, none, none, none, none, 2).shape == (2, 0)
