"""Export: compressed-tensors checkpoints read back by transformers, and the project's sparse format."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from sparsify.inference.export import (
    SPARSE_FILE,
    load_sparse_layers,
    load_sparse_tensors,
    pack_bitmask,
    pack_int4_rows,
    save_compressed_tensors,
    save_sparse_model,
    unpack_bitmask,
    unpack_int4_rows,
)
from sparsify.quant.quantization import (
    QuantConfig,
    activation_quantization_disabled,
    check_not_quantized,
    quantized_linears,
)
from sparsify.sparsity.layerwise import prune_model, quantize_model
from sparsify.sparsity.pruning import PruneConfig
from tests.conftest import tiny_llama as conftest_tiny_llama

N_SAMPLES, SEQ_LEN = 4, 16
W8A8 = {}
W4G32 = {"weight_bits": 4, "group_size": 32, "activation_bits": None, "smoothquant": False}


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    return conftest_tiny_llama(hidden_size=64, intermediate_size=128, tie_word_embeddings=tied).eval()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def sparse(request, calib) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    """A 60%-sparse tiny Llama (SparseGPT) and its masks."""
    model = tiny_llama(tied=request.param)
    cfg = PruneConfig(method="sparsegpt", num_samples=N_SAMPLES, seq_len=SEQ_LEN, sparsity=0.6, block_size=32)
    return model, prune_model(model, calib, cfg, progress=False).masks


def quantized(sparse, calib, fields: dict) -> LlamaForCausalLM:
    source, masks = sparse
    model = copy.deepcopy(source)
    cfg = QuantConfig(num_samples=N_SAMPLES, seq_len=SEQ_LEN, block_size=32, **fields)
    quantize_model(model, calib, cfg, masks=masks, progress=False)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_same_weights(model, loaded, names) -> None:
    ours = dict(model.named_parameters())
    theirs = dict(loaded.named_parameters())
    for name in names:
        assert torch.equal(ours[name], theirs[name]), name


# --------------------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize(
    ("fields", "fmt"), [(W8A8, "int-quantized"), (W4G32, "pack-quantized")], ids=["w8a8", "w4a16-g32"]
)
def test_compressed_tensors_round_trip_through_transformers(sparse, calib, tmp_path, fields, fmt):
    model = quantized(sparse, calib, fields)
    save_compressed_tensors(model, tmp_path / "ct")

    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == model.config.sparsellama_quantization["weight_bits"] and weights["symmetric"]
    assert weights["strategy"] == ("group" if fields.get("group_size") else "channel")
    inputs = qc["config_groups"]["group_0"]["input_activations"]
    assert (inputs is None) == (fields.get("activation_bits", 8) is None)
    with safe_open(tmp_path / "ct" / "model.safetensors", framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    key = "model.layers.0.mlp.up_proj.weight"
    if fmt == "int-quantized":
        assert stored[key] == "I8" and stored[f"{key}_scale"] == "F32"
    else:
        assert key not in stored and stored["model.layers.0.mlp.up_proj.weight_packed"] == "I32"
    with pytest.raises(ValueError, match="already quantized"):
        check_not_quantized(tmp_path / "ct")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = calib[:2]
    ours, theirs = logits(model, ids), logits(loaded, ids)  # the first forward decompresses the weights
    assert_same_weights(model, loaded, [f"{n}.weight" for n in quantized_linears(model)])
    with pytest.raises(ValueError, match="already quantized"):
        check_not_quantized(loaded)
    # The dequantized weights are identical, and for W8A8 both sides quantize activations on the same
    # grid: what remains is float rounding (a flipped activation code would move logits by ~1e-3).
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    if fields.get("activation_bits", 8) is not None:
        with activation_quantization_disabled(model):
            float_acts = logits(model, ids)
        assert not torch.allclose(float_acts, ours, rtol=0, atol=1e-4)  # activation quantization is on
        for module in loaded.modules():  # compressed-tensors' switch for its fake quantization
            module.quantization_enabled = False
        torch.testing.assert_close(logits(loaded, ids), float_acts, rtol=0, atol=1e-6)


def test_compressed_tensors_export_needs_a_quantized_model(sparse, tmp_path):
    model, _ = sparse
    with pytest.raises(ValueError, match="no quantized Linear"):
        save_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_weights_changed_after_quantization_are_refused(sparse, calib, tmp_path):
    model = quantized(sparse, calib, W4G32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.001)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj: the weight no longer equals"):
        save_compressed_tensors(model, tmp_path / "ct")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight: the weight no longer equals"):
        save_sparse_model(model, sparse[1], tmp_path / "sparse")


# --------------------------------------------------------------------------- the sparse format


def test_bitmask_and_int4_packing_round_trip():
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(5, 37, generator=g) < 0.4  # width not a multiple of 8, odd counts per row
    mask[0] = False  # an empty row
    bits = pack_bitmask(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (5, 5)
    assert torch.equal(unpack_bitmask(bits, 37), mask)
    assert int(bits[1, 0]) == sum(1 << k for k in range(8) if mask[1, k])  # column 8b+k is bit k of byte b
    codes = torch.randint(-7, 8, (5, 37), generator=g, dtype=torch.int8)
    packed, row_ptr = pack_int4_rows(codes, mask)
    counts = mask.sum(1)
    assert torch.equal(row_ptr.diff(), (counts + 1) // 2) and packed.numel() == int(row_ptr[-1])
    assert torch.equal(unpack_int4_rows(packed, mask), codes[mask])


@pytest.mark.parametrize("fields", [None, W8A8, W4G32], ids=["float", "w8a8", "w4a16-g32"])
def test_sparse_format_round_trips_exactly(sparse, calib, tmp_path, fields):
    source, masks = sparse
    model = copy.deepcopy(source) if fields is None else quantized(sparse, calib, fields)
    save_sparse_model(model, masks, tmp_path / "sparse")
    assert (tmp_path / "sparse" / "config.json").is_file()

    tensors = load_sparse_tensors(tmp_path / "sparse")
    state = model.state_dict()
    assert tensors.keys() == state.keys()
    for key, value in state.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key

    layers, _ = load_sparse_layers(tmp_path / "sparse")
    assert sorted(layers) == sorted(masks)
    layer = layers["model.layers.0.mlp.down_proj.weight"]
    weight = state["model.layers.0.mlp.down_proj.weight"]
    nonzero = layer.nonzero_mask()
    assert torch.equal(nonzero, weight != 0) and not torch.any(nonzero & ~masks["model.layers.0.mlp.down_proj.weight"])
    expected = {None: ("float", torch.float32), "w8": ("int8", torch.int8), "w4": ("int4", torch.uint8)}
    encoding, dtype = expected[None if fields is None else f"w{fields.get('weight_bits', 8)}"]
    assert layer.encoding == encoding and layer.values.dtype == dtype
    assert layer.values.numel() == (int(nonzero.sum()) if encoding != "int4" else int(layer.row_ptr[-1]))
    assert (layer.scales is None) == (fields is None)

    # A fresh model built from the stored tensors computes exactly what the original does.
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(tensors)
    ids = calib[:2]
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)


def test_sparse_format_stores_tied_weights_once(sparse, tmp_path):
    model, masks = sparse
    save_sparse_model(model, masks, tmp_path / "sparse")
    with safe_open(tmp_path / "sparse" / SPARSE_FILE, framework="pt") as f:
        tied = json.loads(f.metadata()["tied"])
        keys = set(f.keys())
    if model.config.tie_word_embeddings:
        assert tied == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head.weight" not in keys
    else:
        assert tied == {} and "lm_head.weight" in keys


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: m | {"model.layers.7.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)}, "names no param"),
        (lambda m: m | {"model.layers.0.mlp.up_proj.weight": torch.ones(64, 128, dtype=torch.bool)}, "has shape"),
        (lambda m: {k: ~v for k, v in m.items()}, "nonzero weights where its mask prunes"),
    ],
)
def test_sparse_format_refuses_masks_that_do_not_match(sparse, tmp_path, make, match):
    model, masks = sparse
    with pytest.raises(ValueError, match=match):
        save_sparse_model(model, make(masks), tmp_path / "sparse")
    assert not (tmp_path / "sparse").exists()


def test_loading_something_else_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "other").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other" / SPARSE_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not in the sparsellama-sparse format"):
        load_sparse_tensors(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        load_sparse_tensors(tmp_path / "missing")


def test_bf16_models_export_bit_identical_weights(calib, tmp_path):
    model = tiny_llama(tied=False).to(torch.bfloat16)
    cfg = QuantConfig(num_samples=N_SAMPLES, seq_len=SEQ_LEN, block_size=32)
    quantize_model(model, calib, cfg, progress=False)
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16)
    logits(loaded, calib[:1])  # decompress
    assert_same_weights(model, loaded, [f"{n}.weight" for n in quantized_linears(model)])
