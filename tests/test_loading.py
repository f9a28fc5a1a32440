"""Loading pipeline outputs onto the sparse runtime: the project's sparse format (float, INT8, INT4)
and HF folders. Logits equal the dense model holding the same zeros; sparse weights are never densified."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GenerationConfig

from sparsify.inference.engine import default_eos_ids
from sparsify.inference.export import save_sparse_model
from sparsify.inference.kernels import load_extension
from sparsify.inference.loading import ModelLoadError, UnsupportedLayer, load_runtime_model
from sparsify.inference.runtime import DECODE_ATTENTION, SparseLinear, sparsify_model
from sparsify.quant.quantization import QuantScheme
from sparsify.safetensors_io import SafetensorsReadError, read_safetensors_mmap
from tests.serve_fixtures import (
    extension,  # noqa: F401  (a pytest fixture)
    quantize_rtn,
    sparse_llama,
    tokenizer,  # noqa: F401  (a pytest fixture)
    write_sparse_folder,
)

IDS = torch.tensor([[300, 5, 17, 99, 3, 42, 8, 1, 250], [300, 64, 2, 2, 77, 13, 120, 31, 299]])


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def in_mapping(t: torch.Tensor, ranges) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in ranges)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_sparse_format_loads_onto_the_kernels_with_the_dense_logits(tmp_path, tokenizer, dtype):
    model, masks = sparse_llama()
    model.to(dtype)
    folder = write_sparse_folder(model, masks, tmp_path / "m", tokenizer)
    loaded = load_runtime_model(folder)
    assert loaded.format == "sparse" and loaded.tokenizer.eos_token == "<|eot_id|>"
    assert sorted(loaded.sparse_layers) == sorted(n.removesuffix(".weight") for n in masks)
    for name in masks:  # every sparse weight is a SparseLinear; no dense parameter of it exists
        module = loaded.model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, SparseLinear) and module.packed.dtype == dtype
    params = dict(loaded.model.named_parameters())
    assert not any(n in params for n in masks)
    assert all(p.dtype == dtype for p in params.values())
    # Zero copy: bitmasks (hidden 64 = one 64-bit word per row), offsets and dense tensors are views of the file.
    ranges = file_mappings(folder / "sparse_model.safetensors")
    assert ranges
    q = loaded.model.model.layers[0].self_attn.q_proj.packed
    assert in_mapping(q.bitmask, ranges) and in_mapping(q.offsets, ranges)
    assert in_mapping(loaded.model.model.embed_tokens.weight, ranges)
    down = loaded.model.model.layers[0].mlp.down_proj.packed  # 160 columns: re-padded to 3 words per row
    assert down.bitmask.shape == (64, 24) and not in_mapping(down.bitmask, ranges)
    assert torch.equal(down.mask(), masks["model.layers.0.mlp.down_proj.weight"])
    # Decode steps of model.generate() attend through the kernel, as for a model sparsified from a HF folder.
    if load_extension() is not None:
        assert loaded.model.config._attn_implementation == DECODE_ATTENTION

    expected, got = model(IDS).logits.float(), loaded.model(IDS).logits.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert torch.equal(got[:, -1].argmax(-1), expected[:, -1].argmax(-1))


@torch.no_grad()
@pytest.mark.parametrize("activation_bits", [8, None], ids=["w8a8", "w8a16"])
def test_int8_sparse_format_loads_its_codes(tmp_path, tokenizer, activation_bits):
    source, masks = sparse_llama()
    model = quantize_rtn(source, masks, QuantScheme(weight_bits=8, group_size=None, activation_bits=activation_bits))
    folder = write_sparse_folder(model, masks, tmp_path / "q", tokenizer)
    loaded = load_runtime_model(folder)
    up = loaded.model.model.layers[1].mlp.up_proj
    assert isinstance(up, SparseLinear) and up.packed.dtype == torch.int8
    assert up.packed.act_int8 == (activation_bits == 8)
    ref = model.model.layers[1].mlp.up_proj
    assert torch.equal(up.packed.scales, ref.weight_scales.float().reshape(-1))
    # Exactly what the runtime computes for the in-memory quantized model (same codes, scales, kernels)...
    in_memory = copy.deepcopy(model)
    sparsify_model(in_memory, int8=True if activation_bits == 8 else "w8a16")
    got = loaded.model(IDS).logits
    assert torch.equal(got, in_memory(IDS).logits)
    # ...and close to the quantized model's own fake-quantized forward (an activation code landing on the
    # other side of a rounding boundary moves a logit by ~1e-2 here).
    expected = model(IDS).logits
    assert (got - expected).abs().max() <= 0.005 * expected.abs().max()


@torch.no_grad()
@pytest.mark.parametrize("activation_bits", [None, 8], ids=["w4a16", "w4a8"])
def test_int4_sparse_format_loads_its_codes(tmp_path, tokenizer, activation_bits):
    """INT4 layers (per-row scales: the tiny model's 160-wide down_proj fits no group of 64) are re-packed
    from the export's row-padded nibbles into the kernels' layout with their exact codes and scales."""
    source, masks = sparse_llama()
    scheme = QuantScheme(weight_bits=4, group_size=None, activation_bits=activation_bits)
    model = quantize_rtn(source, masks, scheme)
    folder = write_sparse_folder(model, masks, tmp_path / "q4", tokenizer)
    loaded = load_runtime_model(folder)
    up = loaded.model.model.layers[1].mlp.up_proj
    assert isinstance(up, SparseLinear) and up.packed.dtype == torch.int4
    assert up.packed.act_int8 == (activation_bits == 8) and up.packed.group_size is None
    ref = model.model.layers[1].mlp.up_proj
    assert torch.equal(up.dense_weight(), ref.weight.float())  # codes · scales: the quantized model's weight
    in_memory = copy.deepcopy(model)  # the same codes packed in memory run the same kernels: the same logits
    sparsify_model(in_memory, int4=True)
    got = loaded.model(IDS).logits
    assert torch.equal(got, in_memory(IDS).logits)
    expected = model(IDS).logits
    assert (got - expected).abs().max() <= (1e-4 if activation_bits is None else 0.005) * expected.abs().max()


def test_int4_groups_the_kernels_cannot_tile_are_refused_by_name(tmp_path, tokenizer):
    source, masks = sparse_llama()
    model = quantize_rtn(source, masks, QuantScheme(weight_bits=4, group_size=32, activation_bits=None))
    folder = write_sparse_folder(model, masks, tmp_path / "q4", tokenizer)
    with pytest.raises(UnsupportedLayer, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: .*multiple of 64"):
        load_runtime_model(folder)


@torch.no_grad()
def test_quantize_stage_layout_and_tied_embeddings(tmp_path, tokenizer):
    """<output>/sparse is found from <output>, the tokenizer from <output>; a tied lm_head stays tied."""
    model, masks = sparse_llama(tie_word_embeddings=True)
    save_sparse_model(model, masks, tmp_path / "out" / "sparse")  # config.json only, as the quantize stage writes
    tokenizer.save_pretrained(tmp_path / "out")
    GenerationConfig(bos_token_id=300, eos_token_id=[304, 301]).save_pretrained(tmp_path / "out")
    loaded = load_runtime_model(tmp_path / "out")
    assert loaded.format == "sparse" and loaded.name == "out"
    assert loaded.model.generation_config.eos_token_id == [304, 301]  # the parent's generation config
    assert default_eos_ids(loaded.model, loaded.tokenizer) == [301, 304]
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model(IDS).logits, model(IDS).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_hf_folder_runs_its_sparse_layers_on_the_kernels(tmp_path, tokenizer):
    model, masks = sparse_llama()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    loaded = load_runtime_model(tmp_path / "hf")
    assert loaded.format == "hf" and len(loaded.sparse_layers) == len(masks)
    assert isinstance(loaded.model.model.layers[0].mlp.gate_proj, SparseLinear)
    assert isinstance(loaded.model.lm_head, nn.Linear)
    torch.testing.assert_close(loaded.model(IDS).logits, model(IDS).logits, atol=1e-4, rtol=1e-4)
    dense, _ = sparse_llama(sparsity=0.0)
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    assert load_runtime_model(tmp_path / "dense").sparse_layers == {}


def test_bad_folders_name_the_problem(tmp_path, tokenizer):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_runtime_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_runtime_model(tmp_path / "empty")
    model, masks = sparse_llama()
    folder = write_sparse_folder(model, masks, tmp_path / "notok")
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_runtime_model(folder)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "sparse_model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(SafetensorsReadError, match="not a readable safetensors"):
        read_safetensors_mmap(tmp_path / "junk" / "sparse_model.safetensors")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_runtime_model(tmp_path / "junk")


def test_mmap_reader_matches_safetensors(tmp_path):
    from safetensors import safe_open

    model, masks = sparse_llama(tie_word_embeddings=True)
    folder = write_sparse_folder(model.to(torch.bfloat16), masks, tmp_path / "m")
    ours, metadata = read_safetensors_mmap(folder / "sparse_model.safetensors")
    with safe_open(folder / "sparse_model.safetensors", framework="pt") as f:
        assert metadata == f.metadata() and sorted(ours) == sorted(f.keys())
        for key in f.keys():  # noqa: SIM118
            assert ours[key].dtype == f.get_tensor(key).dtype and torch.equal(ours[key], f.get_tensor(key)), key
    assert json.loads(metadata["tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}


@torch.no_grad()
def test_compressed_tensors_checkpoint_runs_through_transformers(tmp_path, tokenizer):
    """A compressed-tensors folder (no sparse/ beside it) is not packed: its Linears hold compressed weights and
    their own activation quantization, which transformers' integration runs exactly."""
    from sparsify.inference.engine import Engine
    from sparsify.inference.export import save_compressed_tensors
    from sparsify.inference.generation import SamplingParams

    source, masks = sparse_llama()
    model = quantize_rtn(source, masks, QuantScheme(weight_bits=8, group_size=None, activation_bits=8))
    save_compressed_tensors(model, tmp_path / "ct", tokenizer=tokenizer)
    loaded = load_runtime_model(tmp_path / "ct")
    assert loaded.format == "hf" and loaded.sparse_layers == {}
    torch.testing.assert_close(loaded.model(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
    engine = Engine(loaded.model, loaded.tokenizer)
    try:
        outs = list(engine.generate([300, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True)))
    finally:
        engine.stop()
    assert outs[-1].completion_tokens == 5


@torch.no_grad()
def test_values_are_used_in_place_from_the_file_and_older_files_without_padding_still_load(tmp_path, tokenizer):
    """The format stores the kernels' 64 bytes of zeros after each layer's values, so the runtime keeps the
    memory-mapped values (no copy of GBs); a file written before that (no padding) loads to the same model."""
    from safetensors.torch import save_file

    from sparsify.inference.export import SPARSE_FILE
    from sparsify.inference.loading import _padded_values

    model, masks = sparse_llama()
    model = quantize_rtn(model, masks, QuantScheme(weight_bits=8, group_size=None, activation_bits=8))
    folder = write_sparse_folder(model, masks, tmp_path / "new", tokenizer)
    tensors, metadata = read_safetensors_mmap(folder / SPARSE_FILE)
    name = "model.layers.0.mlp.up_proj.weight"
    stored, values = int(tensors[f"{name}.row_ptr"][-1]), tensors[f"{name}.values"]
    assert values.dtype == torch.int8 and values.numel() == stored + 64 and not values[stored:].any()
    new = load_runtime_model(folder)
    packed = new.model.get_submodule(name.removesuffix(".weight")).packed
    assert torch.equal(packed.values, values)
    row_ptr = tensors[f"{name}.row_ptr"]
    assert _padded_values(values, row_ptr) is values  # the mapping itself, not a copy
    copied = _padded_values(values[:stored], row_ptr)  # no padding stored: one copy, padded
    assert copied.numel() == values.numel() and torch.equal(copied, values)
    # The file written without the padding (as before): the loader copies, the model is the same.
    (tmp_path / "old").mkdir()
    for f in folder.iterdir():
        if f.name != SPARSE_FILE:
            (tmp_path / "old" / f.name).write_bytes(f.read_bytes())
    trimmed = {
        k: (v[: int(tensors[k.replace(".values", ".row_ptr")][-1])] if k.endswith(".values") else v).clone()
        for k, v in tensors.items()
    }
    save_file(trimmed, tmp_path / "old" / SPARSE_FILE, metadata=metadata)
    old = load_runtime_model(tmp_path / "old")
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    assert torch.equal(old.model(ids).logits, new.model(ids).logits)
    assert torch.equal(old.model.get_submodule(name.removesuffix(".weight")).packed.values, packed.values)
