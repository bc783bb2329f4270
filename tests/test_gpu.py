"""CUDA backend (CuPy arrays) against a float64 NumPy reference, fastbn's CPU
backend and, when it has CUDA, PyTorch.

The whole module is skipped when CuPy is missing or no CUDA device is usable,
unless FASTBN_REQUIRE_GPU=1 (set by benchmarks/gpu_check.sh), which turns the
skip into an error so that a broken GPU machine cannot pass silently.
"""
import os

import numpy as np
import pytest


def _no_gpu(reason):
    if os.environ.get("FASTBN_REQUIRE_GPU") == "1":
        raise RuntimeError(f"FASTBN_REQUIRE_GPU=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)


try:
    import cupy
except ImportError as exc:
    _no_gpu(f"CuPy is not importable ({exc})")


def _device_count():
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device, broken install: all mean "no GPU here"
        return exc


_count = _device_count()
if not isinstance(_count, int) or _count < 1:
    _no_gpu(f"no usable CUDA device ({_count})")

import fastbn                      # noqa: E402
import reference as ref            # noqa: E402
from fastbn import _gpu            # noqa: E402
from helpers import is_channels_last, make, params, tol   # noqa: E402

try:
    import torch

    TORCH_CUDA = torch.cuda.is_available()
except ImportError:  # torch is optional here: the float64 reference is always checked
    torch = None
    TORCH_CUDA = False

needs_torch_cuda = pytest.mark.skipif(not TORCH_CUDA, reason="PyTorch with CUDA not available")

DTYPES = [np.float32, np.float64]
EPS = 1e-5


# -- helpers -----------------------------------------------------------------------
def on_gpu(values, layout="contiguous"):
    """CuPy copy of NumPy ``values`` laid out in device memory as ``layout``.

    Layouts are those of ``helpers.relayout`` plus "unaligned": C order starting
    one element past a 16-byte boundary (so no vectorised loads are possible).
    """
    v = cupy.asarray(np.ascontiguousarray(values))
    if layout == "contiguous":
        return v
    if layout == "channels_last":
        axes = (0,) + tuple(range(2, v.ndim)) + (1,)
        back = tuple(int(a) for a in np.argsort(axes))
        return cupy.ascontiguousarray(v.transpose(axes)).transpose(back)
    if layout == "strided":
        big = cupy.zeros(v.shape[:-1] + (2 * v.shape[-1],), v.dtype)
        big[..., ::2] = v
        return big[..., ::2]
    if layout == "transposed":
        return cupy.asfortranarray(v)
    if layout == "unaligned":
        buf = cupy.empty(v.size + 1, v.dtype)
        out = buf[1:].reshape(v.shape)
        out[...] = v
        return out
    raise ValueError(layout)


def host(a):
    return None if a is None else cupy.asnumpy(a)


def close(got, want, dtype, scale=1.0):
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(host(got), want, rtol=rtol, atol=atol * scale)


def run_fastbn(x, gy, w, b, rm, rv, training, momentum=0.1, eps=EPS):
    """Forward + backward through the functional API; everything back on the host."""
    g = lambda a: None if a is None else cupy.asarray(a)   # noqa: E731
    wg, bg, rmg, rvg = g(w), g(b), g(rm), g(rv)
    y, sm, si = fastbn.batch_norm_forward(x, wg, bg, rmg, rvg, training, momentum, eps)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, wg, None if training else rmg,
                                            None if training else rvg, sm, si, training, eps)
    out = {"y": y, "gx": gx}
    for key, a in (("sm", sm), ("si", si), ("rm", rmg), ("rv", rvg), ("gw", gw), ("gb", gb)):
        out[key] = host(a)
    return out


def torch_cuda(x, gy, w, b, rm, rv, training, momentum, eps, channels_last):
    """PyTorch CUDA forward + backward with the same memory format."""
    def t(a, grad=False):
        if a is None:
            return None
        return torch.tensor(a, device="cuda", requires_grad=grad)

    xt = torch.tensor(x, device="cuda")
    gyt = torch.tensor(gy, device="cuda")
    if channels_last and x.ndim in (4, 5):
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        xt, gyt = xt.contiguous(memory_format=fmt), gyt.contiguous(memory_format=fmt)
    xt.requires_grad_(True)
    wt, bt, rmt, rvt = t(w, True), t(b, True), t(rm), t(rv)
    y = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training, momentum, eps)
    y.backward(gyt)
    n = lambda a: None if a is None else a.detach().cpu().numpy()   # noqa: E731
    return {"y": n(y), "gx": n(xt.grad), "gw": None if wt is None else n(wt.grad),
            "gb": None if bt is None else n(bt.grad), "rm": n(rmt), "rv": n(rvt)}


# -- parity --------------------------------------------------------------------------
SHAPES = [(16, 5), (64, 12), (7, 3, 11), (4, 6, 5, 7), (4, 8, 6, 4), (2, 3, 4, 5, 6),
          (3, 4, 1, 1), (5, 2, 1), (2, 16, 4, 4)]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_backward_parity(layout, shape, dtype, training, affine):
    if layout in ("channels_last", "transposed") and len(shape) == 2:
        pytest.skip("(N, C) has one channel-inner layout")
    c = shape[1]
    xh = make(shape, dtype, offset=0.5, scale=2.0, seed=3)
    gyh = make(shape, dtype, seed=4)
    w, b, rm, rv = params(c, dtype)
    if not affine:
        w = b = None
    x, gy = on_gpu(xh, layout), on_gpu(gyh, layout)
    got = run_fastbn(x, gy, w, b, rm, rv, training)

    # float64 reference
    count = xh.size // c
    if training:
        ry, mean, var = ref.forward_train(xh, w, b, EPS)
        rgx, rgw, rgb = ref.backward(gyh, xh, w, mean, var, EPS, True)
        close(got["sm"], mean, dtype)
        close(got["si"], 1 / np.sqrt(var + EPS), dtype)
        close(got["rm"], ref.running_update(rm, mean, 0.1), dtype)
        close(got["rv"], ref.running_update(rv, var * count / (count - 1), 0.1), dtype)
    else:
        ry = ref.forward(xh, w, b, rm.astype(np.float64), rv.astype(np.float64), EPS)
        rgx, rgw, rgb = ref.backward(gyh, xh, w, rm.astype(np.float64), rv.astype(np.float64),
                                     EPS, False)
        assert got["sm"].shape == (0,) and got["si"].shape == (0,)
        np.testing.assert_array_equal(got["rm"], rm)
        np.testing.assert_array_equal(got["rv"], rv)
    close(got["y"], ry, dtype)
    close(got["gx"], rgx, dtype)
    # the parameter gradients come without a weight too (native_batch_norm_backward's)
    close(got["gw"], rgw, dtype, scale=10 * np.sqrt(count))
    close(got["gb"], rgb, dtype, scale=10 * np.sqrt(count))

    # output type and memory layout
    for key in ("y", "gx"):
        a = got[key]
        assert isinstance(a, cupy.ndarray) and a.dtype == dtype and a.shape == shape
        if layout == "channels_last" and len(shape) > 2 and np.prod(shape[2:]) > 1:
            assert is_channels_last(a)
        else:
            assert a.flags.c_contiguous

    # fastbn's CPU backend on the same values
    cpu_rm, cpu_rv = rm.copy(), rv.copy()
    y_c, sm_c, si_c = fastbn.batch_norm_forward(xh, w, b, cpu_rm, cpu_rv, training, 0.1, EPS)
    close(got["y"], y_c, dtype)
    close(got["rm"], cpu_rm, dtype)
    close(got["rv"], cpu_rv, dtype)

    if TORCH_CUDA:
        theirs = torch_cuda(xh, gyh, w, b, rm.copy(), rv.copy(), training, 0.1, EPS,
                            layout == "channels_last")
        for key in ("y", "gx", "rm", "rv"):
            close(got[key], theirs[key], dtype)
        if affine:
            close(got["gw"], theirs["gw"], dtype, scale=10 * np.sqrt(count))
            close(got["gb"], theirs["gb"], dtype, scale=10 * np.sqrt(count))


def test_mixed_layouts_in_backward():
    """grad_output in another layout than x is converted, not misread."""
    shape = (4, 3, 6, 5)
    xh, gyh = make(shape, np.float64, seed=8), make(shape, np.float64, seed=9)
    x = on_gpu(xh, "channels_last")
    _, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, EPS)
    for gy_layout in ("contiguous", "strided"):
        gx, _, _ = fastbn.batch_norm_backward(on_gpu(gyh, gy_layout), x, None, None, None,
                                              sm, si, True, EPS)
        rgx, _, _ = ref.backward(gyh, xh, None, *ref.moments(xh), EPS, True)
        close(gx, rgx, np.float64)
        assert is_channels_last(gx)


# -- splits across many blocks, awkward vector widths ---------------------------------------
MANY_BLOCKS = [
    ((2, 1, 512, 256), "contiguous"),      # one channel split over 32 blocks
    ((1, 2, 300000), "contiguous"),        # > 32 blocks per channel: lanes merge several each
    ((2, 1, 4500000), "contiguous"),       # capped at MAX_SPLIT blocks per channel
    ((16384, 3), "contiguous"),            # inner, 64 row blocks, C not a multiple of 4
    ((20000, 40), "contiguous"),           # inner, several column blocks
    ((64, 130, 7, 7), "channels_last"),    # inner, C = 130: float has no 16-byte vectors
    ((256, 64, 7, 7), "contiguous"),       # S = 49: planes shorter than a block
    ((3, 2048, 2, 2), "contiguous"),       # S = 4: one float vector per plane
]


@pytest.mark.parametrize("shape,layout", MANY_BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_block_splits_match_reference(shape, layout, dtype):
    c = shape[1]
    xh = make(shape, dtype, offset=5.0, scale=2.0, seed=31)
    gyh = make(shape, dtype, seed=32)
    w, b, rm, rv = params(c, dtype, seed=33)
    got = run_fastbn(on_gpu(xh, layout), on_gpu(gyh, layout), w, b, rm, rv, True)
    ry, mean, var = ref.forward_train(xh, w, b, EPS)
    rgx, rgw, rgb = ref.backward(gyh, xh, w, mean, var, EPS, True)
    count = xh.size // c
    close(got["y"], ry, dtype)
    close(got["sm"], mean, dtype)
    close(got["si"], 1 / np.sqrt(var + EPS), dtype)
    close(got["rv"], ref.running_update(rv, var * count / (count - 1), 0.1), dtype)
    close(got["gx"], rgx, dtype)
    close(got["gw"], rgw, dtype, scale=10 * np.sqrt(count))
    close(got["gb"], rgb, dtype, scale=10 * np.sqrt(count))


# -- accuracy at large offsets ------------------------------------------------------------
def _relative_error(a, b, std):
    """Max error relative to each channel's standard deviation."""
    diff = np.abs(np.asarray(host(a), np.float64) - b)
    axes = (0,) + tuple(range(2, diff.ndim))
    return float((diff.max(axis=axes) / std).max())


OFFSET_CASES = [((64, 16, 8, 8), "contiguous"), ((64, 16, 8, 8), "channels_last"),
                ((4096, 8), "contiguous"), ((16, 8, 300), "contiguous"),
                ((4, 8, 3, 5, 7), "channels_last")]


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,layout", OFFSET_CASES)
def test_float32_large_offset_matches_float64_reference(offset, shape, layout):
    xh = make(shape, np.float32, offset=offset, seed=21)
    gyh = make(shape, np.float32, seed=22)
    x, gy = on_gpu(xh, layout), on_gpu(gyh, layout)
    rm, rv = cupy.zeros(shape[1], cupy.float32), cupy.ones(shape[1], cupy.float32)
    y, sm, si = fastbn.batch_norm_forward(x, None, None, rm, rv, True, 1.0, EPS)
    ry, mean, var = ref.forward_train(xh, None, None, EPS)
    assert _relative_error(y, ry, 1.0) < 2e-6        # y is in units of the std already
    np.testing.assert_allclose(host(sm), mean, rtol=1e-7)
    np.testing.assert_allclose(host(si), 1 / np.sqrt(var + EPS), rtol=1e-6)
    count = xh.size // shape[1]
    np.testing.assert_allclose(host(rm), mean, rtol=1e-7)
    np.testing.assert_allclose(host(rv), var * count / (count - 1), rtol=1e-5)
    w = cupy.ones(shape[1], cupy.float32)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, EPS)
    rgx, rgw, rgb = ref.backward(gyh, xh, None, mean, var, EPS, True)
    axes = (0,) + tuple(range(2, xh.ndim))
    assert _relative_error(gx, rgx, np.abs(rgx).max(axis=axes)) < 1e-5
    assert np.abs(host(gw) - rgw).max() < 1e-5 * np.sqrt(count)
    assert np.abs(host(gb) - rgb).max() < 1e-5 * np.sqrt(count)


@pytest.mark.parametrize("shape,layout", OFFSET_CASES[:3])
def test_float64_large_offset(shape, layout):
    xh = make(shape, np.float64, offset=1e6, seed=26)
    y, _, _ = fastbn.batch_norm_forward(on_gpu(xh, layout), None, None, None, None, True,
                                        0.1, EPS)
    ry, _, _ = ref.forward_train(xh, None, None, EPS)
    # the reference's own float64 mean is off by ~1e-10 at this offset
    assert _relative_error(y, ry, 1.0) < 1e-8


def test_eval_at_large_offset():
    xh = make((64, 8), np.float32, offset=1e6, seed=24)
    rm = np.float32(1e6) + np.zeros(8, np.float32)
    rv = np.ones(8, np.float32)
    y = fastbn.batch_norm(cupy.asarray(xh), cupy.asarray(rm), cupy.asarray(rv))
    ry = ref.forward(xh, None, None, rm.astype(np.float64), rv.astype(np.float64), EPS)
    assert _relative_error(y, ry, 1.0) < 2e-6


# -- determinism --------------------------------------------------------------------------
def _all_outputs(x, gy, training=True):
    c = x.shape[1]
    w = cupy.linspace(0.5, 1.5, c).astype(x.dtype)
    b = cupy.linspace(-1, 1, c).astype(x.dtype)
    rm, rv = cupy.zeros(c, x.dtype), cupy.ones(c, x.dtype)
    y, sm, si = fastbn.batch_norm_forward(x, w, b, rm, rv, training, 0.1, EPS)
    gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, rm, rv, sm, si, training, EPS)
    return [host(a) for a in (y, sm, si, rm, rv, gx, gw, gb)]


def _assert_bitwise(first, second):
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), "results differ bit for bit"


@pytest.mark.parametrize("shape,layout", [((8, 4, 33, 64), "contiguous"),
                                          ((4, 4, 32, 32), "channels_last"),
                                          ((20000, 6), "contiguous"),
                                          ((1, 2, 300000), "contiguous")])
def test_bitwise_deterministic_run_to_run(shape, layout):
    x = on_gpu(make(shape, np.float32, offset=3.0, seed=4), layout)
    gy = on_gpu(make(shape, np.float32, seed=5), layout)
    first = _all_outputs(x, gy)
    for _ in range(3):
        _assert_bitwise(first, _all_outputs(x, gy))


@pytest.mark.parametrize("shape", [(4, 8, 16, 16), (512, 8), (3, 5, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_alignment_does_not_change_results(shape, dtype):
    """The block split depends on the shape only: 16-byte and scalar loads agree bit for bit."""
    xh, gyh = make(shape, dtype, offset=2.0, seed=6), make(shape, dtype, seed=7)
    x_un = on_gpu(xh, "unaligned")
    assert x_un.data.ptr % 16 != 0
    _assert_bitwise(_all_outputs(on_gpu(xh), on_gpu(gyh)),
                    _all_outputs(x_un, on_gpu(gyh, "unaligned")))


# -- calls, launches, strided buffers ------------------------------------------------------
def _record_launches(monkeypatch):
    """List, filled as kernels are looked up for a launch, of their name expressions."""
    names = []
    real = _gpu._function

    def spy(name):
        names.append(name)
        return real(name)

    monkeypatch.setattr(_gpu, "_function", spy)
    return names


def test_launches_per_call(monkeypatch):
    names = _record_launches(monkeypatch)
    x = on_gpu(make((4, 3, 5, 5), np.float32, seed=1))
    w = cupy.ones(3, cupy.float32)
    rm, rv = cupy.zeros(3, cupy.float32), cupy.ones(3, cupy.float32)

    def count(fn):
        names.clear()
        fn()
        return len(names)

    assert count(lambda: fastbn.batch_norm_forward(x, w, w, rm, rv, True, 0.1, EPS)) == 3
    assert count(lambda: fastbn.batch_norm_forward(x, w, w, rm, rv, False, 0.1, EPS)) == 2
    _, sm, si = fastbn.batch_norm_forward(x, w, w, rm, rv, True, 0.1, EPS)
    assert count(lambda: fastbn.batch_norm_backward(x, x, w, None, None, sm, si, True,
                                                    EPS)) == 3
    # eval: the reduction only for the parameter gradients; without them dy * k alone
    assert count(lambda: fastbn.batch_norm_backward(x, x, None, rm, rv, None, None, False,
                                                    EPS)) == 3
    assert count(lambda: fastbn.batch_norm_backward(x, x, w, rm, rv, None, None, False,
                                                    EPS, param_grads=False)) == 2
    assert cupy.cuda.runtime.getDevice() in _gpu._modules


def test_strided_running_stats_are_updated_in_place():
    xh = make((8, 3, 4), np.float32, offset=1.0, seed=2)
    mean_store = cupy.full(6, 7.0, cupy.float32)
    var_store = cupy.full(6, 7.0, cupy.float32)
    rm, rv = mean_store[::2], var_store[1::2]
    rm[...] = 0
    rv[...] = 1
    fastbn.batch_norm(cupy.asarray(xh), rm, rv, training=True, momentum=0.3)
    mean, var = ref.moments(xh)
    n = xh.size // 3
    np.testing.assert_allclose(host(rm), 0.3 * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(host(rv), 0.7 + 0.3 * var * n / (n - 1), rtol=1e-6)
    np.testing.assert_array_equal(host(mean_store[1::2]), 7.0)
    np.testing.assert_array_equal(host(var_store[::2]), 7.0)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.25])
def test_momentum_extremes(momentum):
    xh = make((10, 4), np.float64, seed=11)
    rm, rv = cupy.full(4, 5.0), cupy.full(4, 3.0)
    fastbn.batch_norm(cupy.asarray(xh), rm, rv, training=True, momentum=momentum)
    mean, var = ref.moments(xh)
    np.testing.assert_allclose(host(rm), ref.running_update(np.full(4, 5.0), mean, momentum))
    np.testing.assert_allclose(host(rv), ref.running_update(np.full(4, 3.0), var * 10 / 9,
                                                            momentum))


def test_empty_batch():
    x = cupy.zeros((0, 3, 4, 4), cupy.float32)
    rm = cupy.arange(3, dtype=cupy.float32)
    y, sm, si = fastbn.batch_norm_forward(x, None, None, rm, cupy.ones(3, cupy.float32), True,
                                          0.1, EPS)
    assert isinstance(y, cupy.ndarray) and y.shape == x.shape and sm.shape == (0,)
    np.testing.assert_array_equal(host(rm), np.arange(3))


def test_nan_propagates_to_its_channel_only():
    xh = make((4, 3, 5), np.float64, seed=12)
    xh[1, 1, 2] = np.nan
    y = host(fastbn.batch_norm(cupy.asarray(xh), None, None, training=True))
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


# -- modules -----------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_on_cuda_matches_cpu_module(momentum, dtype):
    shape = (6, 4, 5, 7)
    cpu = fastbn.BatchNorm2d(4, momentum=momentum, dtype=dtype)
    gpu = fastbn.BatchNorm2d(4, momentum=momentum, dtype=dtype).to("cuda")
    assert gpu.device == "cuda"
    assert all(isinstance(a, cupy.ndarray) for a in gpu.state_dict().values())
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.5, 4).astype(dtype)
    cpu.weight[...] = w
    gpu.weight[...] = cupy.asarray(w)
    for step in range(3):
        for training in (True, True, False):
            cpu.train(training)
            gpu.train(training)
            xh = make(shape, dtype, offset=step - 1.0, scale=1.0 + step, seed=10 * step)
            gyh = make(shape, dtype, seed=10 * step + 1)
            close(gpu(cupy.asarray(xh)), cpu(xh), dtype)
            close(gpu.backward(cupy.asarray(gyh)), cpu.backward(gyh), dtype)
            close(gpu.grad_weight, cpu.grad_weight, dtype, scale=100)
            close(gpu.grad_bias, cpu.grad_bias, dtype, scale=100)
    for key, value in cpu.state_dict().items():
        mine = gpu.state_dict()[key]
        if key == "num_batches_tracked":
            assert int(mine) == int(value) == 6
        else:
            close(mine, value, dtype)


@needs_torch_cuda
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_torch_cuda_module(momentum):
    shape = (6, 4, 5, 7)
    theirs = torch.nn.BatchNorm2d(4, momentum=momentum).cuda()
    mine = fastbn.BatchNorm2d(4, momentum=momentum).to("cuda")
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    mine.load_state_dict({k: v.cpu().numpy() for k, v in theirs.state_dict().items()})
    for step in range(3):
        for training in (True, True, False):
            mine.train(training)
            theirs.train(training)
            xh = make(shape, np.float32, offset=step - 1.0, scale=1.0 + step, seed=step)
            gyh = make(shape, np.float32, seed=step + 7)
            xt = torch.tensor(xh, device="cuda", requires_grad=True)
            yt = theirs(xt)
            yt.backward(torch.tensor(gyh, device="cuda"))
            close(mine(cupy.asarray(xh)), yt.detach().cpu().numpy(), np.float32)
            close(mine.backward(cupy.asarray(gyh)), xt.grad.cpu().numpy(), np.float32)
    for key, value in theirs.state_dict().items():
        if key == "num_batches_tracked":
            assert int(mine.state_dict()[key]) == int(value)
        else:
            close(mine.state_dict()[key], value.cpu().numpy(), np.float32)


def test_state_dict_with_cupy_arrays():
    bn = fastbn.BatchNorm2d(3).to("cuda")
    bn(cupy.asarray(make((4, 3, 5, 5), np.float32, offset=2.0, seed=1)))
    sd = bn.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert all(isinstance(a, cupy.ndarray) for a in sd.values())
    assert int(sd["num_batches_tracked"]) == 1
    sd["running_mean"][...] = 42          # a copy, not the module's own array
    assert not bool((bn.running_mean == 42).any())
    # a CUDA state dict loads into a CPU module as NumPy values
    cpu = fastbn.BatchNorm2d(3)
    cpu.load_state_dict(bn.state_dict())
    assert isinstance(cpu.running_var, np.ndarray)
    np.testing.assert_array_equal(cpu.running_var, host(bn.running_var))


def test_numpy_state_dict_loads_into_cuda_module():
    cpu = fastbn.BatchNorm2d(3)
    cpu(make((4, 3, 5, 5), np.float32, offset=1.0, seed=2))
    gpu = fastbn.BatchNorm2d(3).to("cuda")
    own = gpu.running_mean
    result = gpu.load_state_dict(cpu.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert gpu.running_mean is own and isinstance(own, cupy.ndarray)
    for key, value in cpu.state_dict().items():
        np.testing.assert_array_equal(host(getattr(gpu, key)), value)
    back = gpu.to("cpu")
    assert isinstance(back.running_mean, np.ndarray)
    np.testing.assert_array_equal(back.running_mean, cpu.running_mean)


def test_mixing_numpy_and_cupy_is_a_type_error():
    xh = make((4, 3, 5), np.float32, seed=3)
    x = cupy.asarray(xh)
    w_np, w_cp = np.ones(3, np.float32), cupy.ones(3, cupy.float32)
    with pytest.raises(TypeError, match="cannot be mixed"):
        fastbn.batch_norm_forward(x, w_np, None, None, None, True, 0.1, EPS)
    with pytest.raises(TypeError, match="cannot be mixed"):
        fastbn.batch_norm_forward(xh, w_cp, None, None, None, True, 0.1, EPS)
    _, sm, si = fastbn.batch_norm_forward(x, w_cp, None, None, None, True, 0.1, EPS)
    with pytest.raises(TypeError, match="cannot be mixed"):
        fastbn.batch_norm_backward(xh, x, w_cp, None, None, sm, si, True, EPS)
    gpu_bn = fastbn.BatchNorm1d(3).to("cuda")
    with pytest.raises(TypeError, match=r"on device 'cuda' but the input is a numpy.ndarray"):
        gpu_bn(xh)
    with pytest.raises(TypeError, match=r"on device 'cpu' but the input is a cupy.ndarray"):
        fastbn.BatchNorm1d(3)(x)
    assert int(gpu_bn.num_batches_tracked) == 0


# -- step-by-step building blocks (SyncBatchNorm) ------------------------------------------
from fastbn import _cpu_backend as cpu_steps   # noqa: E402

STEP_CASES = [((6, 5, 7, 9), "contiguous"), ((6, 5, 7, 9), "channels_last"),
              ((300, 7), "contiguous"), ((64, 8), "contiguous"), ((4, 3, 50), "strided"),
              ((2, 3, 11, 5), "transposed"), ((4, 8, 6, 4), "unaligned"),
              ((1, 2, 300000), "contiguous"), ((20000, 40), "contiguous"),
              ((3, 4, 1, 1), "contiguous")]


def _d(a):
    return None if a is None else cupy.asarray(a)


@pytest.mark.parametrize("shape,layout", STEP_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_building_blocks_match_cpu(shape, layout, dtype):
    """moments / normalize / grad_sums / grad_input on the GPU agree with the CPU's."""
    c = shape[1]
    xh = make(shape, dtype, offset=1e5, seed=41)
    gyh = make(shape, dtype, seed=42)
    w = np.linspace(0.5, 2, c).astype(dtype)
    b = np.linspace(-1, 1, c).astype(dtype)
    x, gy = on_gpu(xh, layout), on_gpu(gyh, layout)

    mean, m2, count = _gpu.moments(x)
    cmean, cm2, ccount = cpu_steps.moments(xh)
    assert count == ccount == xh.size // c and isinstance(count, int)
    for a in (mean, m2):
        assert isinstance(a, cupy.ndarray) and a.dtype == np.float64 and a.shape == (c,)
    np.testing.assert_allclose(host(mean), cmean, rtol=1e-13)
    np.testing.assert_allclose(host(m2), cm2, rtol=1e-9)

    # the per-channel values as SyncBatchNorm passes them: float64 device arrays
    invstd = 1.0 / np.sqrt(cm2 / count + EPS)
    for wt, bt in ((w, b), (None, None), (w, None)):
        y = _gpu.normalize(x, _d(cmean), _d(invstd), _d(wt), _d(bt))
        assert isinstance(y, cupy.ndarray) and y.dtype == dtype and y.shape == shape
        close(y, cpu_steps.normalize(xh, cmean, invstd, wt, bt), dtype)
        if layout == "channels_last":
            assert is_channels_last(y)

    sums = _gpu.grad_sums(gy, x, _d(cmean))
    csums = cpu_steps.grad_sums(gyh, xh, cmean)
    for got, want in zip(sums, csums):
        assert isinstance(got, cupy.ndarray) and got.dtype == np.float64 and got.shape == (c,)
        np.testing.assert_allclose(host(got), want, rtol=1e-9, atol=1e-9 * count)

    # sums and count of a larger (synchronized) batch: here 3 x this shard
    total = 3 * count
    sdy, sdyx = 3 * csums[0], 3 * csums[1]
    for wt in (w, None):
        gx = _gpu.grad_input(gy, x, _d(wt), _d(cmean), _d(invstd), _d(sdy), _d(sdyx), total)
        want = cpu_steps.grad_input(gyh, xh, wt, cmean, invstd, sdy, sdyx, total)
        assert isinstance(gx, cupy.ndarray) and gx.dtype == dtype and gx.shape == shape
        rtol, atol = tol(dtype)
        np.testing.assert_allclose(host(gx), want, rtol=rtol, atol=atol * np.abs(want).max())
        if layout == "channels_last":
            assert is_channels_last(gx)


def test_building_blocks_equal_fused_gpu_calls():
    """Steps with this shard's own statistics give the fused training forward/backward."""
    shape = (8, 6, 5, 5)
    for dtype in DTYPES:
        xh, gyh = make(shape, dtype, offset=3.0, seed=51), make(shape, dtype, seed=52)
        x, gy = cupy.asarray(xh), cupy.asarray(gyh)
        w, b = cupy.linspace(0.5, 2, 6).astype(dtype), cupy.linspace(-1, 1, 6).astype(dtype)
        y, sm, si = fastbn.batch_norm_forward(x, w, b, None, None, True, 0.1, EPS)
        gx, gw, gb = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, EPS)
        mean, m2, count = _gpu.moments(x)
        invstd = 1.0 / cupy.sqrt(m2 / count + EPS)
        close(_gpu.normalize(x, mean, invstd, w, b), host(y), dtype)
        close(mean, host(sm).astype(np.float64), dtype)
        sdy, sdyx, sx = _gpu.grad_sums(gy, x, mean)
        close(sdy, host(gb).astype(np.float64), dtype, scale=10 * np.sqrt(count))
        close(sdyx * invstd, host(gw).astype(np.float64), dtype, scale=10 * np.sqrt(count))
        assert float(cupy.abs(sx).max()) < 1e-6 * count
        close(_gpu.grad_input(gy, x, w, mean, invstd, sdy, sdyx, count), host(gx), dtype)


def test_grad_sums_uses_the_float64_center_exactly():
    """A float32 input with a float64 center: sums around that center, not a rounded one."""
    xh = make((64, 4, 32), np.float32, offset=1e6, seed=53)
    gyh = make((64, 4, 32), np.float32, seed=54)
    center = np.array([1e6 + 0.3, 1e6 - 0.27, 1e6 + 0.011, 1e6])    # not float32 values
    sdy, sdyx, sx = _gpu.grad_sums(cupy.asarray(gyh), cupy.asarray(xh), cupy.asarray(center))
    d = xh.astype(np.float64) - center[None, :, None]
    g = gyh.astype(np.float64)
    np.testing.assert_allclose(host(sx), d.sum(axis=(0, 2)), rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(host(sdyx), (g * d).sum(axis=(0, 2)), rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(host(sdy), g.sum(axis=(0, 2)), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("shape", [(4, 8, 16, 16), (512, 8), (3, 5, 64)])
def test_building_blocks_do_not_depend_on_alignment(shape):
    xh, gyh = make(shape, np.float32, offset=2.0, seed=55), make(shape, np.float32, seed=56)
    a, u = on_gpu(xh), on_gpu(xh, "unaligned")
    ga, gu = on_gpu(gyh), on_gpu(gyh, "unaligned")
    assert u.data.ptr % 16 != 0
    ma, m2a, _ = _gpu.moments(a)
    mu, m2u, _ = _gpu.moments(u)
    _assert_bitwise([host(ma), host(m2a)], [host(mu), host(m2u)])
    _assert_bitwise([host(s) for s in _gpu.grad_sums(ga, a, ma)],
                    [host(s) for s in _gpu.grad_sums(gu, u, ma)])
    _assert_bitwise([host(s) for s in _gpu.grad_sums(ga, a, ma)],
                    [host(s) for s in _gpu.grad_sums(ga, a, ma)])


def test_building_blocks_on_empty_input(monkeypatch):
    launched = _record_launches(monkeypatch)
    x = cupy.zeros((0, 3, 4), cupy.float32)
    mean, m2, count = _gpu.moments(x)
    assert count == 0 and mean.shape == (3,) and m2.shape == (3,)
    assert not bool(mean.any()) and not bool(m2.any()) and mean.dtype == np.float64
    y = _gpu.normalize(x, mean, mean, None, None)
    assert isinstance(y, cupy.ndarray) and y.shape == x.shape and y.dtype == x.dtype
    s = _gpu.grad_sums(x, x, mean)
    assert all(v.shape == (3,) and v.dtype == np.float64 and not bool(v.any()) for v in s)
    gx = _gpu.grad_input(x, x, None, mean, mean, s[0], s[1], 5)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert launched == []


def test_building_blocks_launch_two_kernels_each(monkeypatch):
    names = _record_launches(monkeypatch)
    for shape, layout in (((4, 3, 5, 5), "contiguous"), ((4, 3, 5, 5), "channels_last")):
        x = on_gpu(make(shape, np.float32, seed=1), layout)
        w = cupy.ones(3, cupy.float32)

        def count(fn):
            names.clear()
            out = fn()
            return len(names), out

        n, (mean, m2, cnt) = count(lambda: _gpu.moments(x))
        assert n == 2 and names[-1] == "fastbn::finalize_partials"
        invstd = 1.0 / cupy.sqrt(m2 / cnt + EPS)
        assert count(lambda: _gpu.normalize(x, mean, invstd, w, w))[0] == 2
        n, (sdy, sdyx, _) = count(lambda: _gpu.grad_sums(x, x, mean))
        assert n == 2 and names[0].endswith(", double>")
        assert count(lambda: _gpu.grad_input(x, x, w, mean, invstd, sdy, sdyx, cnt))[0] == 2


def _thread_ranks(size, body):
    """Run ``body(comm)`` on ``size`` threads sharing one device; raise what a rank raised."""
    from ranks import run_ranks

    results = run_ranks(size, body, timeout=60, join=120)
    for res in results:
        if isinstance(res, BaseException):
            raise res
    return results


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sync_batchnorm_on_cuda_matches_full_batch(layout, dtype):
    """SyncBatchNorm on CuPy shards (3 simulated ranks, one empty) = BatchNorm on the batch."""
    counts = [2, 0, 3]
    shape = (sum(counts), 4, 3, 5)
    starts = np.cumsum([0] + counts)
    xh = make(shape, dtype, offset=5.0, scale=2.0, seed=61)
    gyh = make(shape, dtype, seed=62)
    ref_bn = fastbn.BatchNorm2d(4, dtype=dtype)
    ref_bn.weight[...] = np.linspace(0.5, 2.0, 4)
    y_ref, gx_ref = ref_bn(xh), ref_bn.backward(gyh)

    def body(comm):
        bn = fastbn.BatchNorm2d(4, dtype=dtype)
        bn.weight[...] = np.linspace(0.5, 2.0, 4)
        bn = fastbn.SyncBatchNorm.from_batchnorm(bn.to("cuda"), comm)
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        y = bn(on_gpu(xh[lo:hi], layout))
        gx = bn.backward(on_gpu(gyh[lo:hi], layout))
        fastbn.allreduce_gradients(bn)
        return y, gx, host(bn.grad_weight), host(bn.grad_bias), host(bn.running_mean), \
            host(bn.running_var)

    for r, (y, gx, gw, gb, rm, rv) in enumerate(_thread_ranks(3, body)):
        lo, hi = starts[r], starts[r + 1]
        assert isinstance(y, cupy.ndarray) and isinstance(gx, cupy.ndarray)
        assert y.shape == gx.shape == (hi - lo,) + shape[1:]
        close(y, y_ref[lo:hi], dtype)
        close(gx, gx_ref[lo:hi], dtype)
        close(gw, ref_bn.grad_weight, dtype, scale=100)
        close(gb, ref_bn.grad_bias, dtype, scale=100)
        close(rm, ref_bn.running_mean, dtype)
        close(rv, ref_bn.running_var, dtype)


def test_nccl_single_rank_communicator():
    """A one-rank NcclCommunicator: the adapter's collectives, and plain BatchNorm behaviour."""
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        pytest.skip(f"cupy.cuda.nccl is not importable ({exc})")
    if not getattr(nccl, "available", False):
        pytest.skip("CuPy was built without NCCL")
    from fastbn._comm import as_communicator

    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    adapter = as_communicator(comm)
    assert (adapter.rank, adapter.size) == (0, 1)
    send = np.arange(7, dtype=np.float64) - 2.5
    np.testing.assert_array_equal(adapter.allgather(send), send[None])
    np.testing.assert_array_equal(adapter.allreduce(send), send)
    xh = make((4, 3, 5), np.float32, offset=1.0, seed=63)
    bn = fastbn.SyncBatchNorm(3, comm=comm, device="cuda")
    plain = fastbn.BatchNorm1d(3).to("cuda")
    x = cupy.asarray(xh)
    np.testing.assert_array_equal(host(bn(x)), host(plain(x)))
    np.testing.assert_array_equal(host(bn.backward(x)), host(plain.backward(x)))


@pytest.mark.parametrize("training", [True, False])
def test_param_grads_false_skips_parameter_gradients_gpu(training):
    """grad_input is the same with and without the parameter gradients (eval: no reduction)."""
    for dtype in DTYPES:
        x = cupy.asarray(make((4, 6, 5, 7), dtype, offset=1.0, seed=61))
        gy = cupy.asarray(make((4, 6, 5, 7), dtype, seed=62))
        w, b, rm, rv = (cupy.asarray(a) for a in params(6, dtype))
        _, sm, si = fastbn.batch_norm_forward(x, w, b, None, None, True, 0.1, EPS)
        for weight in (w, None):
            args = (gy, x, weight, rm, rv, sm, si, training, EPS)
            gx, gw, gb = fastbn.batch_norm_backward(*args, param_grads=False)
            assert gw is None and gb is None
            want, want_gw, _ = fastbn.batch_norm_backward(*args)
            assert want_gw is not None
            close(host(gx), host(want), dtype)


def test_nan_in_a_small_channel_reaches_the_statistics_gpu():
    """A channel that fits one reduction block keeps a NaN in its M2 (CPU twin in
    test_functional.py): save_invstd and running_var are NaN, not 1/sqrt(eps)."""
    for xh in (np.array([[[1.0, 2.0, np.nan, 4.0]]], np.float32),
               np.array([[1.0], [np.nan], [3.0]], np.float32)):
        c = xh.shape[1]
        rm, rv = cupy.zeros(c, cupy.float32), cupy.ones(c, cupy.float32)
        _, sm, si = fastbn.batch_norm_forward(cupy.asarray(xh), None, None, rm, rv, True, 0.1,
                                              EPS)
        assert np.isnan(host(si)).all() and np.isnan(host(rv)).all()
