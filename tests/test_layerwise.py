"""The layer-wise driver on a tiny random Llama: capture, propagation, resume, iterative pruning, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from sparsify.sparsity import layerwise
from sparsify.sparsity.layerwise import PruneResult, prune_model
from sparsify.sparsity.masks import check_masks, prunable_linear_names, sparsity_report
from sparsify.sparsity.pruning import PruneConfig
from tests.conftest import tiny_llama

N_SAMPLES, SEQ_LEN = 6, 12


@pytest.fixture(scope="module")
def dense() -> LlamaForCausalLM:
    return tiny_llama().eval()


@pytest.fixture()
def model(dense) -> LlamaForCausalLM:
    return copy.deepcopy(dense)


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (N_SAMPLES + 2, SEQ_LEN + 4), generator=torch.Generator().manual_seed(1))


def config(**fields) -> PruneConfig:
    fields = {"method": "sparsegpt", "num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "block_size": 16, **fields}
    return PruneConfig(**fields)


def run(model, calib, cfg, **kwargs) -> PruneResult:
    return prune_model(model, calib, cfg, progress=False, batch_size=4, **kwargs)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- basic behaviour


def test_prunes_every_decoder_linear_exactly_and_nothing_else(model, dense, calib):
    result = run(model, calib, config(sparsity=0.5))
    names = prunable_linear_names(model)
    assert sorted(result.masks) == sorted(names) and len(names) == 14
    check_masks(model, result.masks)
    report = sparsity_report(model)
    assert report["global"] == 0.5 and all(s == 0.5 for s in report["layers"].values())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, dense.state_dict()[k])}
    assert changed == set(names)  # embeddings, lm_head and norms untouched
    assert len(result.layers) == 14 and len(result.seconds_per_decoder_layer) == 2
    assert all(0 < r["error"] < 1 and r["sparsity"] == 0.5 for r in result.layers)
    assert result.cholesky_retries == 0 and result.total_seconds > 0


def test_captured_inputs_and_propagation_through_pruned_layers(model, calib, monkeypatch):
    """Layer 0 sees the embeddings; layer 1 sees the *pruned* layer 0's outputs."""
    seen = {}
    original = layerwise._prune_decoder_layer

    def spy(index, layer, linears, progress, *args):
        seen[index] = progress.activations.clone()
        return original(index, layer, linears, progress, *args)

    monkeypatch.setattr(layerwise, "_prune_decoder_layer", spy)
    run(model, calib, config())
    ids = calib[:N_SAMPLES, :SEQ_LEN]
    torch.testing.assert_close(seen[0], model.model.embed_tokens(ids), rtol=0, atol=0)
    expected = {}
    hook = model.model.layers[1].register_forward_pre_hook(lambda m, args: expected.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids, use_cache=False)
    hook.remove()
    torch.testing.assert_close(seen[1], expected["x"], rtol=1e-5, atol=1e-5)


def test_hessian_running_average_equals_batch_formula():
    x = torch.randn(3, 5, 8)
    stats = layerwise._InputStats(8, torch.device("cpu"), full=True)
    for chunk in x.split([1, 2]):
        stats.add(chunk)
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(stats.hessian, 2 * flat.T @ flat / 15)


def per_linear_recording(monkeypatch) -> None:
    """Make the driver accumulate one H per Linear (no sharing between Linears reading one input)."""
    original = layerwise._recording_inputs
    monkeypatch.setattr(layerwise, "_recording_inputs", lambda *a, **k: original(*a, **k, share=False))


@pytest.mark.parametrize("cfg", [config(), config(structure="2:4"), config(method="wanda", owl=True)])
def test_shared_hessians_give_bit_identical_masks_and_weights(dense, calib, monkeypatch, cfg):
    """q/k/v (and gate/up) read one tensor: one shared H is exactly each Linear's own H."""
    shared, separate = copy.deepcopy(dense), copy.deepcopy(dense)
    expected_shared = run(shared, calib, cfg)
    per_linear_recording(monkeypatch)
    expected_separate = run(separate, calib, cfg)
    assert expected_shared.masks.keys() == expected_separate.masks.keys()
    assert all(torch.equal(expected_shared.masks[k], expected_separate.masks[k]) for k in expected_shared.masks)
    assert_same_state(shared, separate)
    assert [r["error"] for r in expected_shared.layers] == [r["error"] for r in expected_separate.layers]


def test_linears_reading_one_input_share_one_accumulation(model, calib):
    """q/k/v's input, o's, gate/up's, down's: 4 accumulations per mini-batch, not 7."""
    layer = model.model.layers[0]
    linears = {f"model.layers.0.{n}.weight": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    ids = calib[:N_SAMPLES, :SEQ_LEN]
    _, kwargs = layerwise._first_layer_inputs(model, layer, ids[:1])
    with torch.no_grad(), layerwise._recording_inputs(linears, full=True) as stats:
        layerwise._run_layer(layer, model.model.embed_tokens(ids), kwargs, 4, write_back=None)
    by_name = {name.split(".")[-2]: st for name, st in stats.items()}
    assert by_name["q_proj"] is by_name["k_proj"] is by_name["v_proj"]
    assert by_name["gate_proj"] is by_name["up_proj"]
    assert len({id(st) for st in by_name.values()}) == 4
    assert all(st.tokens == N_SAMPLES * SEQ_LEN for st in by_name.values())  # each batch added once


def test_sharing_is_refused_when_linears_stop_sharing_an_input():
    recorder = layerwise._InputRecorder(lambda lin: layerwise._InputStats(4, torch.device("cpu"), True), share=True)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    x = torch.randn(3, 4)
    recorder("a", a, x)
    recorder("b", b, x)  # b joins a
    assert recorder.stats["a"] is recorder.stats["b"] and recorder.stats["a"].tokens == 3
    recorder("a", a, torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="shared a's input before"):
        recorder("b", b, torch.randn(3, 4))


def test_last_layer_outputs_are_not_recomputed(model, calib):
    """Each decoder layer runs once to record its inputs and once to pass its pruned outputs on,
    except the last one: nothing reads its outputs."""
    counts = [0, 0]
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    run(model, calib, config())
    batches = -(-N_SAMPLES // 4)
    assert counts == [2 * batches, batches]


def test_bf16_model_is_pruned_with_fp32_hessians_and_stays_bf16(dense, calib):
    """prune.dtype=bfloat16: the weights and activations are bf16, the statistics and the sweep fp32."""
    fp32, bf16 = copy.deepcopy(dense), copy.deepcopy(dense).to(torch.bfloat16)
    expected, result = run(fp32, calib, config()), run(bf16, calib, config())
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    check_masks(bf16, result.masks)
    assert sparsity_report(bf16)["global"] == 0.5
    # bf16 inputs move some near-tied scores; most of the mask agrees with the fp32 run
    agree = sum(int((expected.masks[k] == result.masks[k]).sum()) for k in expected.masks)
    assert agree / sum(m.numel() for m in expected.masks.values()) > 0.9
    errors = [r["error"] for r in result.layers]
    assert all(0 < e < 1 for e in errors)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude", "admm"])
def test_nm_structure_in_every_group(model, calib, method):
    result = run(model, calib, config(method=method, structure="2:4", refine=method == "admm"))
    for name, mask in result.masks.items():
        assert torch.all(mask.reshape(-1, 4).sum(1) == 2), name


def test_admm_layers_are_never_worse_than_sparsegpt_layers(dense, calib):
    """Per Linear, admm keeps SparseGPT's result unless its own reconstructs better (first layer: same inputs)."""
    sparsegpt = run(copy.deepcopy(dense), calib, config(sparsity=0.7))
    admm = run(copy.deepcopy(dense), calib, config(method="admm", sparsity=0.7))
    first = [
        (s["error"], a["error"]) for s, a in zip(sparsegpt.layers, admm.layers, strict=True) if s["decoder_layer"] == 0
    ]
    assert all(a <= s for s, a in first) and sum(a for _, a in first) < sum(s for s, _ in first)
    assert all(r["sparsity"] == pytest.approx(0.7, abs=1e-3) for r in admm.layers)


def test_owl_gives_nonuniform_layers_with_the_target_mean(model, calib):
    result = run(model, calib, config(sparsity=0.7, owl=True, owl_lambda=0.05))
    targets = result.layer_sparsity_targets
    assert len(targets) == 2 and targets[0] != targets[1]
    assert sum(targets) / 2 == pytest.approx(0.7)
    assert sparsity_report(model)["global"] == pytest.approx(0.7, abs=1e-3)


def test_ignored_layers_stay_dense(model, dense, calib):
    result = run(model, calib, config(ignore=["*.mlp.down_proj", r"re:model\.layers\.1\.self_attn\..*"]))
    assert not any("down_proj" in n or "layers.1.self_attn" in n for n in result.masks)
    w = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[w], dense.state_dict()[w])


# --------------------------------------------------------------------------- (d) resume


@pytest.mark.parametrize("cfg", [config(sparsity=0.6), config(method="admm", sparsity=0.6, refine=True)])
def test_interrupted_and_resumed_run_equals_uninterrupted(dense, calib, tmp_path, monkeypatch, cfg):
    straight = copy.deepcopy(dense)
    expected = run(straight, calib, cfg)

    original = layerwise._prune_decoder_layer

    def crash_at_layer_1(index, *args):
        if index == 1:
            raise KeyboardInterrupt("simulated crash")
        return original(index, *args)

    monkeypatch.setattr(layerwise, "_prune_decoder_layer", crash_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(dense), calib, cfg, resume_dir=tmp_path)
    assert (tmp_path / "state.safetensors").exists() and (tmp_path / "layer_00000.safetensors").exists()
    assert not (tmp_path / "layer_00001.safetensors").exists()
    monkeypatch.setattr(layerwise, "_prune_decoder_layer", original)

    restarted = copy.deepcopy(dense)  # a fresh process would reload the dense model
    resumed = run(restarted, calib, cfg, resume_dir=tmp_path)
    assert_same_state(restarted, straight)
    assert resumed.masks.keys() == expected.masks.keys()
    assert all(torch.equal(resumed.masks[k], expected.masks[k]) for k in expected.masks)
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.layers] == [
        {k: v for k, v in r.items() if k not in drop} for r in expected.layers
    ]
    assert len(resumed.seconds_per_decoder_layer) == 2


@pytest.mark.parametrize("change", ["config", "calibration"])
def test_resume_with_a_different_run_is_refused_before_writing(dense, calib, tmp_path, change):
    run(copy.deepcopy(dense), calib, config(), resume_dir=tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    cfg, data = (config(sparsity=0.7), calib) if change == "config" else (config(), calib.flip(0))
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="different run"):
        run(model, data, cfg, resume_dir=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert_same_state(model, dense)


# --------------------------------------------------------------------------- (e) iterative pruning


@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
@pytest.mark.parametrize("pass_masks", [True, False])
def test_iterative_pruning_keeps_every_old_zero(model, calib, pass_masks, method):
    first = run(model, calib, config(sparsity=0.5))
    second = run(
        model,
        calib,
        config(method=method, sparsity=0.7, refine=method == "admm"),
        old_masks=first.masks if pass_masks else None,
    )
    for name, old in first.masks.items():
        new = second.masks[name]
        assert not torch.any(new & ~old), name
        assert int((~new).sum()) == round(0.7 * new.numel()), name
    check_masks(model, second.masks)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda c: c[:3], "has 3 sequences, fewer than prune.num_samples=6"),
        (lambda c: c[:, :5], "have 5 tokens, fewer than prune.seq_len=12"),
        (lambda c: c.float(), "integer tensor"),
        (lambda c: c + 1000, r"token ids must lie in \[0, 128\)"),
    ],
)
def test_bad_calibration_is_refused(model, dense, calib, tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        run(model, make(calib), config(), resume_dir=tmp_path / "resume")
    assert not (tmp_path / "resume").exists()
    assert_same_state(model, dense)


def test_bad_config_is_refused(model, calib):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        run(model, calib, PruneConfig.model_construct(**config().model_dump() | {"sparsity": 1.0}))
    # 3 does not divide the hidden size 32
    with pytest.raises(ValueError, match="M=3 does not divide the input width 32 of model.layers.0"):
        run(model, calib, config(structure="1:3", sparsity=2 / 3, block_size=6))


def test_model_without_decoder_layers_is_refused(calib):
    with pytest.raises(ValueError, match="no decoder layers"):
        run(nn.Sequential(nn.Embedding(128, 8), nn.Linear(8, 8)), calib, config())


def test_old_masks_must_match_the_model(model, calib):
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        run(model, calib, config(), old_masks={"model.layers.9.mlp.up_proj.weight": torch.ones(64, 32).bool()})


def test_nonfinite_embeddings_are_named(model, calib):
    with torch.no_grad():
        model.model.embed_tokens.weight[calib[0, 0]] = float("nan")
    with pytest.raises(ValueError, match="input of decoder layer 0"):
        run(model, calib, config())


def test_nonfinite_activations_name_the_layer(model, calib):
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"decoder layer 1"):
        run(model, calib, config())


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_and_returns_layers_home(dense, calib):
    on_cpu, on_gpu = copy.deepcopy(dense), copy.deepcopy(dense)
    cpu = run(on_cpu, calib, config())
    gpu = run(on_gpu, calib, config(), device="cuda")
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    agree = sum(int((cpu.masks[k] == gpu.masks[k]).sum()) for k in cpu.masks)
    assert agree / sum(m.numel() for m in cpu.masks.values()) > 0.99  # fp32 on another device: near-ties may flip
    assert sparsity_report(on_gpu)["global"] == 0.5
