"""SyncBatchNorm checks on real MPI processes; started by tests/test_sync.py.

Run as ``mpiexec -n R python -m mpi4py tests/sync_worker.py R``. Every rank
builds the same full batch from a fixed seed, takes its own shard of it, and
compares what SyncBatchNorm gives on that shard with single-process
``fastbn.BatchNorm`` on the full batch.

Comparison failures are collected rather than raised, so that every rank keeps
making the same sequence of collectives; anything else that raises is an
uncaught exception, which ``python -m mpi4py`` turns into an abort of the whole
job instead of a hang. Rank 0 prints one summary line; all ranks exit with 0
only when no rank recorded a failure.
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import fastbn  # noqa: E402
from helpers import is_channels_last, relayout  # noqa: E402

WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
SIZE = WORLD.Get_size()
C = 3
FAILURES = []
CHECKS = [0]


class CountingComm:
    """An mpi4py communicator that records each collective SyncBatchNorm makes.

    It offers only the four methods the MPI adapter uses, so any other
    collective would fail loudly instead of going uncounted.
    """

    def __init__(self, comm):
        self.comm = comm
        self.calls = []

    def Get_rank(self):
        return self.comm.Get_rank()

    def Get_size(self):
        return self.comm.Get_size()

    def Allgather(self, send, recv):
        self.calls.append("Allgather")
        self.comm.Allgather(send, recv)

    def Allreduce(self, send, recv):
        self.calls.append("Allreduce")
        self.comm.Allreduce(send, recv)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def expect(label, check):
    """Run ``check()``; record (do not raise) an AssertionError with ``label``."""
    CHECKS[0] += 1
    try:
        check()
    except AssertionError as exc:
        FAILURES.append(f"rank {RANK}: {label}: {exc}")


def expect_raises(label, kind, text, call):
    """``call()`` must raise ``kind`` whose message contains ``text``."""
    CHECKS[0] += 1
    try:
        call()
    except kind as exc:
        if text not in str(exc):
            FAILURES.append(f"rank {RANK}: {label}: message {str(exc)!r} lacks {text!r}")
        return
    except Exception as exc:  # noqa: BLE001 - report the wrong kind, keep going
        FAILURES.append(f"rank {RANK}: {label}: raised {type(exc).__name__}: {exc}")
        return
    FAILURES.append(f"rank {RANK}: {label}: did not raise {kind.__name__}")


def same_on_all_ranks(label, array):
    """Bit-identical on every rank (one pickled all-gather of the raw bytes)."""
    everyone = WORLD.allgather(np.asarray(array).tobytes())
    expect(label, lambda: np.testing.assert_equal(everyone, [everyone[0]] * SIZE))


def tolerance(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)


def shape_for(layout, n):
    return (n, C) if layout == "2d" else (n, C, 4, 5)


def full_batch(layout, dtype, total, seed):
    """Same values on every rank: the batch as a single process would see it."""
    rng = np.random.default_rng(seed)
    return (3.0 + 2.0 * rng.standard_normal(shape_for(layout, total))).astype(dtype)


def shard(full, counts, layout):
    start = sum(counts[:RANK])
    part = np.ascontiguousarray(full[start:start + counts[RANK]])
    return relayout(part, "channels_last" if layout == "channels_last" else "contiguous")


def shards(kind):
    return {"equal": [2] * SIZE,
            "unequal": [1, 3, 2][:SIZE] if SIZE == 3 else [3, 1],
            "empty": [2, 0, 3][:SIZE] if SIZE == 3 else [3, 0]}[kind]


def pair(dtype, momentum, counting):
    """A single-process reference module and a SyncBatchNorm made from it."""
    ref = fastbn.BatchNorm(C, momentum=momentum, dtype=dtype)
    ref.weight[...] = np.linspace(0.5, 2.0, C)
    ref.bias[...] = np.linspace(-1.0, 1.0, C)
    return ref, fastbn.SyncBatchNorm.from_batchnorm(ref, counting)


def training_case(layout, dtype, kind, momentum):
    label = f"{layout}/{np.dtype(dtype).name}/{kind}/momentum={momentum}"
    counts = shards(kind)
    counting = CountingComm(WORLD)
    ref, sync = pair(dtype, momentum, counting)
    tol = tolerance(dtype)
    start, stop = sum(counts[:RANK]), sum(counts[:RANK + 1])
    for step in range(2):
        full_x = full_batch(layout, dtype, sum(counts), seed=100 * step + 1)
        full_gy = full_batch(layout, dtype, sum(counts), seed=100 * step + 2) - 3.0
        x, gy = shard(full_x, counts, layout), shard(full_gy, counts, layout)
        y_ref = ref(full_x)
        gx_ref = ref.backward(full_gy)
        y = sync(x)
        calls_fwd = counting.take()
        gx = sync.backward(gy)
        calls_bwd = counting.take()
        local_gw, local_gb = sync.grad_weight.copy(), sync.grad_bias.copy()
        summed_gw = WORLD.allreduce(local_gw.astype(np.float64))
        summed_gb = WORLD.allreduce(local_gb.astype(np.float64))
        fastbn.allreduce_gradients(sync)
        calls_grad = counting.take()
        at = f"{label} step {step}"
        expect(f"{at}: one collective per forward",
               lambda: np.testing.assert_equal(calls_fwd, ["Allgather"]))
        expect(f"{at}: one collective per backward",
               lambda: np.testing.assert_equal(calls_bwd, ["Allreduce"]))
        expect(f"{at}: one collective in allreduce_gradients",
               lambda: np.testing.assert_equal(calls_grad, ["Allreduce"]))
        expect(f"{at}: output shape/dtype",
               lambda: np.testing.assert_equal((y.shape, y.dtype, gx.shape, gx.dtype),
                                               (x.shape, x.dtype, x.shape, x.dtype)))
        if layout == "channels_last" and x.size:
            expect(f"{at}: channels-last output",
                   lambda: np.testing.assert_(is_channels_last(y) and is_channels_last(gx)))
        expect(f"{at}: output", lambda: np.testing.assert_allclose(
            y, y_ref[start:stop], **tol))
        expect(f"{at}: grad_input", lambda: np.testing.assert_allclose(
            gx, gx_ref[start:stop], **tol))
        scale = float(np.abs(ref.grad_weight).max()) + 1.0
        for name, got in (("sum of grad_weight", summed_gw), ("sum of grad_bias", summed_gb),
                          ("allreduce_gradients weight", sync.grad_weight),
                          ("allreduce_gradients bias", sync.grad_bias)):
            want = ref.grad_weight if "weight" in name else ref.grad_bias
            expect(f"{at}: {name}", lambda got=got, want=want: np.testing.assert_allclose(
                got, want, rtol=tol["rtol"], atol=tol["atol"] * scale))
        for key in ("running_mean", "running_var"):
            expect(f"{at}: {key}", lambda key=key: np.testing.assert_allclose(
                getattr(sync, key), getattr(ref, key), **tol))
            same_on_all_ranks(f"{at}: {key} identical on all ranks", getattr(sync, key))
        expect(f"{at}: num_batches_tracked",
               lambda: np.testing.assert_equal(int(sync.num_batches_tracked), step + 1))
    # Eval uses the (synchronized) running statistics and makes no collective.
    sync.eval()
    ref.eval()
    full_x = full_batch(layout, dtype, sum(counts), seed=7)
    y = sync(shard(full_x, counts, layout))
    gx = sync.backward(shard(full_x, counts, layout))
    expect(f"{label}: eval makes no collective",
           lambda: np.testing.assert_equal(counting.take(), []))
    expect(f"{label}: eval output", lambda: np.testing.assert_allclose(
        y, ref(full_x)[start:stop], **tol))
    expect(f"{label}: eval grad_input", lambda: np.testing.assert_allclose(
        gx, ref.backward(full_x)[start:stop], **tol))


def snapshot(module):
    return {k: a.copy() for k, a in module.state_dict().items()}


def expect_unchanged(label, module, before):
    after = module.state_dict()
    expect(label, lambda: [np.testing.assert_array_equal(after[k], before[k]) for k in before])


def error_cases():
    counting = CountingComm(WORLD)
    ref, sync = pair(np.float32, 0.1, counting)
    # A batch with one value per channel in total: every rank raises PyTorch's error.
    counts = [1] + [0] * (SIZE - 1)
    x = shard(full_batch("2d", np.float32, 1, seed=3), counts, "2d")
    before = snapshot(sync)
    expect_raises("global count 1", ValueError,
                  "Expected more than 1 value per channel when training", lambda: sync(x))
    expect("global count 1: one collective",
           lambda: np.testing.assert_equal(counting.take(), ["Allgather"]))
    expect_unchanged("global count 1: state unchanged", sync, before)

    # One rank with a bad input: it raises its own error, every other rank a
    # RuntimeError naming it, and nobody hangs or changes state.
    bad = SIZE - 1
    counts = [2] * SIZE
    full = full_batch("nchw", np.float32, sum(counts), seed=4)
    good_x = shard(full, counts, "nchw")
    cases = [("wrong channel count", ValueError, "channels on axis 1",
              np.zeros((2, C + 1, 4, 5), np.float32)),
             ("wrong dtype", TypeError, "dtype", good_x.astype(np.float64)),
             ("not an array", TypeError, "numpy.ndarray", good_x.tolist()),
             ("1-D input", ValueError, "expected at least 2D input", np.zeros(4, np.float32))]
    for what, kind, text, bad_x in cases:
        mine = bad_x if RANK == bad else good_x
        if RANK != bad:
            kind, text = RuntimeError, f"rank {bad} rejected their input"
        expect_raises(f"bad input on rank {bad} ({what})", kind, text, lambda: sync(mine))
        expect(f"bad input ({what}): one collective",
               lambda: np.testing.assert_equal(counting.take(), ["Allgather"]))
        expect_unchanged(f"bad input ({what}): state unchanged", sync, before)

    # The module and the communicator are still usable and in step afterwards.
    y = sync(good_x)
    y_ref = ref(full)
    start = 2 * RANK
    expect("after errors: output", lambda: np.testing.assert_allclose(
        y, y_ref[start:start + 2], rtol=1e-5, atol=1e-5))

    # A bad grad_output on one rank in backward.
    gy = np.ones_like(good_x)
    bad_gy = np.ones((3, C, 4, 5), np.float32) if RANK == bad else gy
    kind, text = ((ValueError, "grad_output has shape") if RANK == bad
                  else (RuntimeError, f"rank {bad} rejected grad_output"))
    counting.take()
    expect_raises(f"bad grad_output on rank {bad}", kind, text, lambda: sync.backward(bad_gy))
    expect("bad grad_output: one collective",
           lambda: np.testing.assert_equal(counting.take(), ["Allreduce"]))
    expect("bad grad_output: no gradient set",
           lambda: np.testing.assert_(sync.grad_weight is None and sync.grad_bias is None))
    gx = sync.backward(gy)
    gx_ref = ref.backward(np.ones_like(full))
    expect("after a bad grad_output: grad_input", lambda: np.testing.assert_allclose(
        gx, gx_ref[start:start + 2], rtol=1e-5, atol=1e-5))


def main():
    expected = int(sys.argv[1]) if len(sys.argv) > 1 else SIZE
    if SIZE != expected:
        # mpiexec of one MPI library with mpi4py built on another starts
        # independent singletons; say so instead of testing nothing.
        print(f"sync_worker: expected {expected} ranks, got a world of {SIZE}", flush=True)
        sys.exit(3)
    fastbn.set_num_threads(1)
    for layout in ("nchw", "channels_last", "2d"):
        for dtype in (np.float32, np.float64):
            for kind in ("equal", "unequal", "empty"):
                momentum = None if kind == "unequal" else 0.1
                training_case(layout, dtype, kind, momentum)
    error_cases()
    failures = WORLD.gather(FAILURES, root=0)
    checks = WORLD.reduce(CHECKS[0], root=0)
    status = 0
    if RANK == 0:
        flat = [f for per_rank in failures for f in per_rank]
        for line in flat:
            print("FAIL", line, flush=True)
        print(f"SYNC-WORKER {'FAILED' if flat else 'PASSED'}: {checks} checks on {SIZE} "
              f"ranks, {len(flat)} failures", flush=True)
        status = 1 if flat else 0
    sys.exit(WORLD.bcast(status, root=0))


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        WORLD.Abort(2)   # one rank's crash must not leave the others waiting
