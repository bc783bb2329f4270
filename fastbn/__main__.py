"""Command line: ``python -m fastbn bench [...]`` and ``python -m fastbn config``."""
import argparse
import sys


def _parser():
    p = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark fastbn against PyTorch and NumPy")
    b.add_argument("--quick", action="store_true", help="small shapes, runs in seconds")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    b.add_argument("--dtype", action="append", choices=["float32", "float64"],
                   help="repeatable; default float32")
    b.add_argument("--layout", action="append", choices=["nchw", "channels_last", "nc"],
                   help="repeatable; default all")
    b.add_argument("--mode", action="append", choices=["train", "eval", "backward"],
                   help="repeatable; default all")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    b.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    sub.add_parser("config", help="print build and device facts (fastbn.show_config())")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "config":
        from . import show_config

        show_config()
        return 0
    if args.device == "cuda":
        from . import _bench_cuda

        rows = _bench_cuda.run(quick=args.quick, json_path=args.json)
        print(_bench_cuda.format_table(rows))
        return 0
    from . import bench

    rows = bench.run(quick=args.quick, threads=args.threads,
                     dtypes=tuple(args.dtype or ["float32"]), layouts=args.layout,
                     modes=tuple(args.mode or bench.MODES), json_path=args.json,
                     use_torch=not args.no_torch)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
