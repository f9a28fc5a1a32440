"""SparseLinear and sparsify_model in a tiny Llama: same tokens/logits as the dense model holding the
same zeros (bf16 and fp32), INT8 against its quantized reference, what gets replaced, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify.inference import runtime
from sparsify.inference.kernels import dequantize, load_extension, pack
from sparsify.inference.runtime import SparseLinear, sparsify_model
from sparsify.quant.quantization import QuantScheme, fake_quantize_per_token
from sparsify.sparsity.masks import prunable_linear_names
from tests.serve_fixtures import quantize_rtn


@pytest.fixture(scope="module", autouse=True)
def extension():
    return load_extension()  # built once; None → everything below runs on the torch fallback


def tiny_llama(sparsity: float = 0.7, seed: int = 0, intermediate: int = 160) -> LlamaForCausalLM:
    """2 layers, hidden 64, intermediate 160 (not a multiple of 64), decoder Linears pruned per row."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name in prunable_linear_names(model):
            p = model.get_parameter(name)
            k = int(p.shape[1] * sparsity)
            if k:
                thr = p.abs().kthvalue(k, dim=1, keepdim=True).values
                p.masked_fill_(p.abs() <= thr, 0)
    return model


def quantized(model: LlamaForCausalLM, scheme: QuantScheme, names: list[str] | None = None) -> LlamaForCausalLM:
    """A copy with the named decoder weights (all by default) quantized round-to-nearest, keeping their zeros."""
    names = names or prunable_linear_names(model)
    return quantize_rtn(model, {n: model.get_parameter(n) != 0 for n in names}, scheme)


PROMPTS = torch.tensor([[5, 17, 99, 3, 42, 8, 1], [64, 2, 2, 77, 13, 120, 31]])


def greedy(model: nn.Module, steps: int = 12) -> torch.Tensor:
    return model.generate(PROMPTS, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)[
        :, PROMPTS.shape[1] :
    ]


@torch.no_grad()
def test_bf16_sparse_model_generates_the_dense_tokens():
    dense = tiny_llama().to(torch.bfloat16)
    sparse = copy.deepcopy(dense)
    replaced = sparsify_model(sparse)
    assert len(replaced) == 14 and all(s >= 0.68 for s in replaced.values())
    assert isinstance(sparse.model.layers[1].mlp.down_proj, SparseLinear)
    assert torch.equal(greedy(sparse), greedy(dense))
    a, b = dense(PROMPTS).logits.float(), sparse(PROMPTS).logits.float()
    assert (a - b).abs().max() <= 0.02 * a.abs().max()


@torch.no_grad()
def test_fp32_sparse_model_matches_dense_logits():
    dense = tiny_llama()
    sparse = copy.deepcopy(dense)
    sparsify_model(sparse, dtype=torch.float32)
    a, b = dense(PROMPTS).logits, sparse(PROMPTS).logits
    assert b.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy(sparse), greedy(dense))


@torch.no_grad()
def test_decode_steps_attend_through_the_kernel(monkeypatch):
    """After sparsify_model, transformers' decode steps with nothing masked run decode_attention (prefill
    and padded batches run SDPA), and generate gives SDPA's tokens and per-step logits."""
    if load_extension() is None:
        pytest.skip("no compiled kernels")
    sparse = tiny_llama()
    sparsify_model(sparse, dtype=torch.float32)
    assert sparse.config._attn_implementation == runtime.DECODE_ATTENTION
    reference = copy.deepcopy(sparse)
    reference.set_attn_implementation("sdpa")
    calls = []
    real = runtime.decode_attention
    monkeypatch.setattr(runtime, "decode_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    kwargs |= {"output_logits": True, "return_dict_in_generate": True}
    out, ref = sparse.generate(PROMPTS, **kwargs), reference.generate(PROMPTS, **kwargs)
    assert len(calls) == 5 * 2 * 2  # decode steps (the prefill gives the first token) × layers × sequences
    assert all(shape == (4, 16) for shape in calls)  # one sequence's query heads at a time
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    calls.clear()
    padded = PROMPTS.clone()
    padded[0, :2] = 0
    mask = (torch.arange(PROMPTS.shape[1]) >= 2).long().expand(2, -1) | torch.tensor([[0], [1]])
    out = sparse.generate(padded, attention_mask=mask, **kwargs)
    ref = reference.generate(padded, attention_mask=mask, **kwargs)
    assert not calls  # a padding mask: SDPA
    assert torch.equal(out.sequences, ref.sequences)


def test_a_model_without_transformers_attention_dispatch_keeps_its_attention(monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)
    assert not runtime.use_decode_attention(model)
    assert model.config._attn_implementation == "sdpa"


class FakeQuantInput:
    """Forward pre-hook: the per-token activation grid of W8A8 (sparsify.quant.quantization's)."""

    def __call__(self, module, args):
        return (fake_quantize_per_token(args[0].float()).to(args[0].dtype),)


@torch.no_grad()
@pytest.mark.parametrize("mode,lm_head", [("w8a8", False), ("w8a16", False), ("w8a8", True)])
def test_int8_model_matches_its_quantized_reference(mode, lm_head):
    dense = tiny_llama()
    sparse = copy.deepcopy(dense)
    replaced = sparsify_model(sparse, int8=mode, min_sparsity=0.5, lm_head=lm_head)
    assert isinstance(sparse.lm_head, SparseLinear) == lm_head and ("lm_head" in replaced) == lm_head
    if lm_head:  # dense INT8: every weight kept
        assert sparse.lm_head.packed.sparsity == 0.0 and replaced["lm_head"] == 0.0
    # Reference: the fp32 model with each replaced Linear's dequantized INT8 weight (+ fake-quant input).
    ref = copy.deepcopy(dense)
    for name, module in sparse.named_modules():
        if isinstance(module, SparseLinear):
            assert module.packed.dtype == torch.int8 and module.packed.act_int8 == (mode == "w8a8")
            linear = ref.get_submodule(name)
            linear.weight.copy_(dequantize(module.packed))
            if mode == "w8a8":
                linear.register_forward_pre_hook(FakeQuantInput())
    a, b = ref(PROMPTS).logits, sparse(PROMPTS).logits
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
def test_int4_model_matches_its_quantized_reference(mode):
    """INT4 on the sparse kernels: the fp32 model holding each replaced Linear's dequantized INT4 weight
    (+ the per-token activation grid for W4A8) gives the same logits; lm_head as INT8."""
    dense = tiny_llama()
    sparse = copy.deepcopy(dense)
    replaced = sparsify_model(sparse, int4=mode, group_size=None, min_sparsity=0.5, lm_head=True)
    assert len(replaced) == 15
    ref = copy.deepcopy(dense)
    for name, module in sparse.named_modules():
        if isinstance(module, SparseLinear):
            want = torch.int8 if name == "lm_head" else torch.int4
            assert module.packed.dtype == want and module.packed.act_int8 == (mode == "w4a8"), name
            linear = ref.get_submodule(name)
            linear.weight.copy_(dequantize(module.packed))
            if mode == "w4a8":
                linear.register_forward_pre_hook(FakeQuantInput())
    # Each replaced Linear, on the inputs it sees, against its reference (tight: no rounding flip has
    # had a chance to propagate); then the whole model, where W4A8's per-token rounding of a later
    # layer's input may flip on a near-tie and move logits by one activation step.
    checked = []

    def check(module, args, out):
        x = args[0].float().reshape(-1, module.in_features)
        xq = fake_quantize_per_token(x) if module.packed.act_int8 else x
        want = xq @ dequantize(module.packed).T
        assert torch.allclose(out.reshape(want.shape), want, atol=1e-4, rtol=1e-4)
        checked.append(module)

    handles = [m.register_forward_hook(check) for m in sparse.modules() if isinstance(m, SparseLinear)]
    b = sparse(PROMPTS).logits
    for h in handles:
        h.remove()
    assert len(checked) == 15
    a = ref(PROMPTS).logits
    assert torch.allclose(a, b, atol=1e-3 if mode == "w4a16" else 2e-2, rtol=1e-3)
    # Groups must tile each Linear's input: down_proj's 160 columns are not a multiple of 64.
    with pytest.raises(ValueError, match="multiple of 64"):
        sparsify_model(tiny_llama(), int4=True, group_size=64)


@torch.no_grad()
def test_runs_an_int4_model_quantized_by_sparsify_quantization_exactly():
    """A W4A16 model from sparsify.quant.quantization (groups of 64) keeps its codes and scales: the runtime
    computes the in-memory quantized model's logits; groups the kernels cannot tile are refused."""
    model = quantized(tiny_llama(intermediate=192), QuantScheme(weight_bits=4, group_size=64, activation_bits=None))
    sparse = copy.deepcopy(model)
    replaced = sparsify_model(sparse, int4=True)
    assert len(replaced) == 14
    up = sparse.model.layers[0].mlp.up_proj
    assert up.packed.dtype == torch.int4 and not up.packed.act_int8 and up.packed.group_size == 64
    assert torch.equal(dequantize(up.packed), model.model.layers[0].mlp.up_proj.weight.float())
    a, b = model(PROMPTS).logits, sparse(PROMPTS).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    odd = quantized(
        tiny_llama(),
        QuantScheme(weight_bits=4, group_size=32, activation_bits=None),
        ["model.layers.0.mlp.up_proj.weight"],
    )
    with pytest.raises(ValueError, match="multiple of 64"):
        sparsify_model(odd, int4=True)


@torch.no_grad()
def test_uses_codes_of_a_model_quantized_by_sparsify_quantization():
    model = quantized(tiny_llama(), QuantScheme(weight_bits=8, group_size=None, activation_bits=8))
    sparse = copy.deepcopy(model)
    sparsify_model(sparse, int8=True)
    q_proj = sparse.model.layers[0].self_attn.q_proj
    codes = model.model.layers[0].self_attn.q_proj.weight_codes
    assert torch.equal(pack(codes, dtype=torch.int8, scales=torch.ones(codes.shape[0])).values, q_proj.packed.values)
    # The in-memory quantized model (fake-quant weights + activation hooks) computes the same logits.
    a, b = model(PROMPTS).logits, sparse(PROMPTS).logits
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
    grouped = quantized(
        tiny_llama(),
        QuantScheme(weight_bits=8, group_size=32, activation_bits=None),
        ["model.layers.0.mlp.up_proj.weight"],
    )
    with pytest.raises(ValueError, match="per-channel"):
        sparsify_model(grouped, int8=True)


@torch.no_grad()
def test_what_is_replaced():
    model = tiny_llama()
    layer0 = model.model.layers[0]
    with torch.no_grad():
        layer0.self_attn.q_proj.weight.normal_()  # dense again: below the threshold
        model.lm_head.weight[:, ::2] = 0  # sparse lm_head: never replaced
    replaced = sparsify_model(model, ignore=["*.mlp.gate_proj"])
    assert "model.layers.0.self_attn.q_proj" not in replaced
    assert not any("gate_proj" in n for n in replaced)
    assert len(replaced) == 14 - 1 - 2
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert isinstance(layer0.self_attn.q_proj, nn.Linear)
    assert sparsify_model(tiny_llama(sparsity=0.2)) == {}
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify_model(model, min_sparsity=1.5)
    with pytest.raises(ValueError, match="dtype"):
        sparsify_model(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="int8"):
        sparsify_model(model, int8="w4a8")
    with pytest.raises(ValueError, match="int4"):
        sparsify_model(model, int4="w8a8")
    with pytest.raises(ValueError, match="exclusive"):
        sparsify_model(model, int8=True, int4=True)
    with pytest.raises(ValueError, match="lm_head=True needs int8"):
        sparsify_model(model, lm_head=True)


def test_sparse_linear_module():
    torch.manual_seed(0)
    linear = nn.Linear(100, 37)
    with torch.no_grad():
        linear.weight.masked_fill_(torch.rand(37, 100) < 0.7, 0)
    sparse = SparseLinear.from_linear(linear, dtype=torch.float32)
    assert "sparsity=0.7" in repr(sparse) or "sparsity=0.6" in repr(sparse)
    x = torch.randn(2, 5, 100)
    with torch.no_grad():
        assert torch.allclose(sparse(x), linear(x), atol=1e-5)
    # Autograd through x (the torch path) gives the dense layer's input gradient.
    xg = x.clone().requires_grad_()
    sparse(xg).sum().backward()
    assert torch.allclose(xg.grad, linear.weight.sum(0).expand_as(x), atol=1e-5)
    # .to(dtype) does not re-type the packed tensors; bf16 inputs give bf16 outputs.
    sparse.to(torch.bfloat16)
    assert sparse.packed.dtype == torch.float32 and sparse.bias.dtype == torch.float32
    assert sparse(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="in_features=100"):
        sparse(torch.randn(3, 99))
    with pytest.raises(TypeError):
        sparse(torch.ones(3, 100, dtype=torch.int32))
    with pytest.raises(ValueError, match="CPU"):
        sparse(torch.ones(3, 100, device="meta"))
    with pytest.raises(ValueError, match="bias"):
        SparseLinear(sparse.packed, torch.zeros(5))


def test_runtime_and_kernels_import_no_orchestration():
    """sparsify/ is a library: importing the runtime (and the benchmark module) pulls no prefect/mlflow/dvc."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys; import sparsify.inference.runtime, sparsify.inference.kernels, sparsify.bench.cpu; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'dvc'}); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_decode_benchmark_on_a_tiny_model_agrees_across_variants():
    """The decode/prefill benchmark's bookkeeping on a tiny 70%-sparse model: each variant's timed
    loop decodes what its `generate()` does, the float variants the dense tokens; timings and ratios."""
    from sparsify.bench.cpu import DECODE_VARIANTS, flat_metrics, run_decode_benchmark

    result = run_decode_benchmark(
        layers=2, repeats=2, steps=3, prompt_len=5, prefill_len=16, hidden=64, intermediate=192, heads=4, vocab=256
    )
    variants = result["variants"]
    assert list(variants) == list(DECODE_VARIANTS)
    fp32 = variants["dense_fp32"]
    assert fp32["speedup_vs_fp32"] == 1.0 and fp32["prefill_speedup_vs_fp32"] == 1.0
    for name, v in variants.items():
        assert v["greedy_tokens"] == v["generate_tokens"], name  # the timed loop decodes what generate() does
        if "int8" not in name and "int4" not in name:  # quantized paths may flip a near-tie; float ones may not
            assert v["greedy_tokens"] == fp32["greedy_tokens"], name
        assert v["ms_per_token"] > 0 and v["prefill_tok_s"] > 0 and v["prefill_len"] == 16
    assert variants["sparse70_int8_head"]["sparse_layers"] == variants["sparse70_int8"]["sparse_layers"] + 1
    assert variants["sparse70_bf16"]["model_mb"] < variants["dense_bf16"]["model_mb"]
    metrics = flat_metrics({"decode": result})
    assert "bench/cpu/decode_2l/sparse70_int8_head/prefill_tok_s" in metrics


def test_machine_record_names_the_isa_caps(monkeypatch):
    """Benchmark JSON says which ISA caps were set (an AVX-512 machine emulating an AVX2-only one),
    and only those: an unset or empty variable is not a cap."""
    from sparsify.bench.cpu import ISA_CAP_VARIABLES, machine_info

    for name in ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert machine_info()["isa_caps"] == {}
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    assert machine_info()["isa_caps"] == {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def test_on_avx2_int8_layers_hold_the_gather_index_and_the_layer_benchmark_times_it(monkeypatch):
    """Where the kernels run AVX2, SparseLinear prepares W8A8 weights of ≥ 60% sparsity with the gather
    index (ops.for_isa), and a 70% INT8 model decodes (batch-1 calls: the gather kernel) with its quantized
    reference's logits; the layer benchmark's @avx2 variant runs the same prepared weight, checked against
    its reference, and counts the index's bytes instead of the bitmask's at batch 1."""
    from sparsify.bench.cpu import make_layer_variant
    from sparsify.inference.kernels import kernel_isa, ops

    if kernel_isa() not in ("avx2", "avx512"):
        pytest.skip("no AVX2 kernels on this CPU")
    monkeypatch.setitem(ops._isa_cache, "isa", 1)  # the AVX2 path, as on an AVX2-only CPU
    model = tiny_llama()
    reference = copy.deepcopy(model)
    sparsify_model(model, int8="w8a8")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert layers and all(m.packed.columns is not None for m in layers.values())
    with torch.no_grad():
        for name, module in layers.items():  # the fp32 model with the dequantized codes, fake-quantized input
            reference.get_submodule(name).weight.copy_(dequantize(module.packed))
            reference.get_submodule(name).register_forward_pre_hook(FakeQuantInput())
        for prompt in PROMPTS:  # one sequence: every decoder Linear call has one row of x
            assert torch.allclose(model(prompt[None]).logits, reference(prompt[None]).logits, atol=1e-3, rtol=1e-3)
    dense = torch.randn(96, 320)
    cache: dict = {}
    _, nbytes, out, ref = make_layer_variant("sparse70_int8@avx2", dense, batch=1, cache=cache, rotate_bytes=0)
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 output and activations
    _, nbytes_b2, _, _ = make_layer_variant("sparse70_int8@avx2", dense, batch=2, cache=cache, rotate_bytes=0)
    held = cache["sparse70_int8/copies@avx2"][0]
    assert held.columns is not None
    _, nbytes_b8, _, _ = make_layer_variant("sparse70_int8@avx2", dense, batch=8, cache=cache, rotate_bytes=0)
    gathered = held.nbytes - held.bitmask.numel() + held.columns.numel()
    assert nbytes == nbytes_b2 == gathered and nbytes_b8 == held.nbytes  # from 8 rows of x: outer.h, the bitmask


def test_layer_benchmark_in_cache_is_recorded_and_still_checked(tmp_path):
    """`--in-cache` reaches the layer benchmark (no weight copies rotated: the compute ceiling) and the
    JSON says so; the default rotates copies past the L3. Both still check every variant's output."""
    import json

    from sparsify.bench.cpu import ROTATE_BYTES, main

    args = ["--no-decode", "--shapes", "32x256", "--batches", "1", "--repeats", "1", "--variants", "dense_fp32"]
    args += ["sparse70_int8"]
    for flag, rotate in (["--in-cache"], 0), ([], ROTATE_BYTES):
        result = main([str(tmp_path / str(rotate)), *args, *flag])
        saved = json.loads((tmp_path / str(rotate) / "sparse_kernels.json").read_text())
        assert saved["layers"]["rotate_bytes"] == result["layers"]["rotate_bytes"] == rotate
        rows = result["layers"]["rows"]
        assert {r["variant"].split("@")[0] for r in rows} == {"dense_fp32", "sparse70_int8"}
        assert all(r["rel_err_vs_own_weights"] < 2e-2 for r in rows)
