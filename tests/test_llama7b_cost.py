"""benchmarks/llama7b_cost.py at a tiny shape: it runs and writes what the README's tables read (no timings)."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO


def test_cost_benchmark_runs_at_a_tiny_shape(tmp_path):
    spec = importlib.util.spec_from_file_location("llama7b_cost", REPO / "benchmarks" / "llama7b_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            str(tmp_path),
            "--hidden=128",
            "--intermediate=256",
            "--heads=4",
            "--vocab=128",
            "--calib=4x16",
            "--batch=2",
            "--train-seq=16",
            "--threads=1",
            "--measure=prune,gptq-w4g128,train-ckpt",
        ]
    )
    result = json.loads((tmp_path / "llama7b_cost.json").read_text())
    assert {"machine", "threads", "torch", "dtype", "shape", "calibration", "gemm_tflops", "formulas"} <= set(result)
    assert result["calibration"] == [4, 16] and result["machine"]["isa"] is not None
    assert set(result["measurements"]) == {"prune", "gptq-w4g128", "train-ckpt"}
    for row in result["measurements"].values():
        assert len(row["seconds_per_layer"]) == 2 and row["peak_rss_gb"] > 0 and row["seconds"] > 0
    assert set(result["formulas"]) == set(result["measurements"])
    assert (tmp_path / "llama7b_cost.md").read_text().count("\n| ") >= 8


def test_gpu_extrapolation_rows():
    spec = importlib.util.spec_from_file_location("llama7b_cost", REPO / "benchmarks" / "llama7b_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.gpu_extrapolation()
    training = [r for r in rows if r["gpus"] > 1]
    assert [r["gpus"] for r in training] == [2, 4, 8]
    assert training[0]["gpu_gb"] > training[1]["gpu_gb"] > training[2]["gpu_gb"]  # FSDP shards the optimizer
    assert all(r["hours"] > 0 and r["gpu_gb"] > 0 for r in rows)
    assert "| stage |" in bench.gpu_markdown(rows)
