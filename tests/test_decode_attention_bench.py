"""benchmarks/decode_attention.py on tiny shapes: every variant timed, checked against float64 first,
and the engine timed with either attention (the real shapes run by hand, see the script's docstring)."""

import importlib.util
import json

import pytest

from sparsify.inference.kernels import load_extension
from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("decode_attention_bench", REPO / "benchmarks" / "decode_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--heads", "4", "--kv-heads", "4", "2", "--head-dim", "16", "--repeats", "3"]
TINY_MODEL = ["--engine-layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "100"]


@pytest.mark.skipif(load_extension() is None, reason="no compiled kernels here")
def test_benchmark_times_every_path_and_the_engine(tmp_path):
    result = _script().main([str(tmp_path), "--lengths", "5", "40", *TINY, *TINY_MODEL])
    assert json.loads((tmp_path / "decode_attention.json").read_text())["kernel"] == result["kernel"]
    assert result["machine"]["cpu_isa"]
    variants = {r["variant"] for r in result["kernel"]}
    assert "torch_sdpa" in variants and any(v.startswith("kernel@") for v in variants)
    assert len(result["kernel"]) == len(variants) * 2 * 2  # lengths × kv-head counts
    for r in result["kernel"]:
        assert r["ms"] > 0 and r["max_abs_error"] < 2e-2
        assert r["gbps"] == pytest.approx(r["cache_mb"] / r["ms"])
    assert {(r["length"], r["variant"]) for r in result["engine"]} == {
        (n, v) for n in (5, 40) for v in ("torch_sdpa", "kernel")
    }
    sdpa = [r for r in result["engine"] if r["variant"] == "torch_sdpa"]
    assert all(r["speedup_vs_sdpa"] == 1.0 for r in sdpa)


@pytest.mark.skipif(load_extension() is None, reason="no compiled kernels here")
def test_a_wrong_kernel_is_refused_not_timed(tmp_path, monkeypatch):
    bench = _script()
    right = bench.decode_attention
    monkeypatch.setattr(bench, "decode_attention", lambda *a, **k: right(*a, **k) * 1.1)
    with pytest.raises(AssertionError, match="against float64"):
        bench.main([str(tmp_path), "--lengths", "9", *TINY, "--no-engine"])
