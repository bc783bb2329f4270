"""float32 input is reduced in float32 partials (fastbn/_kernels.h, the "_f32p" kernels).

The slow reference beside them is the same library with the partials switched off
(``_cpu.set_float32_partials(False)``: every value widened to float64, as for float64
input); both are checked against the float64 NumPy reference, on ordinary data at
large offsets and on the data the partials must hand back to float64 (a shift far
from the mean, values whose squares overflow or underflow float32, NaN).
"""
import numpy as np
import pytest

from fastbn import _cpu, _cpu_backend
import reference as ref
from helpers import make

# planes of >= 128 values (shorter runs never use partials), channels-last, (N, C) with
# narrow and wide rows, a 3-D volume
SHAPES = [((8, 6, 24, 24), "contiguous"), ((8, 6, 24, 24), "channels_last"),
          ((4096, 8), "contiguous"), ((515, 600), "contiguous"),
          ((3, 4, 16, 16, 16), "contiguous"), ((3, 4, 16, 16, 16), "channels_last")]


def _moments(x, partials):
    _cpu.set_float32_partials(partials)
    try:
        mean, m2, count = _cpu_backend.moments(x)
    finally:
        _cpu.set_float32_partials(True)
    return mean, m2 / count


def _grad_sums(gy, x, center, partials):
    _cpu.set_float32_partials(partials)
    try:
        return _cpu_backend.grad_sums(gy, x, center)
    finally:
        _cpu.set_float32_partials(True)


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_moments_match_float64_sums(offset, shape, layout):
    x = make(shape, np.float32, offset=offset, seed=31, layout=layout)
    want_mean, want_var = ref.moments(x)
    std = np.sqrt(want_var)
    for partials in (True, False):
        mean, var = _moments(x, partials)
        # measured: partials <= 3.1e-8 of the std and 2.3e-7 of the variance (widest
        # rows, offset 1e4); float64 sums 1e-11 and 1e-13
        assert (np.abs(mean - want_mean) <= 1e-7 * std).all()
        np.testing.assert_allclose(var, want_var, rtol=1e-6)


@pytest.mark.parametrize("shape,layout", SHAPES)
def test_grad_sums_match_float64_sums(shape, layout):
    x = make(shape, np.float32, offset=1e3, seed=32, layout=layout)
    gy = make(shape, np.float32, seed=33, layout=layout)
    mean, var = ref.moments(x)
    center = mean + 0.3 * np.sqrt(var)      # not a float32 value: the sums are moved to it
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    dy = gy.astype(np.float64)
    e = x.astype(np.float64) - center.reshape(bshape)
    want = [dy.sum(_axes(x)), (dy * e).sum(_axes(x)), e.sum(_axes(x))]
    scale = [np.abs(dy).sum(_axes(x)), np.abs(dy * e).sum(_axes(x)), np.abs(e).sum(_axes(x))]
    for partials in (True, False):
        got = _grad_sums(gy, x, center, partials)
        for g, w, s in zip(got, want, scale):
            # measured: partials <= 2.2e-8 of the sum of magnitudes
            assert (np.abs(g - w) <= 2e-7 * s).all()


def test_switch_is_obeyed():
    """The two paths round differently, so the switch must change some bits."""
    x = make((8, 6, 24, 24), np.float32, seed=34)
    a, b = _moments(x, True), _moments(x, False)
    assert not np.array_equal(a[1], b[1])
    rows = make((515, 600), np.float32, seed=34)
    assert not np.array_equal(_moments(rows, True)[1], _moments(rows, False)[1])


def _with_first_values(x, value):
    """x with the first value of every plane (channel-outer) or row (channel-inner) set."""
    x = x.copy()
    if x.ndim == 2:
        x[0, :] = value
    else:
        x[:, :, 0, 0] = value
    return x


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (300, 1024), (515, 600)])
def test_shift_far_from_the_mean_falls_back_to_float64(shape):
    """Sums are taken around the first value of each plane or row. With an outlier
    there, sum (x - shift)**2 is about n times M2 for the n values summed together
    (a plane, or a block of rows of one column), and float32 partials of it would
    keep only about 1e-7 * n of M2; above n = 16 (FASTBN_F32_CANCEL) the kernels sum
    that plane or column again in float64. Every plane and block here holds more than
    16 values, so the result must be float64-exact (without the fallback: ~1e-5)."""
    x = _with_first_values(make(shape, np.float32, seed=35), 1e8)
    want_mean, want_var = ref.moments(x)
    mean, var = _moments(x, True)
    np.testing.assert_allclose(var, want_var, rtol=1e-10)
    assert (np.abs(mean - want_mean) <= 1e-10 * np.sqrt(want_var)).all()


@pytest.mark.parametrize("scale", [1e20, 1e-25])
@pytest.mark.parametrize("shape,layout", SHAPES[:4])
def test_squares_outside_float32_range(scale, shape, layout):
    """1e20**2 overflows float32 and 1e-25**2 underflows it; float64 holds both."""
    x = (make(shape, np.float64, seed=36, layout=layout) * scale).astype(np.float32)
    want_mean, want_var = ref.moments(x)
    mean, var = _moments(x, True)
    np.testing.assert_allclose(var, want_var, rtol=1e-6)
    assert (np.abs(mean - want_mean) <= 1e-7 * np.sqrt(want_var)).all()
    if scale > 1:
        # dy * (x - mean) overflows float32 too. (Products that underflow it lose
        # precision in the grad sums: documented, not checked.)
        got = _grad_sums(x, x, want_mean, True)
        np.testing.assert_allclose(got[1], want_var * (x.size // x.shape[1]), rtol=1e-6)


@pytest.mark.parametrize("shape,layout", SHAPES[:4])
def test_constant_and_non_finite_channels(shape, layout):
    x = make(shape, np.float32, seed=37, layout=layout)
    x[:, 0] = 3.25                      # constant: mean exact, variance exactly 0
    x[(1, 1) + (0,) * (x.ndim - 2)] = np.nan
    x[(1, 2) + (0,) * (x.ndim - 2)] = np.inf
    on, off = _moments(x, True), _moments(x, False)
    assert on[0][0] == 3.25 and on[1][0] == 0
    for a, b in zip(on, off):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.isnan(on[1][1]) and np.isnan(on[1][2])
    want_mean, want_var = ref.moments(x[:, 3:])
    np.testing.assert_allclose(on[1][3:], want_var, rtol=1e-6)
