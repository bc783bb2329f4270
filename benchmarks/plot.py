"""Plot a ``python -m fastbn bench --json PATH`` result: speed-up over PyTorch per row.

    pip install -e ".[plot]"
    python -m fastbn bench --json benchmarks/results/cpu.json
    python benchmarks/plot.py benchmarks/results/cpu.json benchmarks/results/cpu.png

Also reads ``--device cuda`` runs and ``summarize.py --json`` medians of either.
"""
import json
import sys


def main(json_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r.get("vs_torch")]
    if not rows:
        raise SystemExit("no PyTorch comparison in this file (was torch installed?)")
    modes = ["train", "eval", "backward"]
    cases = []
    for r in rows:
        key = (r["case"], r["dtype"])
        if key not in cases:
            cases.append(key)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cases) + 1.5))
    height = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = []
        for case in cases:
            match = [r["vs_torch"] for r in rows
                     if (r["case"], r["dtype"]) == case and r["mode"] == mode]
            values.append(match[0] if match else float("nan"))
        ax.barh([k + i * height for k in range(len(cases))], values, height, label=mode)
    ax.axvline(1.0, color="black", linewidth=1)
    # log scale: rows near parity stay readable beside the 50x ones
    ax.set_xscale("log")
    top = max(r["vs_torch"] for r in rows)
    ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100) if t <= 2 * max(top, 1)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.set_yticks([k + height for k in range(len(cases))])
    ax.set_yticklabels([f"{c} ({d})" for c, d in cases])
    ax.invert_yaxis()
    runs = f", median of {len(data['runs'])} runs" if "runs" in data else ""
    if "device" in data:     # a --device cuda run
        ax.set_xlabel("speed-up over PyTorch CUDA (higher is better; 1 = same speed)")
        ax.set_title(f"fastbn vs torch {data.get('torch')} — {data['device']}, "
                     f"copy {data['copy_gbps']:.0f} GB/s{runs}")
    else:
        ax.set_xlabel("speed-up over PyTorch CPU (higher is better; 1 = same speed)")
        ax.set_title(f"fastbn vs torch {data.get('torch')} — {data['threads']} threads, "
                     f"stream {data['bandwidth_gbps']:.0f} GB/s{runs}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
