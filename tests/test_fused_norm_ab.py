"""benchmarks/fused_norm_ab.py on a tiny model: both norms really alternate in the model (the runtime's
module, then transformers' put back), both paths are timed, and the tokens agree."""

import importlib.util

import pytest
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sparsify.inference.kernels import kernel_isa, ops
from sparsify.inference.runtime import RMSNorm
from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("fused_norm_ab", REPO / "benchmarks" / "fused_norm_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(kernel_isa() == "torch", reason="no compiled kernels")
def test_decode_with_both_norms(monkeypatch):
    script = _script()
    dims = {"hidden": 128, "intermediate": 256, "heads": 4, "vocab": 96}
    base = script.build_decode_model(layers=1, **dims)
    model, norms = script.with_both_norms(base, int8=True, lm_head=True)
    assert set(norms) == {"model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"}
    script.set_norms(model, norms, "transformers")
    assert all(type(model.get_submodule(n)) is LlamaRMSNorm for n in norms)
    script.set_norms(model, norms, "ours")
    assert all(isinstance(model.get_submodule(n), RMSNorm) for n in norms)

    result = script.run(layers=1, rounds=2, steps=3, **dims)
    assert set(result["rows"]) == {f"{v}/{p}" for v in ("int8_head", "bf16") for p in ("engine", "forward")}
    for row in result["rows"].values():
        assert row["transformers_ms"] > 0 and row["ours_ms"] > 0
        assert row["speedup"] == pytest.approx(row["transformers_ms"] / row["ours_ms"])
        assert row["same_tokens"]
    assert result["machine"]["kernels"] == kernel_isa()


def test_refuses_to_run_without_kernels(monkeypatch):
    monkeypatch.setitem(ops._isa_cache, "isa", -1)  # the pure-torch path
    with pytest.raises(SystemExit, match="no compiled kernels"):
        _script().run(layers=1)


def test_the_decode_ab_command_line(tmp_path):
    """The shared command line passes its options to ``run`` and writes the result where it says."""
    import json

    from sparsify.bench.cpu import decode_ab_main

    def run(layers: int, rounds: int, steps: int) -> dict:
        return {"layers": layers, "rounds": rounds, "steps": steps}

    out = tmp_path / "out"
    assert decode_ab_main([str(out), "--layers", "3", "--steps", "4"], "doc", run, "r.json", rounds=5) == {
        "layers": 3,
        "rounds": 5,
        "steps": 4,
    }
    assert json.loads((out / "r.json").read_text()) == {"layers": 3, "rounds": 5, "steps": 4}
