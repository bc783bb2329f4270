"""Large offsets: fastbn keeps float32 results at float32 precision where PyTorch does not."""
import numpy as np
import pytest

import fastbn
import reference as ref
from helpers import make

CASES = [
    ((64, 16, 8, 8), "contiguous"),
    ((64, 16, 8, 8), "channels_last"),
    ((4096, 8), "contiguous"),
    ((515, 600), "contiguous"),     # wide rows (fastbn/_kernels.h, FASTBN_WIDE_ROW)
    ((16, 8, 300), "contiguous"),
    ((4, 8, 3, 5, 7), "channels_last"),
]


def _relative_error(a, b, std):
    """Max error relative to each channel's standard deviation."""
    diff = np.abs(np.asarray(a, np.float64) - b)
    axes = (0,) + tuple(range(2, diff.ndim))
    return float((diff.max(axis=axes) / std).max())


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,layout", CASES)
def test_float32_large_offset_matches_float64_reference(offset, shape, layout):
    x = make(shape, np.float32, offset=offset, seed=21, layout=layout)
    gy = make(shape, np.float32, seed=22, layout=layout)
    y, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    ry, mean, var = ref.forward_train(x, None, None, 1e-5)
    # y is in units of the channel's std already
    assert _relative_error(y, ry, 1.0) < 2e-6
    # the mean to 1e-7 of the channel's std (each float32 value carries 6e-8 of its own
    # size), plus the rounding of the float32 result; at offset 1e6 that rounding is
    # 0.03 while PyTorch is off by a whole std and more
    assert (np.abs(sm - mean) <= 1e-7 * np.sqrt(var) + 2.0**-24 * np.abs(mean)).all()
    np.testing.assert_allclose(si, 1 / np.sqrt(var + 1e-5), rtol=1e-6)
    w = np.ones(shape[1], np.float32)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5)
    rgx, rgw, rgb = ref.backward(gy, x, None, mean, var, 1e-5, True)
    assert _relative_error(gx, rgx, np.abs(rgx).max(axis=(0,) + tuple(range(2, x.ndim)))) < 1e-5
    count = x.size // x.shape[1]
    assert np.abs(gw - rgw).max() < 1e-5 * np.sqrt(count)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_running_stats_at_large_offset(offset):
    x = make((32, 4, 16, 16), np.float32, offset=offset, seed=23, layout="channels_last")
    bn = fastbn.BatchNorm2d(4, momentum=1.0)
    bn(x)
    mean, var = ref.moments(x)
    n = x.size // 4
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-7)
    np.testing.assert_allclose(bn.running_var, var * n / (n - 1), rtol=1e-5)


def test_eval_at_large_offset():
    x = make((64, 8), np.float32, offset=1e6, seed=24)
    rm = np.float32(1e6) + np.zeros(8, np.float32)
    rv = np.ones(8, np.float32)
    y = fastbn.batch_norm(x, rm, rv)
    ry = ref.forward(x, None, None, rm.astype(np.float64), rv.astype(np.float64), 1e-5)
    assert _relative_error(y, ry, 1.0) < 2e-6


def test_fastbn_beats_torch_at_large_offset():
    """The case the library exists for: torch's float32 CPU result is visibly off."""
    torch = pytest.importorskip("torch")
    x = make((4096, 64), np.float32, offset=1e6, seed=25)
    ry, _, _ = ref.forward_train(x, None, None, 1e-5)
    theirs = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None,
                                            training=True).numpy()
    mine = fastbn.batch_norm(x, None, None, training=True)
    err_mine = _relative_error(mine, ry, 1.0)
    err_theirs = _relative_error(theirs, ry, 1.0)
    assert err_mine < 2e-6
    assert err_mine * 100 < err_theirs


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(16, 6, 9, 7), (512, 6)])
def test_channels_with_small_and_large_means_together(shape, layout):
    """Small-mean channels take the one multiply-add form, large-mean ones subtract first."""
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("(N, C) is already channel-inner")
    offsets = np.array([0.0, 1e6, 3.0, -1e4, 4.5, 1e2])
    bcast = offsets.reshape((1, -1) + (1,) * (len(shape) - 2))
    x = make(shape, np.float64, seed=26)
    x = (x + bcast).astype(np.float32)
    from helpers import relayout
    x = relayout(x, layout)
    w = np.linspace(0.5, 3, 6).astype(np.float32)
    b = np.linspace(-1, 1, 6).astype(np.float32)
    y = fastbn.batch_norm(x, None, None, w, b, training=True)
    ry, mean, var = ref.forward_train(x, w, b, 1e-5)
    assert _relative_error(y, ry, w.astype(np.float64)) < 2e-6
    rv = (var * 2).astype(np.float32)
    rm = mean.astype(np.float32)
    ye = fastbn.batch_norm(x, rm, rv, w, b)
    rye = ref.forward(x, w, b, rm.astype(np.float64), rv.astype(np.float64), 1e-5)
    assert _relative_error(ye, rye, w.astype(np.float64)) < 2e-6


@pytest.mark.parametrize("shape", [(20000, 4), (3000, 200), (50, 3, 20, 20)])
def test_outlier_in_the_first_row(shape):
    """The channel-inner sums are taken around a pilot mean; an outlier among its rows must not
    cost precision (it also makes the variance large, which bounds the relative error)."""
    x = make(shape, np.float64, seed=27, layout="channels_last" if len(shape) == 4 else
             "contiguous")
    x[(0, 0) + (0,) * (len(shape) - 2)] = 1e8
    from fastbn import _cpu_backend

    got_mean, got_m2, count = _cpu_backend.moments(x)
    want_mean, want_var = ref.moments(x)
    assert (np.abs(got_mean - want_mean) <= 1e-12 * np.sqrt(want_var)).all()
    np.testing.assert_allclose(got_m2 / count, want_var, rtol=1e-10)


@pytest.mark.parametrize("shape,layout", [((8, 4, 3, 3), "contiguous"),
                                          ((8, 4, 16, 16), "contiguous"),
                                          ((8, 4, 16, 16), "channels_last"),
                                          ((300, 4), "contiguous")])
def test_variance_that_overflows_float64_is_inf(shape, layout):
    """One value near float64's maximum: the squared deviations overflow, and the variance
    is +inf (1 / sqrt(var + eps) = 0), never inf - inf = NaN, whatever kernel or clone
    sums it (a review found NaN, hence NaN outputs, on 7x7 planes); other channels are
    untouched."""
    x = make(shape, np.float64, seed=28, layout=layout)
    x[(1, 2) + (0,) * (len(shape) - 2)] = np.finfo(np.float64).max / 4
    y, save_mean, save_invstd = fastbn.batch_norm_forward(x, None, None, None, None, True,
                                                          0.1, 1e-5)
    assert save_invstd[2] == 0 and np.isfinite(save_mean[2])
    assert np.isfinite(y).all()
    others = [0, 1, 3]
    want_mean, want_var = ref.moments(x[:, others])
    np.testing.assert_allclose(save_invstd[others], 1 / np.sqrt(want_var + 1e-5), rtol=1e-12)


def test_constant_channel_near_the_top_of_float64():
    """A channel-inner pilot sums 16 rows of every folded column of a channel; scaled
    before adding, values of 1e305 do not overflow it (they did: mean NaN)."""
    x = np.full((2048, 1), 1e305)
    y, save_mean, save_invstd = fastbn.batch_norm_forward(x, None, None, None, None, True,
                                                          0.1, 1e-5)
    assert save_mean[0] == 1e305 and (y == 0).all()
