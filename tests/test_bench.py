"""The benchmark command runs, checks its results and writes JSON (tiny shapes only)."""
import io
import json

import numpy as np

from fastbn import bench
from fastbn.__main__ import main


def test_bench_rows_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CASES", [
        bench.Case("tiny NCHW", (4, 3, 8, 8), "nchw", quick=True),
        bench.Case("tiny NHWC", (4, 3, 8, 8), "channels_last", quick=True),
        bench.Case("tiny NC", (64, 5), "nc", quick=True),
    ])
    path = tmp_path / "out.json"
    out = io.StringIO()
    rows = bench.run(quick=True, dtypes=("float32", "float64"), json_path=str(path),
                     out=out, progress=io.StringIO())
    assert len(rows) == 3 * 2 * 3
    assert all(r.ok for r in rows), [bench.format_row(r) for r in rows if not r.ok]
    assert all(r.fastbn_ms > 0 and r.gbps > 0 and r.vs_numpy > 0 for r in rows)
    data = json.loads(path.read_text())
    assert data["threads"] >= 1 and data["bandwidth_gbps"] > 0
    assert len(data["rows"]) == len(rows)
    text = out.getvalue()
    assert "stream bandwidth" in text and "tiny NHWC" in text


def test_reference_check_catches_a_wrong_kernel(monkeypatch):
    """A row whose result is wrong is flagged, so the bench cannot hide a broken kernel."""
    case = bench.Case("tiny", (4, 3, 8), "nchw")
    real = bench.batch_norm_forward

    def broken(*args, **kwargs):
        y, m, s = real(*args, **kwargs)
        return y + np.float32(1e-2), m, s

    monkeypatch.setattr(bench, "batch_norm_forward", broken)
    row = bench.run_case(case, "eval", np.dtype(np.float32), 1, 10.0, None, budget_s=0.01)
    assert not row.ok


def test_cli_config(capsys):
    assert main(["config"]) == 0
    assert "openmp" in capsys.readouterr().out


def test_summarize_takes_the_median_over_runs(tmp_path):
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "summarize", pathlib.Path(__file__).parent.parent / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    paths = []
    for i, (ms, torch_ms) in enumerate([(1.0, 2.0), (2.0, 2.0), (4.0, 2.0)]):
        row = {"case": "c", "shape": [2, 3], "dtype": "float32", "mode": "eval",
               "fastbn_ms": ms, "out_ms": ms, "torch_ms": torch_ms, "vs_torch": torch_ms / ms,
               "floor_pct": 50.0}
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps({"threads": 2, "torch": "t", "bandwidth_gbps": 30.0,
                                         "rows": [row]}))
    table = summarize.summarize(paths)
    text = summarize.format_table(table, len(paths))
    assert "1.00x [0.50, 2.00]" in text
    assert "median of 3 runs" in text
    out = tmp_path / "median.json"
    summarize.main([str(p) for p in paths] + ["--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["vs_torch"] == 1.0 and row["vs_torch_min"] == 0.5 and row["out_ms"] == 2.0
