"""Streaming (non-temporal) output stores write the same bits as plain stores.

The channel-outer kernels stream their output when a call moves more bytes than
the L3 holds (``_streams`` in fastbn/_cpu.pyx); the tests force both ways with
``_cpu.set_streaming`` on small inputs.
"""
import numpy as np
import pytest

import fastbn
import reference as ref
from fastbn import _cpu, _cpu_backend, _threads
from helpers import make


@pytest.fixture
def forced_streaming(monkeypatch):
    """Yield a setter for the store mode; restore automatic mode and the schedule after."""
    monkeypatch.setattr(_threads, "MIN_VALUES_PER_THREAD", 1)
    yield _cpu.set_streaming
    _cpu.set_streaming(0)
    _cpu.set_schedule(0)


def _misaligned_like(x, shift):
    """An empty C-contiguous array shaped like x starting ``shift`` elements into a buffer."""
    return np.empty(x.size + 1, x.dtype)[shift:shift + x.size].reshape(x.shape)


def _outputs(x, gy, shift):
    c = x.shape[1]
    w = np.linspace(0.5, 1.5, c).astype(x.dtype)
    b = np.linspace(-1, 1, c).astype(x.dtype)
    rm, rv = np.zeros(c, x.dtype), np.ones(c, x.dtype)
    y, sm, si = fastbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5,
                                          out=_misaligned_like(x, shift))
    gx = fastbn.batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5,
                                    out=_misaligned_like(x, shift))[0]
    ye = fastbn.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5,
                                   out=_misaligned_like(x, shift))[0]
    mean, m2, count = _cpu_backend.moments(x)
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    yn = _cpu_backend.normalize(x, mean, invstd, w, b)
    sums = _cpu_backend.grad_sums(gy, x, mean)
    gxn = _cpu_backend.grad_input(gy, x, w, mean, invstd, sums[0], sums[1], count)
    return [y, gx, ye, yn, gxn]


# plane runs of 700 and 2053 values are above FASTBN_STREAM_MIN_RUN (2 KiB), 49 below
@pytest.mark.parametrize("shape", [(3, 4, 700), (2, 3, 2053), (5, 4, 49)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [0, 1])
def test_streaming_stores_agree_bitwise(shape, dtype, shift, forced_streaming):
    x = make(shape, dtype, offset=1e4, seed=41)
    gy = make(shape, dtype, seed=42)
    results = []
    for mode in (2, 1):
        forced_streaming(mode)
        for schedule in (1, 2):
            _cpu.set_schedule(schedule)
            for n in (1, 2):
                fastbn.set_num_threads(n)
                results.append(_outputs(x, gy, shift))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    y, gx = results[-1][:2]
    c = shape[1]
    w = np.linspace(0.5, 1.5, c).astype(dtype)
    b = np.linspace(-1, 1, c).astype(dtype)
    ry, _, _ = ref.forward_train(x, w, b, 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ry, rtol=0, atol=tol * 10)
    assert np.isfinite(gx).all()


def test_set_streaming_rejects_unknown_modes():
    with pytest.raises(ValueError, match="streaming mode must be 0, 1 or 2, got 3"):
        _cpu.set_streaming(3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_outputs_start_on_a_cache_line(layout):
    """Fresh outputs of 1 MiB or more are 64-byte aligned, so that every line can stream."""
    from fastbn import _layout

    x = make((4, 3, 128, 256), np.float32, seed=43, layout=layout)
    assert x.nbytes >= _layout.ALIGN_FROM_BYTES
    y, _, _ = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    gx = fastbn.batch_norm_backward(x, x, None, None, None, np.zeros(3, np.float32),
                                    np.ones(3, np.float32), True, 1e-5)[0]
    for a in (y, gx):
        assert a.ctypes.data % 64 == 0
        assert a.strides == x.strides
