"""The output cache: large outputs reuse the memory of dropped ones, never of live ones."""
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import fastbn
from fastbn import _cpu, _memory
from helpers import make

SHAPE = (16, 8, 64, 64)      # 2 MiB of float32: above _memory.BLOCK_FROM_BYTES


@pytest.fixture(autouse=True)
def empty_cache():
    """Each test starts from an empty cache with the default limit, and leaves it so."""
    fastbn.set_output_cache(0)
    fastbn.set_output_cache(_memory.DEFAULT_LIMIT)
    yield
    fastbn.set_output_cache(0)
    fastbn.set_output_cache(_memory.DEFAULT_LIMIT)


def _train(x):
    return fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[0]


def test_default_limit_and_state():
    """A fresh process starts with 256 MiB and nothing kept (the fixture resets it here)."""
    code = "import fastbn; print(fastbn.get_output_cache())"
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout
    assert text.strip() == str((256 << 20, 0, 0))
    assert SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] * 4 >= _memory.BLOCK_FROM_BYTES


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dropped_output_is_reused(layout):
    x = make(SHAPE, np.float32, seed=1, layout=layout)
    y = _train(x)
    address = y.ctypes.data
    assert fastbn.get_output_cache()[1:] == (0, 0)      # in use: not kept
    del y
    assert fastbn.get_output_cache()[1:] == (x.nbytes, 1)
    y = _train(x)
    assert y.ctypes.data == address
    assert y.ctypes.data % 64 == 0 and y.strides == x.strides
    assert fastbn.get_output_cache()[1:] == (0, 0)


def test_base_chain_ends_at_the_block():
    """No memoryview in the chain: releasing one would free the block under the array."""
    x = make(SHAPE, np.float32, seed=15, layout="channels_last")
    for a in (_train(x), _train(x)[1:, ::2].T):
        chain = []
        while a is not None:
            chain.append(a)
            a = a.base if isinstance(a, np.ndarray) else None
        assert all(isinstance(b, np.ndarray) for b in chain[:-1])
        assert isinstance(chain[-1], _cpu.OutputBlock), [type(b) for b in chain]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_free_lock():
    """A fork while another thread holds the cache's lock must not hang the child."""
    held, done = threading.Event(), threading.Event()

    def hold():
        with _memory._cache.lock:
            held.set()
            done.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:        # the child: no OpenMP here, only the cache
            try:
                a = _memory.empty(np, SHAPE, np.float32)
                del a
                code = 0 if fastbn.get_output_cache()[2] == 1 else 1
            finally:
                os._exit(locals().get("code", 2))
        deadline = time.monotonic() + 20
        while True:
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not finished:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert finished, "the forked child hung on the cache's lock"
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        done.set()
        t.join()


def test_live_outputs_and_their_views_are_never_reused():
    x = make(SHAPE, np.float32, seed=2)
    gy = make(SHAPE, np.float32, seed=3)
    y = _train(x)
    view = y[1:, 2]                     # NumPy's view of a view: its base is not y
    kept = view.copy()
    del y
    assert fastbn.get_output_cache()[1:] == (0, 0)
    _, sm, si = fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    gx = fastbn.batch_norm_backward(gy, x, None, None, None, sm, si, True, 1e-5)[0]
    y2 = _train(x * 2)
    for a in (gx, y2):
        assert not np.shares_memory(a, view)
    np.testing.assert_array_equal(view, kept)


def test_outputs_in_reference_cycles_come_back_after_collection():
    x = make(SHAPE, np.float32, seed=13)
    y = _train(x)
    cycle = [y[2:]]
    cycle.append(cycle)
    del y, cycle
    assert fastbn.get_output_cache()[1:] == (0, 0)
    gc.collect()
    assert fastbn.get_output_cache()[1:] == (x.nbytes, 1)


def test_reused_memory_gives_the_same_results():
    x = make(SHAPE, np.float32, offset=1e4, seed=4)
    first = _train(x).copy()
    for _ in range(3):
        np.testing.assert_array_equal(_train(x), first)


def test_repeated_calls_allocate_nothing_new():
    x = make(SHAPE, np.float32, seed=5)
    _train(x)                           # its output is dropped into the cache
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        _train(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < x.nbytes // 4, peak - base


def test_copies_of_strided_inputs_come_from_the_cache():
    x = make(SHAPE, np.float32, seed=14, layout="strided")
    assert not x.flags.c_contiguous
    want = _train(np.ascontiguousarray(x))
    assert fastbn.get_output_cache()[1:] == (0, 0)
    y = _train(x)
    # the copy of x is dropped after the call and kept; y is still in use
    assert fastbn.get_output_cache()[1:] == (x.nbytes, 1)
    np.testing.assert_array_equal(y, want)


def test_small_outputs_bypass_the_cache():
    x = make((4, 8, 16, 16), np.float32, seed=6)
    assert x.nbytes < _memory.BLOCK_FROM_BYTES
    _train(x)
    assert fastbn.get_output_cache()[1:] == (0, 0)


def test_limit_zero_turns_the_cache_off_and_frees_kept_blocks():
    x = make(SHAPE, np.float32, seed=7)
    _train(x)
    assert fastbn.get_output_cache()[2] == 1
    assert fastbn.set_output_cache(0) == 256 << 20
    assert fastbn.get_output_cache() == (0, 0, 0)
    _train(x)
    assert fastbn.get_output_cache() == (0, 0, 0)


def test_oldest_block_is_dropped_first():
    a = make((16, 8, 64, 32), np.float32, seed=8)      # 1 MiB
    b = make((16, 8, 64, 48), np.float32, seed=9)      # 1.5 MiB
    c = make((16, 8, 64, 40), np.float32, seed=10)     # 1.25 MiB
    fastbn.set_output_cache(b.nbytes + c.nbytes)
    ya, yb, yc = _train(a), _train(b), _train(c)
    address_b, address_c = yb.ctypes.data, yc.ctypes.data
    del ya, yb                       # a's block kept first, then b's: both fit
    assert fastbn.get_output_cache()[1:] == (a.nbytes + b.nbytes, 2)
    del yc                           # c's needs room: a's, the oldest, goes
    assert fastbn.get_output_cache()[1:] == (b.nbytes + c.nbytes, 2)
    assert _train(b).ctypes.data == address_b
    assert _train(c).ctypes.data == address_c


def test_many_sizes_each_find_their_own_block():
    sizes = [_memory.BLOCK_FROM_BYTES + 64 * i for i in range(50)]
    arrays = [_memory.empty(np, (n,), np.uint8) for n in sizes]
    addresses = [a.ctypes.data for a in arrays]
    del arrays
    assert fastbn.get_output_cache()[1:] == (sum(sizes), 50)
    for n, address in reversed(list(zip(sizes, addresses))):
        assert _memory.empty(np, (n,), np.uint8).ctypes.data == address
    assert fastbn.get_output_cache()[1:] == (sum(sizes), 50)   # each came back when dropped


def test_bookkeeping_stays_consistent_under_random_use():
    """Random takes, drops and limit changes; the state must always equal what is kept."""
    rng = np.random.default_rng(0)
    sizes = [_memory.BLOCK_FROM_BYTES * k for k in (1, 2, 3)]
    live = []
    for _ in range(300):
        op = rng.integers(4)
        if op <= 1:
            live.append(_memory.empty(np, (int(rng.choice(sizes)),), np.uint8))
        elif op == 2 and live:
            live.pop(int(rng.integers(len(live))))
        else:
            fastbn.set_output_cache(int(rng.choice([0, 2, 5, 9])) * _memory.BLOCK_FROM_BYTES)
        limit, kept_bytes, blocks = fastbn.get_output_cache()
        cache = _memory._cache
        assert kept_bytes == cache.kept_bytes <= limit
        assert blocks == len(cache.by_age) == sum(len(v) for v in cache.by_size.values())
        kept_ids = {id(b) for v in cache.by_size.values() for b in v}
        assert kept_ids == set(cache.by_age)
        # nothing live is also kept
        for a in live:
            assert all(not np.shares_memory(a, b) for _, b in cache.by_age.values())


def test_blocks_over_the_limit_are_not_kept():
    x = make(SHAPE, np.float32, seed=11)
    fastbn.set_output_cache(x.nbytes - 1)
    _train(x)
    assert fastbn.get_output_cache() == (x.nbytes - 1, 0, 0)


@pytest.mark.parametrize("bad,exc,text", [
    (-1, ValueError, "max_bytes must be a non-negative int, got -1"),
    (1.5, TypeError, "max_bytes must be a non-negative int, got float 1.5"),
    (True, TypeError, "max_bytes must be a non-negative int, got bool True"),
    ("1", TypeError, "max_bytes must be a non-negative int, got str '1'"),
])
def test_bad_limits_are_rejected_without_change(bad, exc, text):
    x = make(SHAPE, np.float32, seed=12)
    _train(x)
    before = fastbn.get_output_cache()
    with pytest.raises(exc, match=text):
        fastbn.set_output_cache(bad)
    assert fastbn.get_output_cache() == before


def test_output_block_checks_its_bounds():
    with pytest.raises(ValueError, match="1001 aligned bytes do not fit a block of 1000"):
        _cpu.OutputBlock(np.empty(1000, np.uint8), 1001, None)
    with pytest.raises(ValueError, match="aligned bytes do not fit"):
        _cpu.OutputBlock(np.empty(1000, np.uint8), 2**63 - 1, None)
    with pytest.raises(ValueError, match="0 aligned bytes"):
        _cpu.OutputBlock(np.empty(1000, np.uint8), 0, None)


def test_threads_never_share_live_outputs():
    """Calls from several Python threads at once (the kernels release the GIL)."""
    xs = [make(SHAPE, np.float32, seed=20 + i) for i in range(4)]
    wants = [_train(x).copy() for x in xs]
    errors = []

    def work(i):
        try:
            held = []
            for _ in range(5):
                held.append(_train(xs[i]))
                if len(held) > 2:
                    held.pop(0)
                for y in held:
                    np.testing.assert_array_equal(y, wants[i])
        except Exception as e:      # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
