"""``python -m fastbn bench``: fastbn against PyTorch and NumPy, and against the memory floor.

For every row of a fixed table of realistic shapes, and for forward-train,
forward-eval and backward, it times fastbn, a hand-written NumPy version and
PyTorch (when installed), all with the same thread count, checks fastbn's
result against a float64 reference, and prints time, GB/s, the percentage of
the bandwidth floor and the speed ratios.

The floor of a row is the bytes that must move divided by the streaming
bandwidth measured in the same run: forward-train and eval read and write the
tensor once (2 x nbytes), backward reads x and dy and writes dx (3 x nbytes).

Two fastbn times are shown. ``ms`` allocates the output on every call, as
PyTorch does, and is the one compared with PyTorch; for large tensors it
includes the kernel zeroing fresh pages. ``out= ms`` writes into a reused buffer
(``out=``) and is the one compared with the bandwidth floor (GB/s, floor%).
"""
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import _cpu
from ._threads import get_num_threads, set_num_threads
from .functional import batch_norm_backward, batch_norm_forward

MODES = ("train", "eval", "backward")
MOVES = {"train": 2, "eval": 2, "backward": 3}   # tensor-sized transfers that must happen


@dataclass
class Case:
    name: str
    shape: tuple
    layout: str          # "nchw" (C order), "channels_last", "nc" (2-D)
    quick: bool = False


CASES = [
    Case("resnet conv2 NCHW", (32, 64, 56, 56), "nchw"),
    Case("resnet conv2 NHWC", (32, 64, 56, 56), "channels_last"),
    Case("resnet conv1 NCHW (large)", (32, 64, 112, 112), "nchw"),
    Case("resnet conv3 NCHW", (32, 128, 28, 28), "nchw", quick=True),
    Case("resnet conv5 NCHW", (256, 512, 7, 7), "nchw"),
    Case("stem C=3 NHWC", (8, 3, 224, 224), "channels_last"),
    Case("stem C=3 NHWC (small)", (2, 3, 112, 112), "channels_last", quick=True),
    Case("BatchNorm1d (N, C)", (4096, 1024), "nc"),
    Case("BatchNorm1d (N, C) small", (512, 256), "nc", quick=True),
    Case("BatchNorm1d (N, C, L)", (64, 128, 1000), "nchw"),
    Case("BatchNorm3d NCDHW", (8, 32, 16, 32, 32), "nchw"),
    Case("BatchNorm3d NCDHW small", (2, 16, 8, 16, 16), "nchw", quick=True),
]


@dataclass
class Row:
    case: str
    shape: tuple
    layout: str
    dtype: str
    mode: str
    threads: int
    fastbn_ms: float
    out_ms: float
    gbps: float
    floor_pct: float
    numpy_ms: float
    torch_ms: float = None
    vs_numpy: float = None
    vs_torch: float = None
    max_err: float = None
    torch_err: float = None
    ok: bool = True
    notes: list = field(default_factory=list)


def stream_bandwidth(threads, nbytes=256 << 20, repeat=7):
    """Best-of-``repeat`` copy bandwidth in GB/s, counting read + write bytes."""
    n = nbytes // 8
    src = np.ones(n)
    dst = np.empty(n)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _cpu.stream_copy(src, dst, threads)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def _make(case, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype, copy=False)
    if case.layout == "channels_last":
        axes = (0,) + tuple(range(2, x.ndim)) + (1,)
        x = np.ascontiguousarray(x.transpose(axes)).transpose(np.argsort(axes))
    return x


def _time(fn, min_repeat, budget_s):
    """Median wall time of ``fn()`` in ms (one warm-up call, then >= min_repeat runs)."""
    return _time_alternating([fn], min_repeat, budget_s)[0]


def _time_alternating(fns, min_repeat, budget_s, block=5):
    """Median wall times in ms of several functions, in alternating blocks of calls.

    Each round gives every contender a warm-up call and ``block`` timed calls in a
    row, the way a training loop calls one library; rounds repeat until each has
    ``min_repeat`` timings (or more, within the time budget). Alternating rounds
    expose every contender to the same drift of a noisy machine, while a block
    keeps the contender's steady state: calling the libraries in strict turns
    instead let each one's output allocations push the other's out of the
    allocator's reuse (fresh pages: up to 0.7 ms more per 25 MB output), and
    left two OpenMP runtimes' threads spinning against each other.
    """
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_repeat or (time.perf_counter() - start < budget_s * len(fns)
                                         and len(times[0]) < 3 * min_repeat):
        for fn, bucket in zip(fns, times):
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


# -- NumPy written by hand: the obvious vectorised implementation -----------------
def _np_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _np_bc(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def numpy_train(x, w, b, eps=1e-5):
    axes = _np_axes(x)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    invstd = 1 / np.sqrt(var + eps)
    return (x - _np_bc(mean, x)) * _np_bc(invstd * w, x) + _np_bc(b, x), mean, invstd


def numpy_eval(x, w, b, rm, rv, eps=1e-5):
    scale = w / np.sqrt(rv + eps)
    return x * _np_bc(scale, x) + _np_bc(b - rm * scale, x)


def numpy_backward(gy, x, w, mean, invstd):
    axes = _np_axes(x)
    count = x.size // x.shape[1]
    xhat = (x - _np_bc(mean, x)) * _np_bc(invstd, x)
    gb = gy.sum(axis=axes)
    gw = (gy * xhat).sum(axis=axes)
    gx = (gy - _np_bc(gb / count, x) - xhat * _np_bc(gw / count, x)) * _np_bc(invstd * w, x)
    return gx, gw, gb


# -- float64 reference for the check ------------------------------------------------
def _reference(mode, x, gy, w, b, rm, rv, eps=1e-5):
    x64 = x.astype(np.float64)
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    if mode == "eval":
        return numpy_eval(x64, w64, b64, rm.astype(np.float64), rv.astype(np.float64), eps)
    y, mean, invstd = numpy_train(x64, w64, b64, eps)
    if mode == "train":
        return y
    return numpy_backward(gy.astype(np.float64), x64, w64, mean, invstd)[0]


def _max_err(got, want):
    """Largest error relative to the reference's spread (its std, at least 1e-30)."""
    return float(np.abs(got.astype(np.float64) - want).max() / max(want.std(), 1e-30))


def _torch_runner(torch, mode, x, gy, w, b, rm, rv):
    tx = torch.from_numpy(np.ascontiguousarray(x))
    if x.ndim >= 4 and not x.flags.c_contiguous:
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        tx = tx.contiguous(memory_format=fmt)
    tw, tb = torch.from_numpy(w.copy()), torch.from_numpy(b.copy())
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    if mode == "train":
        return lambda: torch.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)[0]
    if mode == "eval":
        return lambda: torch.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, 1e-5)[0]
    tgy = torch.from_numpy(np.ascontiguousarray(gy))
    if x.ndim >= 4 and not x.flags.c_contiguous:
        tgy = tgy.contiguous(memory_format=fmt)
    _, sm, si = torch.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
    return lambda: torch.ops.aten.native_batch_norm_backward(
        tgy, tx, tw, trm, trv, sm, si, True, 1e-5, [True, True, True])[0]


def run_case(case, mode, dtype, threads, bandwidth, torch=None, budget_s=0.5):
    x = _make(case, dtype, seed=1)
    gy = _make(case, dtype, seed=2)
    c = case.shape[1]
    rng = np.random.default_rng(3)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype) * 0.1
    rv = rng.uniform(0.5, 1.5, c).astype(dtype)
    rm_work, rv_work = rm.copy(), rv.copy()
    _, sm, si = batch_norm_forward(x, w, b, rm_work, rv_work, True, 0.1, 1e-5)
    buf = np.empty_like(x)
    if mode == "train":
        fast = lambda out=None: batch_norm_forward(x, w, b, rm_work, rv_work, True, 0.1,
                                                   1e-5, out=out)[0]
        slow = lambda: numpy_train(x, w, b)[0]
    elif mode == "eval":
        fast = lambda out=None: batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5,
                                                   out=out)[0]
        slow = lambda: numpy_eval(x, w, b, rm, rv)
    else:
        fast = lambda out=None: batch_norm_backward(gy, x, w, None, None, sm, si, True, 1e-5,
                                                    out=out)[0]
        mean, invstd = sm.astype(np.float64), si.astype(np.float64)
        slow = lambda: numpy_backward(gy, x, w, mean, invstd)[0]
    min_repeat = 21 if x.nbytes < (64 << 20) else 11
    contenders = [fast, lambda: fast(buf)]
    tfn = None
    if torch is not None:
        tfn = _torch_runner(torch, mode, x, gy, w, b, rm, rv)
        contenders.append(tfn)
    times = _time_alternating(contenders, min_repeat, budget_s)
    fast_ms, out_ms = times[0], times[1]
    numpy_ms = _time(slow, 5, budget_s / 2)
    want = _reference(mode, x, gy, w, b, rm, rv)
    err = _max_err(fast(), want)
    moved = MOVES[mode] * x.nbytes
    floor_ms = 1e3 * moved / (bandwidth * 1e9)
    row = Row(case.name, case.shape, case.layout, np.dtype(dtype).name, mode, threads,
              fast_ms, out_ms, moved / out_ms / 1e6, 100 * floor_ms / out_ms, numpy_ms,
              vs_numpy=numpy_ms / fast_ms, max_err=err)
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    row.ok = err < tol
    if tfn is not None:
        row.torch_ms = times[2]
        row.vs_torch = row.torch_ms / fast_ms
        row.torch_err = _max_err(tfn().numpy(), want)
    return row


HEADER = (f"{'case':<27} {'shape':<20} {'dtype':<7} {'mode':<8} {'ms':>8} {'out= ms':>8} "
          f"{'GB/s':>6} {'floor%':>6} {'vs np':>6} {'torch ms':>8} {'vs torch':>8} "
          f"{'err':>8}")


def format_row(r):
    shape = "x".join(map(str, r.shape))
    torch_ms = f"{r.torch_ms:8.2f}" if r.torch_ms is not None else f"{'-':>8}"
    vs_torch = f"{r.vs_torch:7.2f}x" if r.vs_torch is not None else f"{'-':>8}"
    flag = "" if r.ok else "  WRONG"
    return (f"{r.case:<27} {shape:<20} {r.dtype:<7} {r.mode:<8} {r.fastbn_ms:8.2f} "
            f"{r.out_ms:8.2f} {r.gbps:6.1f} {r.floor_pct:5.0f}% {r.vs_numpy:5.1f}x {torch_ms} "
            f"{vs_torch} {r.max_err:8.1e}{flag}")


def run(quick=False, threads=None, dtypes=("float32",), layouts=None, modes=MODES,
        json_path=None, use_torch=True, out=sys.stdout, progress=sys.stderr):
    """Run the benchmark table; return the rows (and write them to ``json_path``)."""
    if threads is not None:
        set_num_threads(threads)
    threads = get_num_threads()
    torch = None
    torch_text = "not used (--no-torch)"
    if use_torch:
        torch_text = "not installed"
        try:
            import torch

            torch.set_num_threads(threads)
            torch_text = torch.__version__
        except ImportError:
            torch = None
    cases = [c for c in CASES if c.quick == quick]
    if layouts:
        cases = [c for c in cases if c.layout in layouts]
    bandwidth = stream_bandwidth(threads, nbytes=(64 << 20) if quick else (256 << 20))
    print(f"fastbn bench: {threads} thread(s), OpenMP {'on' if _cpu.HAVE_OPENMP else 'off'}, "
          f"stream bandwidth {bandwidth:.1f} GB/s (copy, read+write), torch {torch_text}",
          file=out)
    print(HEADER, file=out)
    rows = []
    total = len(cases) * len(dtypes) * len(modes)
    for case in cases:
        for dtype in dtypes:
            for mode in modes:
                print(f"[{len(rows) + 1}/{total}] {case.name} {dtype} {mode} ...",
                      file=progress, flush=True)
                r = run_case(case, mode, np.dtype(dtype), threads, bandwidth, torch,
                             budget_s=0.2 if quick else 0.5)
                rows.append(r)
                print(format_row(r), file=out, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"threads": threads, "bandwidth_gbps": bandwidth,
                       "torch": torch.__version__ if torch else None,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"{len(bad)} row(s) failed the float64 reference check", file=out)
    return rows
