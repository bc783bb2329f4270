"""Command line: ``python -m fastbn bench [...]`` and ``python -m fastbn config``."""
import argparse
import os
import sys


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _json_path(path):
    """A path the results can be written to (checked before the benchmark runs)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}")
    return path


def _progress(text):
    print(text, file=sys.stderr, flush=True)


def _parser():
    p = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark fastbn against PyTorch and NumPy")
    b.add_argument("--quick", action="store_true", help="small shapes, runs in seconds")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: all)")
    b.add_argument("--dtype", action="append", choices=["float32", "float64"],
                   help="repeatable; default float32")
    b.add_argument("--layout", action="append", choices=["nchw", "channels_last", "nc"],
                   help="repeatable; default all")
    b.add_argument("--mode", action="append", choices=["train", "eval", "backward"],
                   help="repeatable; default all")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    b.add_argument("--json", metavar="PATH", type=_json_path,
                   help="also write the rows as JSON")
    sub.add_parser("config", help="print build and device facts (fastbn.show_config())")
    p.bench_parser = b         # for errors worded against ``bench``'s own usage
    return p


def _run_cuda_bench(parser, args):
    """``bench --device cuda``: exit status 2 for a usage or machine problem, 1 for a wrong row."""
    cpu_only = [f"--{name}" for name in ("threads", "layout", "mode")
                if getattr(args, name) is not None]
    if cpu_only:
        parser.error(f"{', '.join(cpu_only)}: only for the CPU table (--device cpu)")
    from . import _bench_cuda

    try:
        rows = _bench_cuda.run(quick=args.quick, json_path=args.json, progress=_progress,
                               dtypes=tuple(args.dtype or ["float32"]),
                               use_torch=not args.no_torch)
    except _bench_cuda.NoDevice as exc:
        parser.exit(2, f"python -m {exc}\n")
    print(_bench_cuda.format_table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "config":
        from . import show_config

        show_config()
        return 0
    if args.device == "cuda":
        return _run_cuda_bench(parser.bench_parser, args)
    from . import bench

    rows = bench.run(quick=args.quick, threads=args.threads,
                     dtypes=tuple(args.dtype or ["float32"]), layouts=args.layout,
                     modes=tuple(args.mode or bench.MODES), json_path=args.json,
                     use_torch=not args.no_torch)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
