"""Streaming (non-temporal) output stores write the same bits as plain stores.

The kernels of both layouts stream their output when a call moves more bytes than
a share of the L3 (``_streams`` in fastbn/_cpu.pyx); the tests force both ways
with ``_cpu.set_streaming`` on small inputs (and check that the switch is obeyed).
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
    """An empty array with x's shape and memory order, ``shift`` elements into a buffer."""
    order = np.argsort(x.strides, kind="stable")[::-1]     # axes, outermost first
    flat = np.empty(x.size + 1, x.dtype)[shift:shift + x.size]
    return flat.reshape([x.shape[i] for i in order]).transpose(np.argsort(order))


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


# channel-outer plane runs of 700 and 2053 values are above FASTBN_STREAM_MIN_RUN
# (512 bytes), 49 below; channel-inner rows are folded to about 1024 values (about 512
# in the grad_input pass), and (3001, 5) leaves a tail of rows after its folded body
@pytest.mark.parametrize("shape,layout", [((3, 4, 700), "contiguous"),
                                          ((2, 3, 2053), "contiguous"),
                                          ((5, 4, 49), "contiguous"),
                                          ((700, 64), "contiguous"), ((3001, 5), "contiguous"),
                                          ((4, 48, 9, 9), "channels_last")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [0, 1])
def test_streaming_stores_agree_bitwise(shape, layout, dtype, shift, forced_streaming):
    x = make(shape, dtype, offset=1e4, seed=41, layout=layout)
    gy = make(shape, dtype, seed=42, layout=layout)
    results = []
    for mode in (2, 1):
        forced_streaming(mode)
        # the switch is obeyed (else this test would compare plain stores with themselves)
        assert _cpu.would_stream(1, 8) == (mode == 1)
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
    # float64: the reference's own mean is off by ~2e-11 at offset 1e4 on (700, 64)
    # (NumPy sums axis 0 row by row), fastbn's by ~3e-12
    tol = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(y, ry, rtol=0, atol=tol * 10)
    assert np.isfinite(gx).all()


def test_automatic_streaming_limits():
    """Channel-outer calls stream above the L3, channel-inner ones above 7/8 of it, and
    channel-inner training/backward above 5/8 (see _streams)."""
    l3 = 32 << 20
    _cpu.set_l3_bytes(l3)
    try:
        _cpu.set_streaming(0)
        for eighths in (8, 7, 5):
            assert not _cpu.would_stream(eighths * l3 // 8, eighths)
            assert _cpu.would_stream(eighths * l3 // 8 + 1, eighths)
    finally:
        _cpu.set_l3_bytes(_cpu_backend._l3_bytes())


def test_set_streaming_rejects_unknown_modes():
    with pytest.raises(ValueError, match="streaming mode must be 0, 1 or 2, got 3"):
        _cpu.set_streaming(3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_outputs_start_on_a_cache_line(layout):
    """Fresh outputs of 1 MiB or more are 64-byte aligned, so that every line can stream."""
    from fastbn import _memory

    x = make((4, 3, 128, 256), np.float32, seed=43, layout=layout)
    assert x.nbytes >= _memory.BLOCK_FROM_BYTES
    y, _, _ = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    gx = fastbn.batch_norm_backward(x, x, None, None, None, np.zeros(3, np.float32),
                                    np.ones(3, np.float32), True, 1e-5)[0]
    for a in (y, gx):
        assert a.ctypes.data % 64 == 0
        assert a.strides == x.strides
