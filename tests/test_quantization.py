"""Quantization: the integer grid, RTN and GPTQ against first principles, SmoothQuant, the layer-wise driver."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from sparsify.quant.quantization import (
    QUANT_MARKER,
    ActivationQuantHook,
    QuantConfig,
    QuantScheme,
    activation_quantization_disabled,
    check_not_quantized,
    dequantize,
    fake_quantize_per_token,
    gptq_quantize,
    quant_state,
    quantized_linears,
    rtn_quantize,
    smooth_decoder_layer,
    smoothing_factors,
)
from sparsify.sparsity import layerwise
from sparsify.sparsity.layerwise import QuantizeResult, prune_model, quantize_model
from sparsify.sparsity.masks import check_masks, prunable_linear_names
from sparsify.sparsity.pruning import PruneConfig, reconstruction_error
from tests.conftest import tiny_llama

F64 = torch.float64
N_SAMPLES, SEQ_LEN = 6, 16
W8A8 = QuantScheme(8, None, 8)
W4G16 = QuantScheme(4, 16, None)
W4G128 = QuantScheme(4, 128, None)
W4_CHANNEL = QuantScheme(4, None, None)


# --------------------------------------------------------------------------- helpers


def correlated_inputs(features: int, tokens: int, *, seed: int, dtype=F64) -> torch.Tensor:
    """X [features, tokens] from few latent factors (strongly correlated), plus a few outlier features."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(features // 4, tokens, generator=g, dtype=dtype)
    X = torch.randn(features, features // 4, generator=g, dtype=dtype) @ latent
    X += 0.3 * torch.randn(features, tokens, generator=g, dtype=dtype)
    X[torch.randperm(features, generator=g)[:3]] *= 10.0
    return X


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X @ X.T / X.shape[1]


def random_weight(rows: int, cols: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_mask(rows: int, cols: int, seed: int, keep: float = 0.5) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < keep


def expanded_scales(scales: torch.Tensor, group_size: int | None, cols: int) -> torch.Tensor:
    return scales.repeat_interleave(group_size or cols, dim=1)


def config(**fields) -> QuantConfig:
    return QuantConfig(**{"num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "block_size": 32, **fields})


W4_CFG = {"weight_bits": 4, "group_size": 32, "activation_bits": None, "smoothquant": False}


# --------------------------------------------------------------------------- the grid and RTN


@pytest.mark.parametrize("scheme", [W8A8, W4G16, W4_CHANNEL], ids=["int8-channel", "int4-g16", "int4-channel"])
def test_rtn_error_is_within_half_a_step(scheme):
    W = random_weight(24, 64, seed=0, dtype=torch.float32) * torch.logspace(-2, 1, 64)  # columns of mixed size
    result = rtn_quantize(W, scheme)
    step = expanded_scales(result.scales, scheme.group_size, 64)
    assert result.scales.shape == (24, 64 // (scheme.group_size or 64))
    assert torch.all((W - result.weight).abs() <= step / 2 + 1e-6 * W.abs())
    assert int(result.codes.abs().max()) == scheme.qmax  # the largest weight of each group lands on ±qmax
    assert result.codes.dtype == torch.int8
    assert torch.equal(result.weight, dequantize(result.codes, result.scales, scheme.group_size))


def test_per_token_activation_error_is_within_half_a_step():
    x = torch.randn(3, 5, 32) * torch.logspace(-3, 2, 32)
    xq = fake_quantize_per_token(x, 8)
    step = x.abs().amax(-1, keepdim=True) / 127.5
    assert torch.all((x - xq).abs() <= step / 2 + 1e-6 * x.abs())  # the max lands on 127.5 and is clamped
    assert torch.equal(fake_quantize_per_token(torch.zeros(2, 4)), torch.zeros(2, 4))


@pytest.mark.parametrize("scheme", [W8A8, W4G16], ids=["int8", "int4-g16"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_zeros_stay_zero_and_masks_are_unchanged(scheme, method):
    X = correlated_inputs(64, 512, seed=1, dtype=torch.float32)
    mask = random_mask(32, 64, seed=2)
    W = random_weight(32, 64, seed=3, dtype=torch.float32).masked_fill(~mask, 0)
    mask_before = mask.clone()
    if method == "rtn":
        result = rtn_quantize(W, scheme, mask=mask)
    else:
        result = gptq_quantize(W, hessian(X), scheme, mask=mask, block_size=32)
    assert torch.equal(mask, mask_before)
    assert torch.all(result.weight[~mask] == 0) and torch.all(result.codes[~mask] == 0)
    assert torch.equal(result.weight, dequantize(result.codes, result.scales, scheme.group_size))


# --------------------------------------------------------------------------- GPTQ against a reference


def naive_gptq(W, H, bits, group_size, mask, *, dampening, act_order):
    """Sparse GPTQ from first principles, float64, one column at a time, with fresh inverses.

    At column j (in sweep order) the free columns are F = {j, ..., n-1}. The weight's target
    is its rounded value where kept and 0 where pruned; the OBS update of the free columns is
    δ_F = −(w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j,F}. Scales: per channel, or static groups
    (act-order), from the original weights; lazy groups from the current kept weights when
    the sweep reaches the group.
    """
    qmax = 2 ** (bits - 1) - 1
    W, H, mask = W.clone().to(F64).masked_fill(~mask, 0), H.clone().to(F64), mask.clone()
    rows, cols = W.shape

    def scales_of(values, keep):
        amax = (values * keep).abs().amax(1)
        return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))

    g = group_size or cols
    static = torch.stack([scales_of(W[:, k : k + g], mask[:, k : k + g]) for k in range(0, cols, g)], 1)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H, mask = W[:, perm], H[perm][:, perm], mask[:, perm]
    H = H + dampening * H.diagonal().mean() * torch.eye(cols, dtype=F64)
    lazy = group_size is not None and not act_order
    scale = None
    for j in range(cols):
        if lazy and j % g == 0:
            scale = scales_of(W[:, j : j + g], mask[:, j : j + g])
        if not lazy:
            scale = static[:, int(perm[j]) // g]
        inv = torch.linalg.inv(H[j:, j:])
        w = W[:, j].clone()
        q = (torch.round(w / scale).clamp(-qmax, qmax) * scale).masked_fill(~mask[:, j], 0)
        W[:, j:] -= ((w - q) / inv[0, 0])[:, None] * inv[0][None, :]
        W[:, j] = q  # equal up to rounding already; make it exact
    return W[:, torch.argsort(perm)]


@pytest.mark.parametrize(
    ("scheme", "act_order"),
    [(W8A8, False), (W4G16, False), (W4G16, True), (W4_CHANNEL, True)],
    ids=["int8", "int4-g16", "int4-g16-actorder", "int4-channel-actorder"],
)
@pytest.mark.parametrize("keep", [0.6, 0.25])  # very sparse: pruned entries' transient values could leak into scales
def test_gptq_matches_the_naive_reference(scheme, act_order, keep):
    X = correlated_inputs(48, 400, seed=4)
    W = random_weight(12, 48, seed=5)
    mask = random_mask(12, 48, seed=6, keep=keep)
    H = hessian(X)
    expected = naive_gptq(W, H, scheme.weight_bits, scheme.group_size, mask, dampening=0.01, act_order=act_order)
    got = gptq_quantize(W, H, scheme, mask=mask, block_size=16, dampening=0.01, act_order=act_order)
    torch.testing.assert_close(got.weight, expected, rtol=0, atol=1e-9)
    assert torch.all(got.weight[~mask] == 0)


@pytest.mark.parametrize("scheme", [W8A8, W4G128], ids=["int8-channel", "int4-g128"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse50"])
def test_gptq_reconstructs_better_than_rtn_on_correlated_inputs(scheme, sparse):
    X = correlated_inputs(256, 2048, seed=7, dtype=torch.float32)
    H = hessian(X)
    mask = random_mask(64, 256, seed=8) if sparse else None
    W = random_weight(64, 256, seed=9, dtype=torch.float32)
    W = W if mask is None else W.masked_fill(~mask, 0)
    gptq = gptq_quantize(W, H, scheme, mask=mask)
    rtn = rtn_quantize(W, scheme, mask=mask)
    assert reconstruction_error(W, gptq.weight, H) < 0.8 * reconstruction_error(W, rtn.weight, H)


def test_gptq_keeps_the_input_dtype():
    X = correlated_inputs(32, 200, seed=10, dtype=torch.float32)
    W = random_weight(8, 32, seed=11, dtype=torch.bfloat16)
    result = gptq_quantize(W, hessian(X), W4G16, block_size=16)
    assert result.weight.dtype == torch.bfloat16 and result.scales.dtype == torch.bfloat16
    assert torch.equal(result.weight, dequantize(result.codes, result.scales, 16))


# --------------------------------------------------------------------------- configuration and bad input


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"weight_bits": 3}, "weight_bits must be one of"),
        ({"weight_bits": 16}, "weight_bits must be one of"),
        ({"activation_bits": 4}, "activation_bits must be one of"),
        ({"group_size": 0}, "group_size must be a positive multiple of 8"),
        ({"group_size": 100}, "group_size must be a positive multiple of 8"),
        ({"activation_bits": None}, "smoothquant"),
        ({"group_size": 64, "block_size": 96}, "block_size .* multiple of group_size"),
        ({"smoothquant_alpha": 1.5}, "smoothquant_alpha"),
        ({"method": "awq"}, "method"),
        ({"bits": 8}, "bits"),  # unknown key
    ],
)
def test_bad_config_values_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**fields)


def test_config_is_frozen_and_defaults_are_w8a8():
    cfg = QuantConfig()
    assert cfg.scheme == QuantScheme(8, None, 8) and cfg.method == "gptq" and cfg.smoothquant
    with pytest.raises(ValidationError):
        cfg.weight_bits = 4


@pytest.mark.parametrize(
    ("scheme", "match"),
    [
        (QuantScheme(4, 128), "larger than the input width 64"),
        (QuantScheme(4, 48), "does not divide the input width 64"),
        (QuantScheme(2, None), "weight_bits must be one of"),
    ],
)
def test_bad_scheme_for_a_layer_is_refused(scheme, match):
    W = random_weight(8, 64, seed=12, dtype=torch.float32)
    for quantize in (lambda: rtn_quantize(W, scheme), lambda: gptq_quantize(W, torch.eye(64), scheme)):
        with pytest.raises(ValueError, match=match):
            quantize()


# --------------------------------------------------------------------------- SmoothQuant


def test_smoothing_reduces_activation_quantization_error_with_outlier_channels():
    g = torch.Generator().manual_seed(13)
    X = torch.randn(256, 64, generator=g)
    X[:, [3, 17, 40]] *= 40.0  # outlier channels, as in LLM activations
    W = torch.randn(32, 64, generator=g) * 0.05
    reference = X @ W.T
    s = smoothing_factors(X.abs().amax(0), [W], alpha=0.5)
    Xs, Ws = X / s, W * s
    torch.testing.assert_close(Xs @ Ws.T, reference, rtol=1e-4, atol=1e-4)  # same function in float

    def error(x, w, quantize_weights):
        w = rtn_quantize(w, QuantScheme(8)).weight if quantize_weights else w
        return float((fake_quantize_per_token(x) @ w.T - reference).norm() / reference.norm())

    assert error(Xs, Ws, False) < 0.5 * error(X, W, False)  # activation-only
    assert error(Xs, Ws, True) < 0.5 * error(X, W, True)  # W8A8


@pytest.fixture(scope="module")
def dense() -> LlamaForCausalLM:
    model = tiny_llama(hidden_size=64, num_key_value_heads=2, intermediate_size=128).eval()
    with torch.no_grad():  # outlier channels in the residual stream, as trained LLMs have
        model.model.embed_tokens.weight[:, [5, 23]] *= 30.0
    return model


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (N_SAMPLES + 2, SEQ_LEN + 4), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sparse(dense, calib) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    """``dense`` pruned to 50% (SparseGPT) and its masks."""
    model = copy.deepcopy(dense)
    cfg = PruneConfig(method="sparsegpt", num_samples=N_SAMPLES, seq_len=SEQ_LEN)
    result = prune_model(model, calib, cfg, progress=False)
    return model, result.masks


def test_smoothing_a_model_leaves_its_float_outputs_unchanged(dense, calib):
    model = copy.deepcopy(dense)
    ids = calib[:, :SEQ_LEN]
    absmax: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):

            def record(module, args, output, key=(i, name)):
                absmax[key] = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0)

            hooks.append(layer.get_submodule(name).register_forward_hook(record))
    with torch.no_grad():
        before = model(ids).logits
    for hook in hooks:
        hook.remove()
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            factors = smooth_decoder_layer(layer, {n: absmax[i, n] for (j, n) in absmax if j == i}, alpha=0.5)
            assert set(factors) == {
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            }
        after = model(ids).logits
    ratio = model.model.layers[0].input_layernorm.weight / norm_before
    assert ratio.max() / ratio.min() > 2 and int(ratio.argmin()) in (5, 23)  # really rescaled, most at the outliers
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the layer-wise driver


def run(model, calib, cfg, **kwargs) -> QuantizeResult:
    return quantize_model(model, calib, cfg, progress=False, batch_size=4, **kwargs)


def logits(model, calib) -> torch.Tensor:
    with torch.no_grad():
        return model(calib[:, :SEQ_LEN]).logits


@pytest.mark.parametrize(
    "fields",
    [{}, {"method": "rtn"}, W4_CFG, W4_CFG | {"act_order": True}],
    ids=["w8a8-gptq", "w8a8-rtn", "w4g32-gptq", "w4g32-gptq-actorder"],
)
def test_quantize_model_keeps_masks_and_quantizes_every_linear(sparse, calib, fields):
    source, masks = sparse
    model = copy.deepcopy(source)
    cfg = config(**fields)
    result = run(model, calib, cfg, masks=masks)
    check_masks(model, masks)
    names = prunable_linear_names(model)
    assert sorted(f"{n}.weight" for n in quantized_linears(model)) == sorted(names) and len(names) == 14
    for name, linear in quantized_linears(model).items():
        state = quant_state(linear)
        assert state.scheme == cfg.scheme
        assert torch.equal(linear.weight, dequantize(state.codes, state.scales, cfg.group_size))
        assert torch.all(state.codes[~masks[f"{name}.weight"]] == 0)
        hooks = [h for h in linear._forward_pre_hooks.values() if isinstance(h, ActivationQuantHook)]
        assert len(hooks) == (1 if cfg.activation_bits else 0)
    assert getattr(model.config, QUANT_MARKER)["weight_bits"] == cfg.weight_bits
    assert len(result.layers) == 14 and all(r["error"] < 0.1 for r in result.layers)
    if cfg.method == "gptq":
        total = {k: sum(r[k] for r in result.layers) for k in ("error", "rtn_error")}
        assert total["error"] < total["rtn_error"]
    reference = logits(source, calib)
    rel = float((logits(model, calib) - reference).norm() / reference.norm())
    assert 0 < rel < (0.05 if cfg.weight_bits == 8 else 0.3)


def test_smoothing_statistics_are_those_of_the_smoothed_inputs(dense, calib, monkeypatch):
    """The driver turns H into H / (s sᵀ) instead of a second pass: it must equal H of the smoothed inputs."""
    seen = {}
    original = layerwise.quantize_linear

    def spy(W, H, cfg, *, mask=None):
        seen.setdefault(W.data_ptr(), H.clone())
        return original(W, H, cfg, mask=mask)

    monkeypatch.setattr(layerwise, "quantize_linear", spy)
    model = copy.deepcopy(dense)
    run(model, calib, config(method="rtn"))
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), activation_quantization_disabled(model):
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(calib[:N_SAMPLES, :SEQ_LEN]))
    x = x.reshape(-1, 64)
    torch.testing.assert_close(seen[q_proj.weight.data_ptr()], 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_ignored_linears_stay_float(dense, calib):
    model = copy.deepcopy(dense)
    run(model, calib, config(ignore=["*.mlp.down_proj"]))
    assert not any("down_proj" in n for n in quantized_linears(model)) and len(quantized_linears(model)) == 12


def test_interrupted_and_resumed_quantization_equals_uninterrupted(sparse, calib, tmp_path, monkeypatch):
    source, masks = sparse
    cfg = config(**W4_CFG)
    straight = copy.deepcopy(source)
    expected = run(straight, calib, cfg, masks=masks)

    original = layerwise._quantize_decoder_layer

    def crash_at_layer_1(index, *args):
        if index == 1:
            raise KeyboardInterrupt("simulated crash")
        return original(index, *args)

    monkeypatch.setattr(layerwise, "_quantize_decoder_layer", crash_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(source), calib, cfg, masks=masks, resume_dir=tmp_path)
    monkeypatch.setattr(layerwise, "_quantize_decoder_layer", original)
    resumed_model = copy.deepcopy(source)
    resumed = run(resumed_model, calib, cfg, masks=masks, resume_dir=tmp_path)

    for key, value in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    for name, linear in quantized_linears(straight).items():
        a, b = quant_state(linear), quant_state(resumed_model.get_submodule(name))
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), name
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.layers] == [
        {k: v for k, v in r.items() if k not in drop} for r in expected.layers
    ]


def test_an_already_quantized_model_or_checkpoint_is_refused(dense, calib, tmp_path):
    model = copy.deepcopy(dense)
    run(model, calib, config(method="rtn"))
    with pytest.raises(ValueError, match="already quantized"):
        run(model, calib, config(method="rtn"))
    model.config.save_pretrained(tmp_path / "ours")  # our marker in config.json
    with pytest.raises(ValueError, match=f"already quantized.*{QUANT_MARKER}"):
        check_not_quantized(tmp_path / "ours")
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="already quantized.*quantization_config"):
        check_not_quantized(tmp_path / "ct")
    check_not_quantized(tmp_path / "missing")  # no config: nothing to refuse


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: {"model.layers.9.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)}, "names no parameter"),
        (lambda m: {"model.layers.0.mlp.up_proj.weight": torch.ones(64, 64, dtype=torch.bool)}, "has shape"),
        (lambda m: {k: ~v for k, v in m.items()}, "nonzero weights where its mask prunes"),
    ],
)
def test_masks_that_do_not_match_the_model_are_refused(sparse, calib, make, match):
    source, masks = sparse
    model = copy.deepcopy(source)
    with pytest.raises(ValueError, match=match):
        run(model, calib, config(), masks=make(masks))
    assert not quantized_linears(model)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"group_size": 128, "weight_bits": 4, "activation_bits": None, "smoothquant": False, "block_size": 128},
            "group_size 128 is larger than the input width 64 of model.layers.0",
        )
    ],
)
def test_a_group_that_does_not_fit_a_layer_is_refused(dense, calib, fields, match):
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match=match):
        run(model, calib, config(**fields))
    assert not quantized_linears(model)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_and_returns_layers_home(sparse, calib):
    source, masks = sparse
    on_cpu, on_gpu = copy.deepcopy(source), copy.deepcopy(source)
    cfg = config(**W4_CFG)
    run(on_cpu, calib, cfg, masks=masks)
    run(on_gpu, calib, cfg, masks=masks, device="cuda")
    assert all(t.device.type == "cpu" for t in [*on_gpu.parameters(), *on_gpu.buffers()])
    check_masks(on_gpu, masks)
    agree = total = 0
    for name, linear in quantized_linears(on_cpu).items():
        codes_gpu = quant_state(on_gpu.get_submodule(name)).codes
        agree += int((quant_state(linear).codes == codes_gpu).sum())
        total += codes_gpu.numel()
    assert agree / total > 0.99  # fp32 on another device: near-ties may round the other way
