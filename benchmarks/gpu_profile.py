"""Where the GPU time and the host time of a fastbn CUDA call go (for a lent GPU machine).

    PYTHONPATH=. python benchmarks/gpu_profile.py [--out DIR] [--quick] [--sweep SETTINGS]

1. Per-kernel device times of fastbn and PyTorch for the CUDA bench table
   (``fastbn._bench_cuda.CASES``), read from a PyTorch profiler trace: CUPTI
   records every kernel of the process, CuPy's launches included.
2. Host cost per call (small and large input): the time to queue a call without
   synchronising, and the synchronised wall time, fastbn's functional layer
   against PyTorch's.
3. cProfile of the small calls: which Python functions the host time goes to.

Needs CuPy and PyTorch with CUDA. Prints the tables; with ``--out`` also writes
``profile.txt`` and the raw ``kernels.json`` there.
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import numpy as np


def _kernel_times(torch, fn, calls):
    """{kernel name: (launches per call, mean us per launch)} of ``calls`` calls of fn(i)."""
    from torch.profiler import ProfilerActivity, profile
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(i)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    per = {}
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") == "kernel":
            per.setdefault(ev["name"], []).append(float(ev["dur"]))
    return {k: (len(v) / calls, statistics.mean(v)) for k, v in per.items()}


def _short(name):
    for prefix in ("void ", "fastbn::"):
        name = name.replace(prefix, "")
    return name if len(name) <= 70 else name[:67] + "..."


def kernel_table(cupy, torch, quick, emit, who_list=("fastbn", "torch"), tag=""):
    from fastbn import _bench_cuda as bc
    import fastbn
    rows = []
    emit(f"{tag}{'case':<25} {'mode':<8} {'who':<6} {'us':>8}  kernels (us per launch x "
         f"launches)")
    for case in [c for c in bc.CASES if c.quick == quick]:
        for mode in bc.MODES:
            xs, gys, saved, (w, b, rm, rv) = bc.case_inputs(cupy, case, mode,
                                                            np.dtype(np.float32))
            k = len(xs)
            fns = {"fastbn": bc._fastbn_call(fastbn, mode, xs, gys, saved, w, b, rm.copy(),
                                             rv.copy()),
                   "torch": bc._torch_call(torch, mode, xs, gys, w, b, rm, rv)}
            for who, fn in fns.items():
                if who not in who_list:
                    continue
                per = _kernel_times(torch, fn, calls=2 * k)
                total = sum(n * us for n, us in per.values())
                detail = ", ".join(f"{_short(name)} {us:.1f}x{n:g}"
                                   for name, (n, us) in sorted(per.items(),
                                                               key=lambda kv: -kv[1][1]))
                emit(f"{tag}{case.name:<25} {mode:<8} {who:<6} {total:8.1f}  {detail}")
                rows.append({"tag": tag, "case": case.name, "mode": mode, "who": who,
                             "total_us": total,
                             "kernels": {n: list(v) for n, v in per.items()}})
            del xs, gys, saved, fns
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
    return rows


def _calls(cupy, torch, shape):
    """{(who, mode): fn()} for one float32 input of ``shape``."""
    import fastbn
    rs = cupy.random.RandomState(0)
    x = rs.standard_normal(shape, dtype=cupy.float32)
    gy = rs.standard_normal(shape, dtype=cupy.float32)
    c = shape[1]
    w, b = cupy.ones(c, cupy.float32), cupy.zeros(c, cupy.float32)
    rm, rv = cupy.zeros(c, cupy.float32), cupy.ones(c, cupy.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    tx, tgy = torch.as_tensor(x, device="cuda"), torch.as_tensor(gy, device="cuda")
    tw, tb = torch.as_tensor(w, device="cuda"), torch.as_tensor(b, device="cuda")
    trm, trv = torch.as_tensor(rm, device="cuda"), torch.as_tensor(rv, device="cuda")
    _, tmean, tinv = torch.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
    fbn = torch.nn.functional.batch_norm
    back = torch.ops.aten.native_batch_norm_backward
    return {
        ("fastbn", "train"): lambda: fastbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5),
        ("fastbn", "eval"): lambda: fastbn.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5),
        ("fastbn", "backward"): lambda: fastbn.batch_norm_backward(gy, x, w, None, None, mean,
                                                                   invstd, True, 1e-5),
        ("torch", "train"): lambda: fbn(tx, trm, trv, tw, tb, True, 0.1, 1e-5),
        ("torch", "eval"): lambda: fbn(tx, trm, trv, tw, tb, False, 0.1, 1e-5),
        ("torch", "backward"): lambda: back(tgy, tx, tw, None, None, tmean, tinv, True, 1e-5,
                                            [True, True, True]),
    }


def host_table(cupy, torch, emit, shapes=((32, 128), (32, 64, 56, 56))):
    sync = cupy.cuda.Device().synchronize
    rows = []
    emit(f"{'shape':<16} {'mode':<8} {'fastbn queue us':>15} {'torch queue us':>14} "
         f"{'fastbn wall us':>14} {'torch wall us':>13}")
    for shape in shapes:
        fns = _calls(cupy, torch, shape)
        for mode in ("train", "eval", "backward"):
            res = {}
            for who in ("fastbn", "torch"):
                fn = fns[(who, mode)]
                for _ in range(20):
                    fn()
                sync()
                queue = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    for _ in range(50):
                        fn()
                    queue.append((time.perf_counter() - t0) / 50)
                    sync()
                wall = []
                for _ in range(100):
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    wall.append(time.perf_counter() - t0)
                res[who] = (1e6 * statistics.median(queue), 1e6 * statistics.median(wall))
            emit(f"{'x'.join(map(str, shape)):<16} {mode:<8} {res['fastbn'][0]:15.1f} "
                 f"{res['torch'][0]:14.1f} {res['fastbn'][1]:14.1f} {res['torch'][1]:13.1f}")
            rows.append({"shape": list(shape), "mode": mode, "fastbn": res["fastbn"],
                         "torch": res["torch"]})
    return rows


def host_profile(cupy, torch, emit, shape=(32, 128), calls=2000):
    fns = _calls(cupy, torch, shape)
    for mode in ("train", "eval", "backward"):
        fn = fns[("fastbn", mode)]
        for _ in range(50):
            fn()
        cupy.cuda.Device().synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        cupy.cuda.Device().synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(22)
        emit(f"--- cProfile, fastbn {mode} {shape}, {calls} calls (tottime) ---")
        emit("\n".join(line for line in buf.getvalue().splitlines()[6:] if line.strip()))


def sweep(cupy, torch, quick, emit, spec):
    from fastbn import _gpu
    rows = []
    for setting in spec.split(";"):
        saved = {}
        for item in filter(None, setting.split(",")):
            key, value = item.split("=")
            saved[key] = getattr(_gpu, key)
            setattr(_gpu, key, int(value))
        _gpu._reduce_launch.cache_clear()
        _gpu._elementwise_launch.cache_clear()
        try:
            rows += kernel_table(cupy, torch, quick, emit, ("fastbn",), tag=f"[{setting}] ")
        finally:
            for key, value in saved.items():
                setattr(_gpu, key, value)
            _gpu._reduce_launch.cache_clear()
            _gpu._elementwise_launch.cache_clear()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for profile.txt and kernels.json")
    ap.add_argument("--quick", action="store_true", help="the bench's small cases")
    ap.add_argument("--skip", default="",
                    help="comma list of parts to skip: kernels,host,cprofile")
    ap.add_argument("--sweep", default="",
                    help="';'-separated settings of fastbn._gpu's launch constants, e.g. "
                         "'TARGET_BLOCKS=528;TARGET_BLOCKS=528,INNER_TX=16': fastbn's kernel "
                         "table under each")
    args = ap.parse_args(argv)
    import cupy
    import torch
    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    skip = set(filter(None, args.skip.split(",")))
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    emit(f"device {name.decode() if isinstance(name, bytes) else name}, CuPy {cupy.__version__},"
         f" torch {torch.__version__}")
    out = {}
    if "kernels" not in skip:
        out["kernels"] = kernel_table(cupy, torch, args.quick, emit)
    if args.sweep:
        out["sweep"] = sweep(cupy, torch, args.quick, emit, args.sweep)
    if "host" not in skip:
        out["host"] = host_table(cupy, torch, emit)
    if "cprofile" not in skip:
        host_profile(cupy, torch, emit)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
