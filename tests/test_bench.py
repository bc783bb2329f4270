"""The benchmark command runs, checks its results and writes JSON (tiny shapes only)."""
import io
import json

import numpy as np
import pytest

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


def test_cli_rejects_bad_arguments_before_running(tmp_path, capsys):
    """User mistakes are usage errors (exit 2, one line naming the argument), not tracebacks."""
    for argv, text in [(["bench", "--threads", "0"], "--threads: expected a positive integer"),
                       (["bench", "--threads", "-1"], "--threads: expected a positive integer"),
                       (["bench", "--json", str(tmp_path / "no" / "x.json")], "does not exist"),
                       (["bench", "--json", str(tmp_path)], "cannot write"),
                       (["bench", "--device", "cuda", "--threads", "2", "--mode", "eval"],
                        "--threads, --mode: only for the CPU table")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert text in capsys.readouterr().err


def test_cli_cuda_table(monkeypatch, capsys):
    """--device cuda passes its options on, exits 2 without a device and 1 on a wrong row."""
    from fastbn import _bench_cuda

    def no_device(**kwargs):
        raise _bench_cuda.NoDevice("fastbn bench --device cuda needs a usable CUDA device: none")

    monkeypatch.setattr(_bench_cuda, "run", no_device)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda"])
    assert exc.value.code == 2
    assert "needs a usable CUDA device" in capsys.readouterr().err
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return [{"ok": ok} for ok in (True, False)]

    monkeypatch.setattr(_bench_cuda, "run", fake_run)
    monkeypatch.setattr(_bench_cuda, "format_table", lambda rows: f"{len(rows)} rows")
    assert main(["bench", "--device", "cuda", "--dtype", "float64", "--no-torch"]) == 1
    assert seen["dtypes"] == ("float64",) and seen["use_torch"] is False
    assert capsys.readouterr().out.strip() == "2 rows"


def test_summarize_and_plot_read_gpu_runs(tmp_path, capsys):
    """Files of ``bench --device cuda`` (rows as _bench_cuda.run_case writes them)."""
    import importlib.util
    import pathlib

    def script(name):
        spec = importlib.util.spec_from_file_location(
            name, pathlib.Path(__file__).parent.parent / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    summarize = script("summarize")
    paths = []
    for i, ms in enumerate((1.0, 2.0, 4.0)):
        row = {"case": "c", "shape": [2, 3], "layout": "nchw", "dtype": "float32",
               "mode": "eval", "fastbn_ms": ms, "fastbn_wall_ms": ms + 1, "gbps": 1.0,
               "copy_pct": 40.0, "rotated_inputs": 4, "max_err": 1e-7, "torch_ms": 2.0,
               "torch_wall_ms": 3.0, "vs_torch": 2.0 / ms, "vs_torch_wall": 1.0,
               "torch_err": 1e-7, "ok": True, "device": "GPU"}
        paths.append(tmp_path / f"gpu{i}.json")
        paths[-1].write_text(json.dumps({"device": "GPU", "cupy": "14", "torch": "t",
                                         "copy_gbps": 3000.0, "first_call_s": 1.0,
                                         "rows": [row]}))
    median = tmp_path / "median.json"
    summarize.main([str(p) for p in paths] + ["--json", str(median)])
    text = capsys.readouterr().out
    assert "wall ms" in text and "copy%" in text and "1.00x [0.50, 2.00]" in text
    data = json.loads(median.read_text())
    assert data["device"] == "GPU" and data["rows"][0]["fastbn_wall_ms"] == 3.0
    with pytest.raises(SystemExit, match="--json needs an output path"):
        summarize.main([str(paths[0]), "--json"])
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"threads": 2, "rows": []}))
    with pytest.raises(SystemExit, match="mix CPU and --device cuda"):
        summarize.main([str(paths[0]), str(cpu)])
    pytest.importorskip("matplotlib")
    plot = script("plot")
    for source in (paths[0], median):
        png = tmp_path / (source.stem + ".png")
        plot.main(str(source), str(png))
        assert png.stat().st_size > 1000


def test_small_calls_script_prints_every_row(capsys):
    """benchmarks/small_calls.py (the README's small-call numbers) runs and prints one
    row per case and mode, with positive times and the kernel column for functional rows."""
    import importlib.util
    import pathlib

    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location(
        "small_calls", pathlib.Path(__file__).parent.parent / "benchmarks" / "small_calls.py")
    small_calls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(small_calls)
    torch_threads = torch.get_num_threads()
    try:
        small_calls.main(["--number", "2", "--repeat", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(torch_threads)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 12
    functional = [r for r in rows if r[0] == "functional"]
    assert len(functional) == 9
    for r in functional:
        fast, kernel, ref = (float(v) for v in r[-5:-2])
        assert fast > 0 and kernel > 0 and ref > 0 and r[-1] == "1"
