"""What the output cache saves: bench rows with fastbn's output cache off and on.

    python benchmarks/output_cache.py [--rounds R] [--threads N] [--no-torch]

For the large rows of ``python -m fastbn bench`` (outputs above glibc's 32 MiB mmap
threshold, whose memory goes back to the system when freed), runs each row's
``fastbn.bench.run_case`` with ``fastbn.set_output_cache(0)`` and with the default
limit, in alternating rounds, and prints fastbn's time per call (``ms``: a new
output every call, dropped right after; ``out= ms``: into a reused buffer, the
kernel alone) and PyTorch's. With the cache on, ``ms`` should come down to about
``out= ms``. Last, a strided input (every other column of a (32, 64, 112, 224)
float32 array), which fastbn copies to C order before the kernel: forward-train time
with the cache off and on (median of 6 calls after 2 warm-ups, per round).
"""
import time
import argparse

import numpy as np

import fastbn
from fastbn import _memory, bench

ROWS = [("resnet conv1 NCHW (large)", "float32"), ("resnet conv2 NHWC", "float64"),
        ("resnet conv2 NCHW", "float64")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    threads = args.threads or fastbn.get_num_threads()
    fastbn.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    bandwidth = bench.stream_bandwidth(threads)
    cases = {c.name: c for c in bench.CASES}
    print(f"{threads} thread(s); per cell: fastbn ms / out= ms / PyTorch ms")
    try:
        for name, dtype in ROWS:
            for mode in bench.MODES:
                cells = []
                for _ in range(args.rounds):
                    for limit in (0, _memory.DEFAULT_LIMIT):
                        fastbn.set_output_cache(limit)
                        r = bench.run_case(cases[name], mode, np.dtype(dtype), threads,
                                           bandwidth, torch=torch)
                        t = "-" if r.torch_ms is None else f"{r.torch_ms:.2f}"
                        cells.append(f"{'on ' if limit else 'off'} {r.fastbn_ms:6.2f} / "
                                     f"{r.out_ms:6.2f} / {t}")
                print(f"{name} {dtype} {mode}: " + " | ".join(cells), flush=True)
        x = np.random.default_rng(0).standard_normal((32, 64, 112, 224),
                                                     dtype=np.float32)[..., ::2]
        cells = []
        for _ in range(args.rounds):
            for limit in (0, _memory.DEFAULT_LIMIT):
                fastbn.set_output_cache(limit)
                times = []
                for _ in range(8):
                    t0 = time.perf_counter()
                    fastbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
                    times.append(time.perf_counter() - t0)
                cells.append(f"{'on ' if limit else 'off'} {1e3 * np.median(times[2:]):6.2f}")
        print("strided (32, 64, 112, 112) float32 train: " + " | ".join(cells), flush=True)
    finally:
        fastbn.set_output_cache(_memory.DEFAULT_LIMIT)


if __name__ == "__main__":
    main()
