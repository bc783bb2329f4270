"""Summarize several ``python -m fastbn bench --json`` runs of the same table.

On a shared machine one run's ratio can be off by a third; the median over runs,
with the range beside it, is the number to quote.

    for i in 1 2 3; do python -m fastbn bench --json run$i.json; done
    python benchmarks/summarize.py run1.json run2.json run3.json [--json median.json]

``--json`` writes the medians in the bench's JSON layout (``benchmarks/plot.py``
draws them). Runs of ``--device cuda`` work too (all runs of one kind): their
second and third columns are the wall-clock time and the percentage of the
device's copy bandwidth instead of ``out=`` time and floor percentage.
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


# Per kind of run: (key of the second time, its column title, key of the percentage,
# its column title). GPU runs (``--device cuda``) name their device at the top.
COLUMNS = {"cpu": ("out_ms", "out= ms", "floor_pct", "floor%"),
           "cuda": ("fastbn_wall_ms", "wall ms", "copy_pct", "copy%")}


def _kind(runs):
    kinds = {"cuda" if "device" in run else "cpu" for run in runs}
    if len(kinds) > 1:
        raise SystemExit("summarize.py: the files mix CPU and --device cuda runs")
    return kinds.pop()


def _table(runs):
    second, _, pct, _ = COLUMNS[_kind(runs)]
    table = {}
    for run in runs:
        for r in run["rows"]:
            key = (r["case"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"])
            table.setdefault(key, []).append(
                (r["fastbn_ms"], r[second], r["torch_ms"], r["vs_torch"], r[pct]))
    return table


def summarize(paths):
    """Rows keyed by (case, shape, dtype, mode): lists of
    (fastbn ms, out= ms, torch ms, ratio, floor %)."""
    return _table(_load(paths))


def median_rows(table, kind="cpu"):
    """The medians as bench JSON rows (vs_torch: the median of the runs' ratios)."""
    second_key, _, pct_key, _ = COLUMNS[kind]
    rows = []
    for (case, shape, dtype, mode), vals in table.items():
        ms, second, torch_ms, ratio, pct = ([v[i] for v in vals] for i in range(5))
        has_torch = all(t is not None for t in torch_ms)
        rows.append({"case": case, "shape": [int(n) for n in shape.split("x")],
                     "dtype": dtype, "mode": mode, "fastbn_ms": statistics.median(ms),
                     second_key: statistics.median(second), pct_key: statistics.median(pct),
                     "torch_ms": statistics.median(torch_ms) if has_torch else None,
                     "vs_torch": statistics.median(ratio) if has_torch else None,
                     "vs_torch_min": min(ratio) if has_torch else None,
                     "vs_torch_max": max(ratio) if has_torch else None, "runs": len(vals)})
    return rows


def format_table(table, runs, kind="cpu"):
    second_key, second, pct_key, pct = COLUMNS[kind]
    lines = [f"median of {runs} runs; vs PyTorch as median [min, max] of the runs' ratios",
             f"{'case':<27} {'shape':<16} {'dtype':<7} {'mode':<8} {'ms':>7} {second:>8} "
             f"{pct:>6} {'torch ms':>9} {'vs PyTorch':>22}"]
    for r in median_rows(table, kind):
        text, torch_text = "-", f"{'-':>9}"
        if r["vs_torch"] is not None:
            text = f"{r['vs_torch']:5.2f}x [{r['vs_torch_min']:4.2f}, {r['vs_torch_max']:4.2f}]"
            torch_text = f"{r['torch_ms']:9.2f}"
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['case']:<27} {shape:<16} {r['dtype']:<7} {r['mode']:<8} "
                     f"{r['fastbn_ms']:7.2f} {r[second_key]:8.2f} {r[pct_key]:5.0f}% "
                     f"{torch_text} {text:>22}")
    return "\n".join(lines)


def main(argv):
    json_out = None
    if "--json" in argv:
        i = argv.index("--json")
        if i + 1 >= len(argv):
            raise SystemExit("summarize.py: --json needs an output path\n" + __doc__)
        json_out = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    if not argv:
        raise SystemExit(__doc__)
    runs = _load(argv)
    kind = _kind(runs)
    table = _table(runs)
    print(format_table(table, len(argv), kind))
    if json_out:
        if kind == "cuda":
            head = {"runs": argv, "device": runs[0]["device"], "torch": runs[0].get("torch"),
                    "copy_gbps": statistics.median(r["copy_gbps"] for r in runs)}
        else:
            head = {"runs": argv, "threads": runs[0].get("threads"),
                    "torch": runs[0].get("torch"),
                    "bandwidth_gbps": statistics.median(r.get("bandwidth_gbps", 0.0)
                                                        for r in runs)}
        with open(json_out, "w") as f:
            json.dump(dict(head, rows=median_rows(table, kind)), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
