"""Masks as data: prunable names, save/load, apply/check, sparsity report and plot."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaForCausalLM

from sparsify.sparsity.masks import (
    apply_masks,
    check_masks,
    find_decoder_layers,
    load_masks,
    plot_sparsity,
    prunable_linear_names,
    save_masks,
    sparsity_report,
)
from tests.conftest import tiny_llama

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture()
def model() -> LlamaForCausalLM:
    # LlamaConfig's default max_position_embeddings (2048): rotary tables do not change the weights drawn
    return tiny_llama(max_position_embeddings=2048)


def half_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: torch.rand(params[name].shape) > 0.5 for name in prunable_linear_names(model)}


def test_prunable_names_are_decoder_linears_only(model):
    names = prunable_linear_names(model)
    assert len(names) == 14 and Q in names and DOWN in names
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in names)
    assert find_decoder_layers(model)[0] == "model.layers"
    assert prunable_linear_names(model.model)[0] == "layers.0.self_attn.q_proj.weight"  # a bare LlamaModel


def test_ignore_patterns_glob_and_regex(model):
    names = prunable_linear_names(model, ["*.mlp.down_proj", r"re:model\.layers\.0\.self_attn\.[qk]_proj"])
    assert DOWN not in names and Q not in names and len(names) == 14 - 2 - 2
    assert "model.layers.0.self_attn.v_proj.weight" in names


def test_find_decoder_layers_refuses_other_models():
    with pytest.raises(ValueError, match="no decoder layers"):
        find_decoder_layers(nn.Linear(4, 4))


def test_save_load_round_trip(model, tmp_path):
    masks = half_masks(model)
    path = tmp_path / "out" / "masks.safetensors"
    save_masks(masks, path)
    loaded = load_masks(path)
    assert loaded.keys() == masks.keys()
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]) for k in masks)
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]  # no temp file left behind


def test_saved_masks_are_the_same_bytes_every_time(model, tmp_path):
    """safetensors orders the header's metadata at random per save; the masks file must not (a resumed
    run's masks differed in bytes from an uninterrupted run's, test_crash_anywhere)."""
    masks = half_masks(model)
    files = []
    for i in range(8):  # two metadata entries: one random order in 2 per save
        save_masks(masks, tmp_path / f"{i}.safetensors")
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    header = files[0][8 : 8 + int.from_bytes(files[0][:8], "little")].decode()
    assert '"__metadata__":{"content":"sparsity masks (True = kept)","format":"pt"}' in header
    assert load_masks(tmp_path / "0.safetensors").keys() == masks.keys()


def test_load_accepts_uint8_and_refuses_other_dtypes(tmp_path):
    save_file({"a": torch.tensor([[0, 1]], dtype=torch.uint8)}, tmp_path / "u8.safetensors")
    assert load_masks(tmp_path / "u8.safetensors")["a"].tolist() == [[False, True]]
    save_file({"a": torch.zeros(2)}, tmp_path / "f32.safetensors")
    with pytest.raises(ValueError, match="'a' must be a bool"):
        load_masks(tmp_path / "f32.safetensors")


def test_load_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        load_masks(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        load_masks(bad)


def test_apply_then_check(model):
    masks = half_masks(model)
    with torch.no_grad():
        model.get_parameter(Q)[0, 0] = float("nan")
    masks[Q][0, 0] = False
    apply_masks(model, masks)
    check_masks(model, masks)
    params = dict(model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in masks.items())
    assert not params[Q].requires_grad or params[Q].grad is None
    with torch.no_grad():
        params[DOWN][~masks[DOWN]] = 1.0
    with pytest.raises(ValueError, match=DOWN):
        check_masks(model, masks)


def test_bad_masks_name_the_key_and_leave_the_model_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad_name = {Q: torch.zeros(32, 32).bool(), "model.layers.7.mlp.up_proj.weight": torch.ones(2, 2).bool()}
    with pytest.raises(ValueError, match="layers.7.mlp.up_proj"):
        apply_masks(model, bad_name)
    with pytest.raises(ValueError, match=r"q_proj.weight' has shape \(32, 16\)"):
        apply_masks(model, {Q: torch.ones(32, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        check_masks(model, {Q: torch.ones(32, 16, dtype=torch.bool)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sparsity_report(model):
    masks = {Q: torch.zeros(32, 32, dtype=torch.bool), DOWN: torch.ones(32, 64, dtype=torch.bool)}
    apply_masks(model, masks)
    report = sparsity_report(model, masks)
    assert report["layers"][Q] == 1.0 and report["layers"][DOWN] == 0.0
    assert report["global"] == pytest.approx(1024 / report["total"]) and report["zeros"] == 1024
    assert report["mask_layers"] == {Q: 1.0, DOWN: 0.0}
    assert report["mask_global"] == pytest.approx(1024 / (1024 + 2048))
    assert Q not in sparsity_report(model, ignore=["*.q_proj"])["layers"]


def test_plot_sparsity_writes_a_png(model, tmp_path):
    apply_masks(model, half_masks(model))
    path = tmp_path / "plots" / "sparsity.png"
    plot_sparsity(sparsity_report(model), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
