"""Summarize several ``python -m fastbn bench --json`` runs of the same table.

On a shared machine one run's ratio can be off by a third; the median over runs,
with the range beside it, is the number to quote.

    for i in 1 2 3; do python -m fastbn bench --json run$i.json; done
    python benchmarks/summarize.py run1.json run2.json run3.json [--json median.json]

``--json`` writes the medians in the bench's JSON layout (``benchmarks/plot.py``
draws them).
"""
import json
import statistics
import sys


def _load(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def _table(runs):
    table = {}
    for run in runs:
        for r in run["rows"]:
            key = (r["case"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"])
            table.setdefault(key, []).append(
                (r["fastbn_ms"], r["out_ms"], r["torch_ms"], r["vs_torch"], r["floor_pct"]))
    return table


def summarize(paths):
    """Rows keyed by (case, shape, dtype, mode): lists of
    (fastbn ms, out= ms, torch ms, ratio, floor %)."""
    return _table(_load(paths))


def median_rows(table):
    """The medians as bench JSON rows (vs_torch: the median of the runs' ratios)."""
    rows = []
    for (case, shape, dtype, mode), vals in table.items():
        ms, out_ms, torch_ms, ratio, floor = ([v[i] for v in vals] for i in range(5))
        has_torch = all(t is not None for t in torch_ms)
        rows.append({"case": case, "shape": [int(n) for n in shape.split("x")],
                     "dtype": dtype, "mode": mode, "fastbn_ms": statistics.median(ms),
                     "out_ms": statistics.median(out_ms), "floor_pct": statistics.median(floor),
                     "torch_ms": statistics.median(torch_ms) if has_torch else None,
                     "vs_torch": statistics.median(ratio) if has_torch else None,
                     "vs_torch_min": min(ratio) if has_torch else None,
                     "vs_torch_max": max(ratio) if has_torch else None, "runs": len(vals)})
    return rows


def format_table(table, runs):
    lines = [f"median of {runs} runs; vs PyTorch as median [min, max] of the runs' ratios",
             f"{'case':<27} {'shape':<16} {'dtype':<7} {'mode':<8} {'ms':>7} {'out= ms':>8} "
             f"{'floor%':>6} {'torch ms':>9} {'vs PyTorch':>22}"]
    for r in median_rows(table):
        text, torch_text = "-", f"{'-':>9}"
        if r["vs_torch"] is not None:
            text = f"{r['vs_torch']:5.2f}x [{r['vs_torch_min']:4.2f}, {r['vs_torch_max']:4.2f}]"
            torch_text = f"{r['torch_ms']:9.2f}"
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['case']:<27} {shape:<16} {r['dtype']:<7} {r['mode']:<8} "
                     f"{r['fastbn_ms']:7.2f} {r['out_ms']:8.2f} {r['floor_pct']:5.0f}% "
                     f"{torch_text} {text:>22}")
    return "\n".join(lines)


def main(argv):
    json_out = None
    if "--json" in argv:
        i = argv.index("--json")
        json_out = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    if not argv:
        raise SystemExit(__doc__)
    runs = _load(argv)
    table = _table(runs)
    print(format_table(table, len(argv)))
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"runs": argv, "threads": runs[0].get("threads"),
                       "torch": runs[0].get("torch"),
                       "bandwidth_gbps": statistics.median(r.get("bandwidth_gbps", 0.0)
                                                           for r in runs),
                       "rows": median_rows(table)}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
