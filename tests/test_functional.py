"""Functional API against PyTorch (CPU) and the float64 reference."""
import numpy as np
import pytest

import fastbn
import reference as ref
from helpers import LAYOUTS, is_channels_last, make, params, tol

torch = pytest.importorskip("torch")

SHAPES = [(16, 5), (7, 3, 11), (4, 6, 5, 7), (2, 3, 4, 5, 6), (3, 4, 1, 1), (1, 3, 9), (5, 2, 1),
          (23, 530)]
DTYPES = [np.float32, np.float64]


def _torch_forward_backward(x, w, b, rm, rv, training, momentum, eps, gy):
    xt = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    wt = None if w is None else torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    rmt = None if rm is None else torch.tensor(rm)
    rvt = None if rv is None else torch.tensor(rv)
    y = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training, momentum, eps)
    y.backward(torch.tensor(np.ascontiguousarray(gy)))
    out = {"y": y.detach().numpy(), "gx": xt.grad.numpy()}
    out["gw"] = None if wt is None else wt.grad.numpy()
    out["gb"] = None if bt is None else bt.grad.numpy()
    out["rm"] = None if rmt is None else rmt.numpy()
    out["rv"] = None if rvt is None else rvt.numpy()
    return out


def _close(a, b, dtype, scale=1.0):
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_backward_matches_torch(shape, dtype, training, affine):
    c = shape[1]
    x = make(shape, dtype, offset=0.5, scale=2.0, seed=3)
    gy = make(shape, dtype, seed=4)
    w, b, rm, rv = params(c, dtype)
    if not affine:
        w = b = None
    mine_rm, mine_rv = rm.copy(), rv.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, w, b, mine_rm, mine_rv, training, 0.1, 1e-5)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, mine_rm if not training else None,
                                            mine_rv if not training else None,
                                            save_mean, save_invstd, training, 1e-5)
    theirs = _torch_forward_backward(x, w, b, rm.copy(), rv.copy(), training, 0.1, 1e-5, gy)
    _close(y, theirs["y"], dtype)
    _close(gx, theirs["gx"], dtype)
    _close(mine_rm, theirs["rm"], dtype)
    _close(mine_rv, theirs["rv"], dtype)
    if affine:
        _close(gw, theirs["gw"], dtype, scale=shape[0] * 10)
        _close(gb, theirs["gb"], dtype, scale=shape[0] * 10)
    else:
        # no weight, but the parameter gradients all the same (native_batch_norm_backward's)
        mean, var = ref.moments(x) if training else (rm, rv)
        _, want_gw, want_gb = ref.backward(gy, x, None, mean, var, 1e-5, training)
        _close(gw, want_gw, dtype, scale=shape[0] * 10)
        _close(gb, want_gb, dtype, scale=shape[0] * 10)
    assert y.dtype == x.dtype and gx.dtype == x.dtype and y.shape == x.shape
    if training:
        mean, var = ref.moments(x)
        _close(save_mean, mean, dtype)
        _close(save_invstd, 1 / np.sqrt(var + 1e-5), dtype)
    else:
        assert save_mean.shape == (0,) and save_invstd.shape == (0,)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(6, 4, 5, 7), (3, 5, 4, 3, 2), (9, 4, 13), (12, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_match_reference(layout, shape, dtype):
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("(N, C) is already channel-inner")
    x = make(shape, dtype, offset=-2.0, scale=3.0, seed=5, layout=layout)
    gy = make(shape, dtype, seed=6, layout=layout)
    w, b, _, _ = params(shape[1], dtype)
    y, sm, si = fastbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    ry, mean, var = ref.forward_train(x, w, b, 1e-5)
    _close(y, ry, dtype)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5)
    rgx, rgw, rgb = ref.backward(gy, x, w, mean, var, 1e-5, True)
    _close(gx, rgx, dtype)
    _close(gw, rgw, dtype, scale=100)
    _close(gb, rgb, dtype, scale=100)
    # channels-last memory stays channels-last, everything else comes back C-contiguous
    if layout == "channels_last":
        assert is_channels_last(y) and is_channels_last(gx)
    else:
        assert y.flags.c_contiguous and gx.flags.c_contiguous


@pytest.mark.parametrize("m,c,width", [(1000, 6, 528), (999, 64, 512), (37, 768, 768),
                                       (50, 600, 1200), (50, 511, 8176), (40, 1025, 1025)])
def test_grad_input_row_width(m, c, width):
    """The channel-inner grad_input pass takes the fewest whole channel rows that make 512
    values and a multiple of 16, or the reductions' folded row where that is no longer."""
    from fastbn import _cpu

    assert _cpu.grad_input_width(m, c) == width


@pytest.mark.parametrize("shape,layout", [((1000, 6), "contiguous"), ((999, 64), "contiguous"),
                                          ((37, 1000), "contiguous"), ((41, 600), "contiguous"),
                                          ((3, 64, 7, 9), "channels_last")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_channel_inner_grad_input_rows_and_rest(shape, layout, dtype, training, monkeypatch):
    """Rows of the grad_input pass (test_grad_input_row_width) and a rest of whole channel
    rows ((1000, 6): 11 rows of 528 and 12 of 6 values), on two threads: every value of
    grad_input gets its own channel's coefficients, in training and in eval."""
    from fastbn import _threads

    monkeypatch.setattr(_threads, "MIN_VALUES_PER_THREAD", 1)
    fastbn.set_num_threads(2)
    x = make(shape, dtype, offset=3.0, seed=14, layout=layout)
    gy = make(shape, dtype, seed=15, layout=layout)
    w = np.linspace(0.5, 1.5, shape[1]).astype(dtype)
    mean, var = ref.moments(x)
    rm, rv = mean.astype(dtype) + 0.25, var.astype(dtype) * 2
    _, sm, si = fastbn.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, rm, rv, sm, si, training, 1e-5)
    if training:
        rgx, rgw, rgb = ref.backward(gy, x, w, mean, var, 1e-5, True)
    else:
        rgx, rgw, rgb = ref.backward(gy, x, w, rm.astype(np.float64), rv.astype(np.float64),
                                     1e-5, False)
    # relative to |gy| * invstd * w, the size of a grad_input term (training's gx can be
    # near 0 where the terms cancel)
    scale = np.abs(np.asarray(gy, np.float64)).max() * 1.5 / np.sqrt(var.min() + 1e-5)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert np.abs(gx - rgx).max() <= tol * scale
    np.testing.assert_allclose(gw, rgw, rtol=tol * 10, atol=tol * scale * shape[0])


def test_channels_last_computed_without_copy(monkeypatch):
    """The channels-last input reaches the inner kernel as a view of the caller's memory."""
    from fastbn import _cpu_backend

    x = make((4, 6, 5, 5), np.float32, layout="channels_last")
    seen = []
    key = ("inner", np.dtype(np.float32))
    real = _cpu_backend._TRAIN[key]

    def spy(view, *args):
        seen.append(np.shares_memory(np.asarray(view), x))
        return real(view, *args)

    monkeypatch.setitem(_cpu_backend._TRAIN, key, spy)
    fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    assert seen == [True]


def test_mixed_layouts_in_backward():
    """grad_output in another layout than x is converted, not misread."""
    shape = (4, 3, 6, 5)
    x = make(shape, np.float64, layout="channels_last", seed=8)
    gy_c = make(shape, np.float64, seed=9)
    _, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    gx1, _, _ = fastbn.batch_norm_backward(gy_c, x, None, None, None, sm, si, True, 1e-5)
    rgx, _, _ = ref.backward(gy_c, x, None, *ref.moments(x), 1e-5, True)
    np.testing.assert_allclose(gx1, rgx, rtol=1e-10, atol=1e-12)


def test_batch_norm_wrapper_updates_running_stats():
    x = make((8, 3, 4), np.float32, offset=1.0, seed=2)
    rm = np.zeros(3, np.float32)
    rv = np.ones(3, np.float32)
    y = fastbn.batch_norm(x, rm, rv, training=True, momentum=0.3)
    mean, var = ref.moments(x)
    n = x.size // 3
    np.testing.assert_allclose(rm, 0.3 * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, 0.7 + 0.3 * var * n / (n - 1), rtol=1e-6)
    np.testing.assert_allclose(y, ref.forward(x, None, None, mean, var, 1e-5), rtol=1e-5,
                               atol=1e-5)
    y_eval = fastbn.batch_norm(x, rm, rv)   # training=False by default
    np.testing.assert_allclose(y_eval, ref.forward(x, None, None, rm, rv, 1e-5), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.25])
def test_momentum_extremes(momentum):
    x = make((10, 4), np.float64, seed=11)
    rm = np.full(4, 5.0)
    rv = np.full(4, 3.0)
    fastbn.batch_norm(x, rm, rv, training=True, momentum=momentum)
    mean, var = ref.moments(x)
    np.testing.assert_allclose(rm, ref.running_update(np.full(4, 5.0), mean, momentum))
    np.testing.assert_allclose(rv, ref.running_update(np.full(4, 3.0), var * 10 / 9, momentum))


def test_empty_batch():
    for shape in [(0, 3), (0, 3, 4, 4), (2, 3, 0)]:
        x = np.zeros(shape, np.float32)
        rm = np.arange(3, dtype=np.float32)
        rv = np.ones(3, np.float32)
        y, sm, si = fastbn.batch_norm_forward(x, None, None, rm, rv, True, 0.1, 1e-5)
        assert y.shape == shape and sm.shape == (0,) and si.shape == (0,)
        np.testing.assert_array_equal(rm, np.arange(3))
        w = np.ones(3, np.float32)
        gx, gw, gb = fastbn.batch_norm_backward(x, x, w, None, None, sm, si, True, 1e-5)
        assert gx.shape == shape
        np.testing.assert_array_equal(gw, 0)
        np.testing.assert_array_equal(gb, 0)


@pytest.mark.parametrize("shape,layout", [((4, 3, 5), "contiguous"), ((40, 3), "contiguous"),
                                          ((4, 3, 5, 6), "channels_last")])
def test_nan_propagates_to_its_channel_only(shape, layout):
    x = make(shape, np.float64, seed=12, layout=layout)
    x[(1, 1) + (2,) * (len(shape) - 2)] = np.nan
    y = fastbn.batch_norm(x, None, None, training=True)
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


def test_n1_with_spatial_is_valid_in_training():
    x = make((1, 3, 4, 4), np.float32, seed=13)
    y = fastbn.batch_norm(x, None, None, training=True)
    ry, _, _ = ref.forward_train(x, None, None, 1e-5)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)


def test_eval_backward_uses_running_stats():
    x = make((6, 3, 4), np.float64, seed=14)
    gy = make((6, 3, 4), np.float64, seed=15)
    w, b, rm, rv = params(3, np.float64)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, rm, rv, None, None, False, 1e-3)
    rgx, rgw, rgb = ref.backward(gy, x, w, rm, rv, 1e-3, False)
    np.testing.assert_allclose(gx, rgx, rtol=1e-12)
    np.testing.assert_allclose(gw, rgw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gb, rgb, rtol=1e-12, atol=1e-12)


def test_read_only_input_is_accepted():
    x = make((5, 3, 4), np.float32, seed=16)
    x.flags.writeable = False
    y = fastbn.batch_norm(x, None, None, training=True)
    assert y.flags.writeable


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("out_layout", ["contiguous", "channels_last", "transposed"])
def test_out_argument(layout, out_layout):
    shape = (4, 3, 5, 6)
    x = make(shape, np.float32, offset=2.0, seed=61, layout=layout)
    gy = make(shape, np.float32, seed=62, layout=layout)
    w, b, _, _ = params(3, np.float32)
    y, sm, si = fastbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5)
    out = make(shape, np.float32, seed=63, layout=out_layout)
    got = fastbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5, out=out)[0]
    assert got is out
    np.testing.assert_array_equal(out, y)
    out2 = make(shape, np.float32, seed=64, layout=out_layout)
    got, gw2, gb2 = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5,
                                               out=out2)
    assert got is out2
    np.testing.assert_array_equal(out2, gx)
    np.testing.assert_array_equal(gw2, gw)
    out3 = np.empty(shape, np.float32)
    assert fastbn.batch_norm(x, sm, si, out=out3) is out3


def test_out_may_alias_the_input():
    x = make((6, 4, 7), np.float64, offset=1.0, seed=65)
    gy = make((6, 4, 7), np.float64, seed=66)
    y, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    gx, _, _ = fastbn.batch_norm_backward(gy, x, None, None, None, sm, si, True, 1e-5)
    x2, gy2 = x.copy(), gy.copy()
    fastbn.batch_norm_forward(x2, None, None, None, None, True, 0.1, 1e-5, out=x2)
    np.testing.assert_array_equal(x2, y)
    fastbn.batch_norm_backward(gy2, x, None, None, None, sm, si, True, 1e-5, out=gy2)
    np.testing.assert_array_equal(gy2, gx)


def test_bad_out_changes_nothing():
    x = make((6, 4, 7), np.float32, seed=67)
    rm = np.zeros(4, np.float32)
    rv = np.ones(4, np.float32)
    for out, exc, pattern in [
        (np.empty((6, 4, 8), np.float32), ValueError, r"out must have the input's shape"),
        (np.empty((6, 4, 7), np.float64), ValueError, r"dtype float32, got .* float64"),
        ([0.0], TypeError, "out must be a numpy.ndarray"),
    ]:
        with pytest.raises(exc, match=pattern):
            fastbn.batch_norm(x, rm, rv, training=True, out=out)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fastbn.batch_norm(x, rm, rv, training=True, out=ro)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_strided_per_channel_arrays():
    """Weight, bias and running stats may be strided views; running stats update in place."""
    x = make((8, 3, 5), np.float32, offset=1.0, seed=71)
    gy = make((8, 3, 5), np.float32, seed=72)
    w, b, rm, rv = params(3, np.float32)
    views = [np.zeros(6, np.float32)[::2] for _ in range(4)]
    for view, value in zip(views, (w, b, rm, rv)):
        view[...] = value
    sw, sb, srm, srv = views
    y, sm, si = fastbn.batch_norm_forward(x, sw, sb, srm, srv, True, 0.1, 1e-5)
    ry, rsm, rsi = fastbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(srm, rm)     # updated through the view
    np.testing.assert_array_equal(srv, rv)
    np.testing.assert_array_equal(fastbn.batch_norm(x, srm, srv, sw, sb),
                                  fastbn.batch_norm(x, rm, rv, w, b))
    got = fastbn.batch_norm_backward(gy, x, sw, None, None, sm, si, True, 1e-5)
    want = fastbn.batch_norm_backward(gy, x, w, None, None, rsm, rsi, True, 1e-5)
    for a, c in zip(got, want):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("training", [True, False])
def test_param_grads_without_weight_match_native_backward(training):
    """A bias-only layer (weight=None) still gets grad_bias, as with torch's output_mask."""
    x = make((6, 3, 5), np.float64, offset=2.0, seed=5)
    gy = make((6, 3, 5), np.float64, seed=6)
    _, b, rm, rv = params(3, np.float64)
    _, sm, si = fastbn.batch_norm_forward(x, None, b, rm.copy(), rv.copy(), True, 0.1, 1e-5)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, None, rm, rv, sm, si, training, 1e-5)
    t = [torch.from_numpy(a) if a is not None else None
         for a in (gy, x, rm, rv, sm if training else None, si if training else None)]
    want = torch.ops.aten.native_batch_norm_backward(t[0], t[1], None, t[2], t[3], t[4], t[5],
                                                     training, 1e-5, [True, True, True])
    for got, theirs in zip((gx, gw, gb), want):
        np.testing.assert_allclose(got, theirs.numpy(), rtol=1e-12, atol=1e-12)
    gx2, gw2, gb2 = fastbn.batch_norm_backward(gy, x, None, rm, rv, sm, si, training, 1e-5,
                                               param_grads=False)
    assert gw2 is None and gb2 is None
    np.testing.assert_array_equal(gx2, gx)
    empty = np.zeros((0, 3, 5))
    _, gw0, gb0 = fastbn.batch_norm_backward(empty, empty, None, rm, rv, np.zeros(0),
                                             np.zeros(0), training, 1e-5)
    np.testing.assert_array_equal(gw0, 0.0)
    np.testing.assert_array_equal(gb0, 0.0)
    with pytest.raises(TypeError, match="param_grads must be a bool"):
        fastbn.batch_norm_backward(gy, x, None, rm, rv, sm, si, training, 1e-5, param_grads=1)


@pytest.mark.parametrize("shape", [(3, 2), (3, 2, 5), (2, 3, 4, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_grad_input_ignores_nonfinite_x_and_mean(shape, layout):
    """In eval grad_input is gy * invstd * w: an inf/NaN in x or running_mean stays out."""
    if layout == "channels_last" and len(shape) < 4:
        pytest.skip("one layout for this rank")
    x = make(shape, np.float32, seed=7, layout=layout)
    x.flat[0], x.flat[x.size // 2] = np.inf, np.nan
    gy = make(shape, np.float32, seed=8, layout=layout)
    c = shape[1]
    w = np.linspace(0.5, 2, c).astype(np.float32)
    rm = np.zeros(c, np.float32)
    rm[0] = np.inf
    rv = np.linspace(0.5, 1.5, c).astype(np.float32)
    gx, _, _ = fastbn.batch_norm_backward(gy, x, w, rm, rv, None, None, False, 1e-5,
                                          param_grads=False)
    theirs = torch.ops.aten.native_batch_norm_backward(
        torch.from_numpy(np.ascontiguousarray(gy)), torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(w), torch.from_numpy(rm), torch.from_numpy(rv), None, None, False,
        1e-5, [True, False, False])[0].numpy()
    assert np.isfinite(gx).all()
    np.testing.assert_allclose(gx, theirs, rtol=1e-6)


def test_nan_in_a_single_plane_reaches_the_statistics():
    """One sample (N = 1): a NaN makes the variance NaN, as in PyTorch (it was read as 0)."""
    for layout_x in (np.array([[[1.0, 2.0, np.nan, 4.0]]], np.float32),
                     np.array([[1.0], [np.nan], [3.0]], np.float32)):
        c = layout_x.shape[1]
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        _, sm, si = fastbn.batch_norm_forward(layout_x, None, None, rm, rv, True, 0.1, 1e-5)
        trm, trv = torch.zeros(c), torch.ones(c)
        _, tsm, tsi = torch.native_batch_norm(torch.from_numpy(layout_x), None, None, trm, trv,
                                              True, 0.1, 1e-5)
        for mine, theirs in ((sm, tsm), (si, tsi), (rm, trm), (rv, trv)):
            np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs.numpy()))
        assert np.isnan(si).all() and np.isnan(rv).all()
