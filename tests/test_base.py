"""The dense base model really learns: validation loss falls well below the untrained model's."""

from __future__ import annotations

import json
import math

import torch

from sparsify.checkpoint import load_model, load_tokenizer
from sparsify.data.corpus import Corpus
from sparsify.evaluation.metrics import mean_nll
from sparsify.model import build_llama
from sparsify.training.trainer import lr_at, train
from tasks import base
from tasks.stages import BASE
from tests.conftest import smoke_config


def test_training_lowers_validation_loss(smoke_root):
    cfg = smoke_config(smoke_root, "tracking.enabled=false")
    corpus = Corpus.open(smoke_root / "data" / "corpus")
    tok = load_tokenizer(corpus.tokenizer_path)
    model = build_llama(cfg.base.arch, tok, seed=0)
    val = corpus.blocks("val")
    before = mean_nll(model, val, max_blocks=16)
    result = train(
        model, corpus.blocks("train"), val, cfg.base.train.model_copy(update={"steps": 60}), seed=0, progress=False
    )
    after = mean_nll(model, val, max_blocks=16)
    assert math.log(len(tok)) - 0.3 < before  # untrained ≈ uniform over the vocabulary
    assert after < before - 1.0, (before, after)  # perplexity falls by more than e×
    losses = [row["loss"] for row in result.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_training_is_deterministic_by_seed(smoke_root):
    cfg = smoke_config(smoke_root, "tracking.enabled=false")
    corpus = Corpus.open(smoke_root / "data" / "corpus")
    tok = load_tokenizer(corpus.tokenizer_path)
    tc = cfg.base.train.model_copy(update={"steps": 5})
    weights = []
    for _ in range(2):
        model = build_llama(cfg.base.arch, tok, seed=3)
        train(model, corpus.blocks("train"), None, tc, seed=3, progress=False)
        weights.append(model.model.layers[0].mlp.up_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_lr_schedule_warmup_then_cosine(smoke_cfg):
    tc = smoke_cfg.base.train.model_copy(update={"steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1})
    assert lr_at(0, tc) == 0.1 and lr_at(9, tc) == 1.0
    assert math.isclose(lr_at(10, tc), 1.0) and math.isclose(lr_at(100, tc), 0.1)
    assert math.isclose(lr_at(55, tc), 0.55)  # halfway through the cosine: the midpoint of lr and floor


def test_base_stage_writes_a_loadable_checkpoint(smoke_root):
    cfg = smoke_config(smoke_root, "tracking.enabled=false", "base.train.steps=20")
    result = base.run(cfg, output=BASE)
    assert result.metrics["ppl/val"] < result.metrics["ppl/val_init"]
    assert result.metrics["sparsity/global"] < 0.01
    out = smoke_root / "models" / "base"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "base" and prov["config"]["base"]["train"]["steps"] == 20
    model = load_model(out, dtype=torch.float32)
    corpus = Corpus.open(smoke_root / "data" / "corpus")
    nll = mean_nll(
        model, corpus.blocks("val"), max_blocks=cfg.base.train.eval_blocks, batch_size=cfg.base.train.batch_size
    )
    assert math.isclose(math.exp(nll), result.metrics["ppl/val"], rel_tol=1e-4)
