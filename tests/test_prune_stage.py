"""prune → sparse pretrain → prune further, on the smoke base model: masks, sparsity, outputs."""

from __future__ import annotations

import json

import torch

from sparsify.checkpoint import load_model
from sparsify.sparsity.masks import load_masks
from tasks import base
from tasks.runner import execute
from tasks.stages import BASE, get
from tests.conftest import smoke_config


def _zeros_match_masks(path, masks) -> None:
    params = dict(load_model(path, dtype=torch.float32).named_parameters())
    for key, mask in masks.items():  # the saved weights hold exactly the mask's zeros
        assert torch.count_nonzero(params[key][~mask]) == 0, key


def test_prune_pretrain_prune_keeps_masks_and_old_zeros(smoke_root):
    cfg = smoke_config(smoke_root, "tracking.enabled=false", "base.train.steps=30")
    base.run(cfg, output=BASE)
    results = {name: execute(get(cfg, name), cfg) for name in ("prune50", "pretrain50", "prune70")}
    masks = {}
    for name, target in (("prune50", 0.5), ("prune70", 0.7)):
        out = smoke_root / "models" / name
        metrics = results[name].metrics
        assert abs(metrics["sparsity/global"] - target) < 1e-3
        assert metrics["time/prune_s"] > 0 and metrics["ppl/val"] > 1
        assert results[name].variant == f"sparse{round(target * 100)}-oneshot"
        masks[name] = load_masks(out / "masks.safetensors")
        _zeros_match_masks(out, masks[name])
        assert "lm_head.weight" not in masks[name] and "model.embed_tokens.weight" not in masks[name]
        assert (out / "sparsity.png").stat().st_size > 0
        assert json.loads((out / "provenance.json").read_text())["stage"] == name
        assert json.loads((smoke_root / "metrics" / f"{name}.json").read_text())["sparsity"]["target"] == target

    # Sparse pretraining changed the weights but not the mask.
    pretrained = smoke_root / "models" / "pretrain50"
    assert results["pretrain50"].variant == "sparse50"
    kept = load_masks(pretrained / "masks.safetensors")
    assert kept.keys() == masks["prune50"].keys()
    assert all(torch.equal(kept[k], masks["prune50"][k]) for k in kept)
    _zeros_match_masks(pretrained, kept)
    before = load_model(smoke_root / "models" / "prune50", dtype=torch.float32).state_dict()
    after = load_model(pretrained, dtype=torch.float32).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in kept)
    assert abs(results["pretrain50"].metrics["sparsity/global"] - 0.5) < 1e-3

    for key, old in masks["prune50"].items():  # 70% keeps every zero of 50%
        assert not (masks["prune70"][key] & ~old).any()
    for stage in ("prune50", "pretrain50"):  # resume state spent; the folder stays (a persistent DVC out)
        assert [p.name for p in (smoke_root / ".resume" / stage).iterdir()] == ["COMPLETE.json"]
