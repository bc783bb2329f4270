"""``python -m fastbn bench --device cuda``: the CUDA kernels against PyTorch CUDA.

For a fixed table of shapes (float32 by default) and for forward-train,
forward-eval and backward, it measures fastbn and PyTorch, checks both results
against a float64 reference computed on the GPU, and reports:

``ms``       GPU time per call: CUDA events around a batch of calls queued behind
             a spin kernel, so that host-side overhead (Python, dispatch) is
             hidden and only the device work is timed; median of several batches.
``wall ms``  host time of one synchronised call (median), overhead included.
``GB/s``     the bytes that must move (2 x nbytes for forward, 3 x for backward)
             per GPU time, and ``copy%`` the same against a measured
             device-to-device copy (read + write bytes).
``vs torch`` PyTorch's GPU time / fastbn's (above 1: fastbn is faster).

Shapes smaller than ``ROTATE_BYTES`` rotate over several copies of their inputs
so that consecutive calls do not find the data in L2.
"""
import json
import math
import statistics
import time
import numpy as np

# Case, the modes and the bytes each mode must move are the CPU bench's.
from .bench import MODES, MOVES, Case

ROTATE_BYTES = 256 << 20      # well above the L2 of H100/H200 (50 MB)
EPS = 1e-5
MOMENTUM = 0.1


CASES = [
    Case("resnet conv2 NCHW", (32, 64, 56, 56), "nchw"),
    Case("resnet conv2 NHWC", (32, 64, 56, 56), "channels_last"),
    Case("resnet conv3 NCHW C=256", (32, 256, 56, 56), "nchw"),
    Case("resnet conv5 NCHW", (256, 512, 7, 7), "nchw"),
    Case("BatchNorm1d (N, C)", (4096, 1024), "nc"),
    Case("BatchNorm1d (N, C, L)", (64, 128, 1000), "nchw"),
    Case("BatchNorm3d NCDHW", (8, 32, 16, 32, 32), "nchw"),
    Case("resnet NCHW small", (8, 64, 28, 28), "nchw", quick=True),
    Case("resnet NHWC small", (8, 64, 28, 28), "channels_last", quick=True),
    Case("BatchNorm1d (N, C) small", (1024, 256), "nc", quick=True),
]

_SPIN_SOURCE = r"""
extern "C" __global__ void fastbn_bench_spin(long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < (unsigned long long)ns);
}
"""


# -- timing ----------------------------------------------------------------------------
class Timer:
    """GPU time of queued calls (behind a spin kernel) and host time of single calls."""

    def __init__(self, cupy, calls=20, rounds=5):
        self.cupy = cupy
        self.calls = calls
        self.rounds = rounds
        self.spin = cupy.RawKernel(_SPIN_SOURCE, "fastbn_bench_spin")

    def __call__(self, fn):
        """``fn(i)`` runs call ``i``; returns (gpu_ms, wall_ms) per call (medians)."""
        cp = self.cupy
        sync = cp.cuda.get_current_stream().synchronize
        for i in range(3):
            fn(i)
        sync()
        walls = []
        for i in range(self.calls):
            t0 = time.perf_counter()
            fn(i)
            sync()
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        gpu = []
        for _ in range(self.rounds):
            # the spin outlasts the host's queueing of the batch, so the batch runs back to back
            self.spin((1,), (1,), (np.int64(1.5e9 * wall * self.calls + 1e6),))
            start.record()
            for i in range(self.calls):
                fn(i)
            end.record()
            end.synchronize()
            gpu.append(cp.cuda.get_elapsed_time(start, end) / self.calls)
        return statistics.median(gpu), 1e3 * wall


def copy_bandwidth(cupy, nbytes=1 << 30, repeat=10):
    """Device-to-device memcpy bandwidth in GB/s (read + write bytes), median of ``repeat``."""
    src = cupy.ones(nbytes // 4, cupy.float32)
    dst = cupy.empty_like(src)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat + 1):
        start.record()
        dst.data.copy_from_device_async(src.data, src.nbytes)
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    del src, dst
    return 2 * nbytes / (statistics.median(times[1:]) * 1e-3) / 1e9


# -- inputs and the float64 reference ------------------------------------------------------
def _inputs(cupy, case, dtype, seed):
    x = cupy.random.RandomState(seed).standard_normal(case.shape, dtype=cupy.float32)
    x = x.astype(dtype, copy=False)
    if case.layout == "channels_last":
        axes = (0,) + tuple(range(2, x.ndim)) + (1,)
        back = tuple(int(a) for a in np.argsort(axes))
        x = cupy.ascontiguousarray(x.transpose(axes)).transpose(back)
    return x


def _reference(cupy, mode, x, gy, w, b, rm, rv):
    """float64 reference output of ``mode`` on the GPU (textbook formulas)."""
    axes = (0,) + tuple(range(2, x.ndim))
    bc = lambda v: v.astype(cupy.float64).reshape((1, -1) + (1,) * (x.ndim - 2))  # noqa: E731
    x64 = x.astype(cupy.float64)
    if mode == "eval":
        return (x64 - bc(rm)) / cupy.sqrt(bc(rv) + EPS) * bc(w) + bc(b)
    mean = x64.mean(axis=axes)
    xc = x64 - bc(mean)
    invstd = 1.0 / cupy.sqrt((xc * xc).mean(axis=axes) + EPS)
    xhat = xc * bc(invstd)
    if mode == "train":
        return xhat * bc(w) + bc(b)
    gy64 = gy.astype(cupy.float64)
    count = x.size // x.shape[1]
    gb = gy64.sum(axis=axes)
    gw = (gy64 * xhat).sum(axis=axes)
    return (gy64 - bc(gb / count) - xhat * bc(gw / count)) * bc(invstd * w.astype(cupy.float64))


def _max_err(cupy, got, want):
    """Largest error relative to the reference's spread."""
    err = cupy.abs(cupy.asarray(got, cupy.float64) - want).max()
    return float(err / max(float(want.std()), 1e-30))


# -- one row ------------------------------------------------------------------------------------
def _fastbn_call(fastbn, mode, xs, gys, saved, w, b, rm, rv):
    k = len(xs)
    if mode == "train":
        return lambda i: fastbn.batch_norm_forward(xs[i % k], w, b, rm, rv, True, MOMENTUM, EPS)[0]
    if mode == "eval":
        return lambda i: fastbn.batch_norm_forward(xs[i % k], w, b, rm, rv, False, MOMENTUM,
                                                   EPS)[0]
    return lambda i: fastbn.batch_norm_backward(gys[i % k], xs[i % k], w, None, None,
                                                *saved[i % k], True, EPS)[0]


def _torch_call(torch, mode, xs, gys, w, b, rm, rv):
    tx = [torch.as_tensor(x, device="cuda") for x in xs]
    # Forward modes have no gradients (gys holds None).
    tgy = [torch.as_tensor(g, device="cuda") for g in gys if g is not None]
    tw, tb = torch.as_tensor(w, device="cuda"), torch.as_tensor(b, device="cuda")
    trm, trv = torch.as_tensor(rm.copy(), device="cuda"), torch.as_tensor(rv.copy(), device="cuda")
    k = len(xs)
    fbn = torch.nn.functional.batch_norm
    if mode == "train":
        return lambda i: fbn(tx[i % k], trm, trv, tw, tb, True, MOMENTUM, EPS)
    if mode == "eval":
        return lambda i: fbn(tx[i % k], trm, trv, tw, tb, False, MOMENTUM, EPS)
    saved = [torch.native_batch_norm(t, tw, tb, None, None, True, MOMENTUM, EPS)[1:] for t in tx]
    back = torch.ops.aten.native_batch_norm_backward
    return lambda i: back(tgy[i % k], tx[i % k], tw, None, None, saved[i % k][0],
                          saved[i % k][1], True, EPS, [True, True, True])[0]


def case_inputs(cupy, case, mode, dtype):
    """The rotated inputs of one row: ``(xs, gys, saved, (w, b, rm, rv))``.

    ``xs`` holds enough copies of the input (up to 8) that consecutive calls do not
    find it in L2; ``gys`` the gradients (``None`` in the forward modes); ``saved``
    the batch statistics of each input (backward only).
    """
    import fastbn

    x0 = _inputs(cupy, case, dtype, seed=1)
    k = max(1, min(8, math.ceil(ROTATE_BYTES / x0.nbytes)))
    xs = [x0] + [_inputs(cupy, case, dtype, seed=10 + i) for i in range(1, k)]
    gys = [_inputs(cupy, case, dtype, seed=100 + i) for i in range(k)] if mode == "backward" \
        else [None] * k
    c = case.shape[1]
    rng = np.random.default_rng(3)
    w, b, rm, rv = (cupy.asarray(a.astype(dtype)) for a in (
        rng.uniform(0.5, 1.5, c), rng.standard_normal(c), 0.1 * rng.standard_normal(c),
        rng.uniform(0.5, 1.5, c)))
    saved = []
    if mode == "backward":
        saved = [fastbn.batch_norm_forward(x, w, b, None, None, True, MOMENTUM, EPS)[1:]
                 for x in xs]
    return xs, gys, saved, (w, b, rm, rv)


def run_case(cupy, torch, timer, case, mode, dtype, copy_gbps):
    import fastbn

    xs, gys, saved, (w, b, rm, rv) = case_inputs(cupy, case, mode, dtype)
    x0, k = xs[0], len(xs)
    run_rm, run_rv = rm.copy(), rv.copy()
    fn = _fastbn_call(fastbn, mode, xs, gys, saved, w, b,
                      run_rm if mode == "train" else rm, run_rv if mode == "train" else rv)
    gpu_ms, wall_ms = timer(fn)
    want = _reference(cupy, mode, xs[0], gys[0], w, b, rm, rv)
    got = fn(0)
    moved = MOVES[mode] * x0.nbytes
    row = {"case": case.name, "shape": list(case.shape), "layout": case.layout,
           "dtype": np.dtype(dtype).name, "mode": mode, "fastbn_ms": gpu_ms,
           "fastbn_wall_ms": wall_ms, "gbps": moved / gpu_ms / 1e6,
           "copy_pct": 100 * moved / gpu_ms / 1e6 / copy_gbps, "rotated_inputs": k,
           "max_err": _max_err(cupy, got, want), "torch_ms": None, "torch_wall_ms": None,
           "vs_torch": None, "vs_torch_wall": None, "torch_err": None}
    row["ok"] = row["max_err"] < (1e-4 if np.dtype(dtype) == np.float32 else 1e-10)
    if torch is not None:
        tfn = _torch_call(torch, mode, xs, gys, w, b, rm, rv)
        row["torch_ms"], row["torch_wall_ms"] = timer(tfn)
        row["vs_torch"] = row["torch_ms"] / gpu_ms
        row["vs_torch_wall"] = row["torch_wall_ms"] / wall_ms
        row["torch_err"] = _max_err(cupy, cupy.asarray(tfn(0)), want)
    return row


def _import_torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


class NoDevice(RuntimeError):
    """This machine cannot run the GPU table (no CuPy, or no usable CUDA device)."""


def run(quick=False, json_path=None, progress=print, dtypes=("float32",), use_torch=True):
    """Run the GPU benchmark table; return the rows (dicts) and write them to ``json_path``.

    Raises :class:`NoDevice` before any work when the machine cannot run it.
    """
    try:
        import cupy
    except ImportError as exc:
        raise NoDevice(f"fastbn bench --device cuda needs CuPy: {exc}") from exc
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as exc:
        raise NoDevice(f"fastbn bench --device cuda needs a usable CUDA device: "
                       f"{type(exc).__name__}: {exc}") from exc
    torch = _import_torch_cuda() if use_torch else None
    dev = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    copy_gbps = copy_bandwidth(cupy, nbytes=(256 << 20) if quick else (1 << 30))
    timer = Timer(cupy, calls=10 if quick else 20, rounds=3 if quick else 7)
    import fastbn

    t0 = time.perf_counter()        # first call: NVRTC compilation (or CuPy's disk cache)
    fastbn.batch_norm(cupy.ones((2, 4), cupy.float32), None, None, training=True)
    cupy.cuda.Device().synchronize()
    compile_s = time.perf_counter() - t0
    progress(f"fastbn CUDA bench on {name} (cuda:{dev.id}), CuPy {cupy.__version__}, copy "
             f"{copy_gbps:.0f} GB/s, torch {torch.__version__ if torch else 'not available'}, "
             f"first call {compile_s:.1f} s")
    cases = [c for c in CASES if c.quick == quick]
    rows = []
    total = len(cases) * len(dtypes) * len(MODES)
    for case in cases:
        for dtype in dtypes:
            for mode in MODES:
                row = run_case(cupy, torch, timer, case, mode, np.dtype(dtype), copy_gbps)
                row["device"] = name
                rows.append(row)
                progress(f"[{len(rows)}/{total}] {format_row(row)}")
                cupy.get_default_memory_pool().free_all_blocks()
                if torch is not None:
                    torch.cuda.empty_cache()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": name, "cupy": cupy.__version__,
                       "torch": torch.__version__ if torch else None,
                       "copy_gbps": copy_gbps, "first_call_s": compile_s,
                       "torch_ops": {"train": "torch.nn.functional.batch_norm",
                                     "eval": "torch.nn.functional.batch_norm",
                                     "backward": "torch.ops.aten.native_batch_norm_backward"},
                       "rows": rows}, f, indent=1)
    return rows


HEADER = (f"{'case':<25} {'shape':<16} {'dtype':<7} {'mode':<8} {'ms':>7} {'wall ms':>7} "
          f"{'GB/s':>6} {'copy%':>5} {'torch ms':>8} {'vs torch':>8} {'wall vs':>7} "
          f"{'err':>7} {'torch err':>9}")


def _fmt(v, spec, width):
    return f"{v:{spec}}" if v is not None else f"{'-':>{width}}"


def format_row(r):
    shape = "x".join(map(str, r["shape"]))
    flag = "" if r["ok"] else "  WRONG"
    return (f"{r['case']:<25} {shape:<16} {r['dtype']:<7} {r['mode']:<8} "
            f"{r['fastbn_ms']:7.3f} {r['fastbn_wall_ms']:7.3f} {r['gbps']:6.0f} "
            f"{r['copy_pct']:4.0f}% {_fmt(r['torch_ms'], '8.3f', 8)} "
            f"{_fmt(r['vs_torch'], '7.2f', 7)}x {_fmt(r['vs_torch_wall'], '6.2f', 6)}x "
            f"{r['max_err']:7.1e} {_fmt(r['torch_err'], '9.1e', 9)}{flag}")


def format_table(rows):
    """The rows as a text table (one line per case, dtype and mode)."""
    lines = [HEADER] + [format_row(r) for r in rows]
    bad = [r for r in rows if not r["ok"]]
    if bad:
        lines.append(f"{len(bad)} row(s) failed the float64 reference check")
    return "\n".join(lines)
