"""SyncBatchNorm: in-process checks with simulated ranks, and real MPI runs.

The in-process tests simulate a world of ranks with threads and a
:class:`fastbn._comm.Communicator` that counts its collectives; they need
neither mpi4py nor mpiexec. ``test_mpi_world`` starts ``tests/sync_worker.py``
under ``mpiexec`` with 2 and 3 processes (skipped only when mpi4py or
mpiexec is missing: ``pip install -e ".[mpi]"`` provides both).
"""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

import fastbn
from fastbn._comm import MPICommunicator, as_communicator
from fastbn.sync import _steps_of, merge_moments
from helpers import make
from ranks import ThreadComm, ThreadWorld, run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _params(bn):
    c = bn.num_features
    bn.weight[...] = np.linspace(0.5, 2.0, c)
    if bn.bias is not None:
        bn.bias[...] = np.linspace(-1.0, 1.0, c)
    return bn


# -- in-process tests -----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_simulated_ranks_match_full_batch(layout):
    counts = [2, 0, 3]
    shape = (sum(counts), 4, 3, 5)
    starts = np.cumsum([0] + counts)
    ref = _params(fastbn.BatchNorm(4, momentum=None, dtype=np.float64))
    steps = []
    for step in range(2):
        x = make(shape, np.float64, offset=5.0, scale=2.0, seed=2 * step, layout=layout)
        gy = make(shape, np.float64, seed=2 * step + 1, layout=layout)
        steps.append((x, gy, ref(x), ref.backward(gy), ref.grad_weight, ref.grad_bias))

    def body(comm):
        bn = fastbn.SyncBatchNorm.from_batchnorm(
            _params(fastbn.BatchNorm(4, momentum=None, dtype=np.float64)), comm)
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        out = []
        for x, gy, *_ in steps:
            y = bn(x[lo:hi])
            fwd = comm.take()
            gx = bn.backward(gy[lo:hi])
            bwd = comm.take()
            gw, gb = bn.grad_weight.copy(), bn.grad_bias.copy()
            fastbn.allreduce_gradients(bn)
            out.append((y, gx, gw, gb, bn.grad_weight, bn.grad_bias, fwd, bwd, comm.take(),
                        bn.running_mean.copy(), bn.running_var.copy()))
        return out, int(bn.num_batches_tracked)

    results = run_ranks(3, body)
    for r, res in enumerate(results):
        assert not isinstance(res, BaseException), res
        per_step, tracked = res
        assert tracked == 2
        lo, hi = starts[r], starts[r + 1]
        for (x, gy, y_ref, gx_ref, gw_ref, gb_ref), got in zip(steps, per_step):
            y, gx, gw, gb, gw_all, gb_all, fwd, bwd, red, rm, rv = got
            assert fwd == ["allgather"] and bwd == ["allreduce"] and red == ["allreduce"]
            np.testing.assert_allclose(y, y_ref[lo:hi], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(gx, gx_ref[lo:hi], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(gw_all, gw_ref, rtol=1e-12, atol=1e-11)
            np.testing.assert_allclose(gb_all, gb_ref, rtol=1e-12, atol=1e-11)
        np.testing.assert_allclose(rm, ref.running_mean, rtol=1e-12)
        np.testing.assert_allclose(rv, ref.running_var, rtol=1e-12)
        # Identical, not just close, on every rank: the merge runs in rank order.
        np.testing.assert_array_equal(rm, results[0][0][-1][-2])
        np.testing.assert_array_equal(rv, results[0][0][-1][-1])
    # The local gradient contributions add up to the full-batch ones.
    for i, (*_, gw_ref, gb_ref) in enumerate(steps):
        np.testing.assert_allclose(sum(res[0][i][2] for res in results), gw_ref, rtol=1e-12,
                                   atol=1e-11)
        np.testing.assert_allclose(sum(res[0][i][3] for res in results), gb_ref, rtol=1e-12,
                                   atol=1e-11)


def test_global_count_one_raises_on_every_rank():
    def body(comm):
        bn = fastbn.SyncBatchNorm(3, comm=comm)
        x = np.ones((1 if comm.rank == 1 else 0, 3), np.float32)
        try:
            bn(x)
        except ValueError as exc:
            return str(exc), comm.take(), int(bn.num_batches_tracked), bn.running_var.copy()
        return "no error"

    for res in run_ranks(3, body):
        text, calls, tracked, rv = res
        assert text.startswith("Expected more than 1 value per channel when training, "
                               "got input size (")
        assert calls == ["allgather"] and tracked == 0 and (rv == 1).all()


def test_bad_input_on_one_rank_raises_everywhere_without_changes():
    def body(comm):
        bn = fastbn.SyncBatchNorm(3, comm=comm)
        good = make((2, 3, 4), np.float32, seed=comm.rank)
        x = np.zeros((2, 5, 4), np.float32) if comm.rank == 2 else good
        try:
            bn(x)
        except (ValueError, RuntimeError) as exc:
            caught = exc
        state = {k: a.copy() for k, a in bn.state_dict().items()}
        y = bn(good)   # still in step: the next collective lines up on every rank
        try:
            bn.backward(np.ones((3, 3, 4), np.float32) if comm.rank == 0 else np.ones_like(y))
        except (ValueError, RuntimeError) as exc:
            caught_bwd = exc
        return caught, state, comm.take(), caught_bwd, bn.grad_weight

    fresh = fastbn.SyncBatchNorm(3).state_dict()
    for r, res in enumerate(run_ranks(3, body)):
        caught, state, calls, caught_bwd, gw = res
        if r == 2:
            assert type(caught) is ValueError and "channels on axis 1" in str(caught)
        else:
            assert type(caught) is RuntimeError and "rank 2 rejected" in str(caught)
        if r == 0:
            assert type(caught_bwd) is ValueError and "grad_output has shape" in str(caught_bwd)
        else:
            assert type(caught_bwd) is RuntimeError and "rank 0 rejected" in str(caught_bwd)
        for key, value in fresh.items():
            np.testing.assert_array_equal(state[key], value)
        assert calls == ["allgather", "allgather", "allreduce"]
        assert gw is None


def test_allreduce_gradients_average_and_missing_backward():
    def joined(comm):
        bn = fastbn.SyncBatchNorm(2, comm=comm, dtype=np.float64)
        x = make((3, 2), np.float64, seed=comm.rank)
        bn(x)
        bn.backward(np.full((3, 2), float(comm.rank + 1)))
        fastbn.allreduce_gradients(bn, average=True)
        return bn.grad_bias.copy()

    for gb in run_ranks(2, joined):
        np.testing.assert_allclose(gb, [(3 * 1 + 3 * 2) / 2] * 2)

    def missing(comm):
        bn = fastbn.SyncBatchNorm(2, comm=comm, dtype=np.float64)
        bn(make((3, 2), np.float64, seed=comm.rank))
        bn.backward(np.ones((3, 2)))
        if comm.rank == 1:
            bn.grad_weight = bn.grad_bias = None   # e.g. gradients cleared on one rank only
        with pytest.raises(RuntimeError, match=r"rank 1 had no backward\(\) since"):
            fastbn.allreduce_gradients(bn)
        return bn.grad_bias

    gbs = run_ranks(2, missing)
    assert not any(isinstance(g, BaseException) for g in gbs), gbs
    np.testing.assert_array_equal(gbs[0], [3.0, 3.0])   # unchanged on the rank that had one


def test_allreduce_gradients_refuses_stale_gradients_and_mixed_modules():
    """Every rank raises (nobody waits) when one rank's gradients are from an older step,
    or when only some ranks have affine parameters; no rank changes a gradient."""
    def stale(comm):
        bn = fastbn.BatchNorm(2, dtype=np.float64)
        x = make((3, 2), np.float64, seed=comm.rank)
        bn(x)
        bn.backward(np.ones((3, 2)))
        bn(2 * x)                          # the next step's forward ...
        if comm.rank == 0:
            bn.backward(np.ones((3, 2)))   # ... and only rank 0's backward
        before = bn.grad_bias.copy()
        with pytest.raises(RuntimeError, match=r"^allreduce_gradients: rank 1 had no "
                                               r"backward\(\) since their last forward\(\)"):
            fastbn.allreduce_gradients(bn, comm)
        np.testing.assert_array_equal(bn.grad_bias, before)
        return comm.take()

    for calls in run_ranks(2, stale):
        assert calls == ["allreduce"]

    def mixed(comm):
        bn = fastbn.BatchNorm(2, affine=comm.rank != 2)
        bn(make((3, 2), np.float32, seed=comm.rank))
        bn.backward(np.ones((3, 2), np.float32))
        with pytest.raises(RuntimeError, match="rank 2 had no affine parameters"):
            fastbn.allreduce_gradients(bn, comm)
        none = fastbn.BatchNorm(2, affine=False)
        none(make((3, 2), np.float32))
        assert fastbn.allreduce_gradients(none, comm) is none   # nothing to do anywhere
        return comm.take()

    for calls in run_ranks(3, mixed):
        assert calls == ["allreduce", "allreduce"]


@pytest.mark.parametrize("comm_kind", ["none", "world_of_one"])
def test_single_process_is_plain_batchnorm(comm_kind):
    counter = ThreadComm(ThreadWorld(1), 0)
    sync = fastbn.SyncBatchNorm(3, comm=None if comm_kind == "none" else counter)
    plain = fastbn.BatchNorm(3)
    for module in (sync, plain):
        _params(module)
    for training in (True, False):
        sync.train(training)
        plain.train(training)
        x = make((4, 3, 5), np.float32, offset=2.0, seed=9)
        np.testing.assert_array_equal(sync(x), plain(x))
        np.testing.assert_array_equal(sync.backward(x), plain.backward(x))
        np.testing.assert_array_equal(sync.grad_weight, plain.grad_weight)
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(sync.state_dict()[key], value)
    assert counter.calls == []
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        sync.train()(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        sync(np.ones(3, np.float32))


def test_eval_makes_no_collective():
    def body(comm):
        bn = fastbn.SyncBatchNorm(3, comm=comm).eval()
        x = make((2, 3), np.float32, seed=comm.rank)
        y = bn(x)
        bn.backward(x)
        return comm.take(), y, fastbn.BatchNorm(3).eval()(x)

    for calls, y, y_plain in run_ranks(2, body):
        assert calls == []
        np.testing.assert_array_equal(y, y_plain)


def test_from_batchnorm_copies_state_and_mode():
    bn = _params(fastbn.BatchNorm2d(3, momentum=None, bias=False, dtype=np.float64))
    bn(make((4, 3, 2, 2), np.float64, seed=1))
    bn.eval()
    sync = fastbn.SyncBatchNorm.from_batchnorm(bn)
    assert isinstance(sync, fastbn.BatchNorm) and sync.comm is None
    assert (sync.training, sync.momentum, sync.eps, sync.dtype) == (False, None, 1e-5,
                                                                     np.float64)
    assert sync.bias is None and repr(sync).startswith("SyncBatchNorm(3, eps=1e-05")
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(sync.state_dict()[key], value)
    sync.running_mean[...] = 7
    assert not (bn.running_mean == 7).any()   # copies, not shared arrays
    affine_off = fastbn.SyncBatchNorm.from_batchnorm(fastbn.BatchNorm(2, affine=False))
    assert affine_off.weight is None and affine_off.bias is None
    with pytest.raises(TypeError, match="expects a fastbn BatchNorm module"):
        fastbn.SyncBatchNorm.from_batchnorm(object())


def test_pickle_drops_the_communicator():
    sync = fastbn.SyncBatchNorm(3, comm=ThreadComm(ThreadWorld(2), 0))
    loaded = pickle.loads(pickle.dumps(sync))
    assert loaded.comm is None
    x = make((4, 3), np.float32, seed=3)
    np.testing.assert_array_equal(loaded(x), fastbn.BatchNorm(3)(x))


def test_as_communicator_kinds():
    class MpiLike:
        def __init__(self):
            self.sent = []

        def Get_rank(self):
            return 1

        def Get_size(self):
            return 1

        def Allgather(self, send, recv):
            recv[...] = send

        def Allreduce(self, send, recv):
            recv[...] = send

    adapter = as_communicator(MpiLike())
    assert isinstance(adapter, MPICommunicator) and (adapter.rank, adapter.size) == (1, 1)
    np.testing.assert_array_equal(adapter.allgather(np.arange(3.0)), [[0.0, 1.0, 2.0]])
    assert as_communicator(None) is None
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        fastbn.SyncBatchNorm(3, comm=object())


def test_merge_moments_is_chan_in_rank_order():
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((n, 2)) + 1e6 for n in (4, 0, 1, 7)]
    counts = np.array([len(p) for p in parts], float)
    means = np.array([p.mean(0) if len(p) else np.zeros(2) for p in parts])
    m2s = np.array([((p - p.mean(0)) ** 2).sum(0) if len(p) else np.zeros(2) for p in parts])
    n, mean, m2 = merge_moments(counts, means, m2s)
    full = np.concatenate(parts)
    assert n == 12
    np.testing.assert_allclose(mean, full.mean(0), rtol=1e-15)
    np.testing.assert_allclose(m2, ((full - full.mean(0)) ** 2).sum(0), rtol=1e-9)
    assert merge_moments(np.zeros(2), np.zeros((2, 3)), np.zeros((2, 3)))[0] == 0


def test_backend_without_building_blocks_is_reported():
    # A backend without the step-by-step functions: a clear error, raised inside the
    # local checks, so the other ranks learn of it through the collective.
    lacking = types.ModuleType("fastbn._gpu_stub")
    lacking.moments = lacking.normalize = lambda *a: None
    with pytest.raises(NotImplementedError, match="grad_sums, grad_input in fastbn._gpu_stub"):
        _steps_of(lacking)


def test_import_needs_neither_mpi4py_nor_cupy():
    code = ("import sys, fastbn; fastbn.SyncBatchNorm(2); "
            "print(sorted(m for m in ('mpi4py', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# -- real processes ---------------------------------------------------------------------------

def _mpiexec():
    """The mpiexec next to this Python (a venv with the mpi extra), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def _launch_command(mpiexec, n, script=None, *args):
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    extra = []
    if "Open MPI" in version or "OpenRTE" in version:
        extra = ["--oversubscribe"]   # more ranks than cores (CI has 2)
    if script is None:
        script, args = os.path.join(HERE, "sync_worker.py"), (str(n),)
    return [mpiexec, *extra, "-n", str(n), sys.executable, "-m", "mpi4py", script, *args]


def _launch_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"   # the ranks share the machine's cores
    # Open MPI refuses to start as root (CI runs as root) without these two.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # All ranks are on this machine: shared memory only, no TCP transport.
    env.setdefault("OMPI_MCA_btl", "^tcp")
    return env


def _run_mpi(n, script=None, *args):
    """Run ``script`` (default: the sync worker) on ``n`` ranks; return its output."""
    pytest.importorskip("mpi4py")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found; pip install -e '.[mpi]'")
    proc = subprocess.Popen(_launch_command(mpiexec, n, script, *args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_launch_env(), cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # Kill mpiexec's whole session (its ranks included), then report the hang.
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {n} did not finish within 120 s (a rank hung):\n{out}")
    assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_mpi_world(n):
    out = _run_mpi(n)
    assert "SYNC-WORKER PASSED" in out and f"on {n} ranks, 0 failures" in out, out


def test_readme_example_on_two_ranks(tmp_path):
    """The README's "Training on several processes" example runs as printed."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Training on several processes", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "train_sync.py"
    script.write_text(code)
    out = _run_mpi(2, str(script))
    for rank in (0, 1):
        assert f"rank {rank} of 2: in step with the single-process run" in out, out


def test_reassigned_momentum_is_checked_on_every_rank():
    """A momentum set after construction is validated like BatchNorm's, before any change."""
    def body(comm):
        bn = fastbn.SyncBatchNorm(2, comm=comm)
        if comm.rank == 1:
            bn.momentum = float("nan")
        before = {k: a.copy() for k, a in bn.state_dict().items()}
        try:
            bn(make((3, 2), np.float32, seed=comm.rank))
        except (ValueError, RuntimeError) as exc:
            caught = exc
        for key, value in before.items():
            np.testing.assert_array_equal(bn.state_dict()[key], value)
        return type(caught).__name__, str(caught)

    (name0, text0), (name1, text1) = run_ranks(2, body)
    assert name1 == "ValueError" and "momentum must be finite" in text1
    assert name0 == "RuntimeError" and "rank 1 rejected" in text0
