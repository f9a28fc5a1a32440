"""benchmarks/gather_decode_ab.py on a tiny model, on the AVX2 path: four models built as described
(the index where it should be and nowhere else), timed alternately, same greedy tokens both ways."""

import importlib.util

import pytest
import torch

from sparsify.inference.kernels import kernel_isa, ops
from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("gather_decode_ab", REPO / "benchmarks" / "gather_decode_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(kernel_isa() not in ("avx2", "avx512"), reason="no AVX2 kernels on this CPU")
def test_decode_with_and_without_the_gather_index(monkeypatch):
    monkeypatch.setitem(ops._isa_cache, "isa", 1)  # the AVX2 path
    dims = {"hidden": 128, "intermediate": 256, "heads": 4, "vocab": 96}
    result = _script().run(layers=1, rounds=2, steps=3, prompt=torch.tensor([[1, 5, 9, 2]]), **dims)
    assert set(result["rows"]) == {"int8", "int4"}
    for row in result["rows"].values():
        assert row["expand_ms"] > 0 and row["gather_ms"] > 0
        assert row["speedup"] == pytest.approx(row["expand_ms"] / row["gather_ms"])
        assert row["same_tokens"]
    assert ops.GATHER_MIN_SPARSITY == 0.6  # the benchmark leaves the runtime's threshold as it was


def test_refuses_to_run_off_the_avx2_path(monkeypatch):
    monkeypatch.setitem(ops._isa_cache, "isa", 0)  # the generic path
    with pytest.raises(SystemExit, match="gather index is AVX2's"):
        _script().run(layers=1)
