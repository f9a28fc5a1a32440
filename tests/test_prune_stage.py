"""The prune stages on the smoke base model: masks, sparsity, iterative levels, outputs."""

from __future__ import annotations

import json

import torch

from sparsify.masks import load_masks
from sparsify.model import load_model
from tasks import base
from tasks.runner import execute
from tasks.stages import get
from tests.conftest import smoke_config


def test_prune_levels_chain_and_keep_old_zeros(smoke_root):
    cfg = smoke_config(smoke_root, "tracking.enabled=false", "base.train.steps=30")
    base.run(cfg)
    results = {name: execute(get(cfg, name), cfg) for name in ("prune50", "prune70")}
    masks = {}
    for name, target in (("prune50", 0.5), ("prune70", 0.7)):
        out = smoke_root / "models" / name
        metrics = results[name].metrics
        assert abs(metrics["sparsity/global"] - target) < 1e-3
        assert metrics["time/prune_s"] > 0 and metrics["ppl/val"] > 1
        assert results[name].variant == f"sparse{round(target * 100)}"
        masks[name] = load_masks(out / "masks.safetensors")
        model = load_model(out)
        params = dict(model.named_parameters())
        for key, mask in masks[name].items():  # the saved weights hold exactly the mask's zeros
            assert torch.count_nonzero(params[key][~mask]) == 0
        assert "lm_head.weight" not in masks[name] and "model.embed_tokens.weight" not in masks[name]
        assert (out / "sparsity.png").stat().st_size > 0
        assert json.loads((out / "provenance.json").read_text())["stage"] == name
        assert json.loads((smoke_root / "metrics" / f"{name}.json").read_text())["sparsity"]["target"] == target
    for key, old in masks["prune50"].items():  # 70% keeps every zero of 50%
        assert not (masks["prune70"][key] & ~old).any()
    assert not (smoke_root / ".resume" / "prune50").exists()
