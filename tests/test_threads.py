"""Results are bit-identical for any thread count; thread settings behave."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from helpers import make

@pytest.fixture
def split_small_inputs(monkeypatch):
    """Let even the small test inputs use every thread they are given."""
    from fastbn import _threads

    monkeypatch.setattr(_threads, "MIN_VALUES_PER_THREAD", 1)


CASES = [((8, 5, 17, 19), "contiguous"), ((8, 5, 17, 19), "channels_last"),
         ((3000, 7), "contiguous"), ((2, 3, 5000), "contiguous"), ((1, 2, 40000), "contiguous"),
         # rows of >= 2 KiB take the kernels' wide-row sweeps (fastbn/_kernels.h)
         ((203, 600), "contiguous"),
         # small C folded into rows of ~1024 values: 8 blocks and a tail of 112 rows
         ((20000, 6), "contiguous")]


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
def test_n_threads_agnosticism(shape, layout, dtype, offset, split_small_inputs):
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
    limit, kept, blocks = fastbn.get_output_cache()
    assert f"out cache   {limit / (1 << 20):g} MiB (kept: {kept / (1 << 20):g} MiB in {blocks} " \
        "block(s))" in out


def _run_over_schedules(x, gy, threads):
    """``_run_all`` under both channel-outer schedules and each thread count; asserts that
    all runs give the same bits and returns the first run's results."""
    from fastbn import _cpu

    results = []
    try:
        for mode in (1, 2):
            _cpu.set_schedule(mode)
            # the switch is obeyed (else the runs would compare a schedule with itself)
            assert (_cpu.channel_block(x.shape[1], 1 << 20, 2) > 0) == (mode == 1)
            for n in threads:
                fastbn.set_num_threads(n)
                results.append(_run_all(x, gy))
    finally:
        _cpu.set_schedule(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    return results[0]


@pytest.mark.parametrize("shape", [(8, 5, 17, 19), (3, 64, 40), (16, 2, 4, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_schedules_agree_bitwise(shape, dtype, split_small_inputs):
    """Whole-channel and per-plane schedules (picked by C vs threads) give the same bits."""
    x = make(shape, dtype, offset=1e4, seed=33)
    gy = make(shape, dtype, seed=34)
    _run_over_schedules(x, gy, threads=(1, 2))


@pytest.mark.parametrize("shape", [(100, 3, 5, 7), (130, 2, 9)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_batches_merge_planes_exactly(shape, dtype, split_small_inputs):
    """N > 64 puts several planes in each batch group: the merges inside a group, in both
    schedules and for 1-3 threads, agree with the float64 reference and with each other."""
    import reference as ref

    x = make(shape, dtype, offset=1e4, seed=36)
    gy = make(shape, dtype, seed=37)
    w = np.linspace(0.5, 1.5, shape[1]).astype(dtype)
    ry, mean, var = ref.forward_train(x, w, None, 1e-5)
    rgx, rgw, rgb = ref.backward(gy, x, w, mean, var, 1e-5, True)
    y, sm, si, _, _, gx, gw, gb, _ = _run_over_schedules(x, gy, threads=(1, 2, 3))
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(y, ry, rtol=0, atol=tol)
    np.testing.assert_allclose(sm, mean, rtol=1e-7 if dtype == np.float32 else 1e-14)
    np.testing.assert_allclose(si, 1 / np.sqrt(var + 1e-5), rtol=tol)
    np.testing.assert_allclose(gx, rgx, rtol=0, atol=tol * np.abs(rgx).max())
    count = x.size // x.shape[1]
    np.testing.assert_allclose(gw, rgw, rtol=0, atol=tol * count)
    np.testing.assert_allclose(gb, rgb, rtol=0, atol=tol * count)


def test_small_inputs_still_exact_with_many_threads():
    from fastbn import _threads

    x = make((6, 3, 5), np.float64, seed=35)
    fastbn.set_num_threads(8)
    assert _threads.threads_for(x.size) == 1
    a = _run_all(x, x)
    saved = _threads.MIN_VALUES_PER_THREAD
    _threads.MIN_VALUES_PER_THREAD = 1
    try:
        assert _threads.threads_for(x.size) == (8 if fastbn._cpu.HAVE_OPENMP else 1)
        b = _run_all(x, x)
    finally:
        _threads.MIN_VALUES_PER_THREAD = saved
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("shape,layout", [((64, 8, 16, 16), "contiguous"),
                                          ((64, 8, 16, 16), "channels_last")])
def test_float32_partials_switch_flipped_during_calls(shape, layout):
    """set_float32_partials is read once per call: flipping it from another thread while
    calls run (the GIL is released in the kernels) gives one of the two results, never a
    mix, and never a crash (a call of the channel-block schedule read it twice and wrote
    through scratch it had not allocated)."""
    import threading

    from fastbn import _cpu

    x = make(shape, np.float32, seed=26, layout=layout)
    outs = []
    try:
        _cpu.set_schedule(1)
        for on in (True, False):
            _cpu.set_float32_partials(on)
            outs.append(fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1,
                                                  1e-5)[1])
        stop = threading.Event()

        def flip():
            while not stop.is_set():
                _cpu.set_float32_partials(True)
                _cpu.set_float32_partials(False)

        t = threading.Thread(target=flip)
        t.start()
        try:
            for _ in range(300):
                got = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[1]
                assert any(np.array_equal(got, o) for o in outs)
        finally:
            stop.set()
            t.join()
    finally:
        _cpu.set_float32_partials(True)
        _cpu.set_schedule(0)
