"""Stage `base`: the dense base model (the teacher and the starting point for pruning).

Loads an HF Llama-family checkpoint when `base.source` is set; otherwise trains
the embedded default Llama from scratch on the data stage's blocks (checkpoints in
`.resume/base` every `base.train.checkpoint_every` steps, so a killed run resumes) and reports
its validation perplexity against the untrained model's.
"""

from __future__ import annotations

import logging

import torch

from sparsify.checkpoint import PROVENANCE, load_model, load_tokenizer, save_checkpoint
from sparsify.data.corpus import Corpus, DataError, check_tokenizer_for_model
from sparsify.io import atomic_dir, atomic_write_json
from sparsify.model import build_llama, count_parameters, pick_device
from sparsify.sparsity.masks import sparsity_report
from sparsify.training.trainer import train
from tasks.common import (
    Layout,
    StageResult,
    is_main_process,
    provenance,
    release_resume,
    resume_dir,
    val_perplexities,
    val_perplexity,
)
from tasks.config import Config
from tasks.tracking import live_step_logger

log = logging.getLogger(__name__)


def run(cfg: Config, *, output: str) -> StageResult:
    layout = Layout.of(cfg)
    corpus = Corpus.open(layout.corpus)
    tokenizer = load_tokenizer(corpus.tokenizer_path)
    device = pick_device(cfg.project.device)
    val = corpus.blocks("val")
    tc = cfg.base.train
    metrics: dict[str, float] = {}
    history: list[dict] = []
    if cfg.base.source:
        # The corpus must speak the model's token ids: its tokenizer is the checkpoint's own, and no
        # id it holds falls outside the embedding (a corpus built for another model would).
        check_tokenizer_for_model(tokenizer, cfg.base.source, tokenizer_name=f"the corpus tokenizer ({layout.corpus})")
        model = load_model(cfg.base.source, dtype=torch.float32, hub=True)
        rows = model.get_input_embeddings().num_embeddings
        if corpus.meta.get("max_token_id", -1) >= rows:
            raise DataError(
                f"{layout.corpus} holds token id {corpus.meta['max_token_id']}, outside base.source "
                f"{cfg.base.source}'s embedding of {rows} rows; rebuild the corpus (stage data)"
            )
        model.to(device)
    else:
        model = build_llama(cfg.base.arch, tokenizer, seed=cfg.project.seed).to(device)
        metrics["ppl/val_init"] = val_perplexity(cfg, model, corpus, device)
        resume = resume_dir(cfg, "base")
        result = train(
            model,
            corpus.blocks("train"),
            val,
            tc,
            seed=cfg.project.seed,
            device=device,
            checkpoint_dir=resume,
            on_step=live_step_logger(),
        )
        history = result.history
        if not is_main_process():  # torchrun: rank 0 evaluates and saves
            return StageResult(metrics={}, outputs=[], variant="dense")
        metrics.update(
            {
                "train/final_loss": result.final_train_loss,
                "train/tokens_per_s": result.tokens_per_s,
                "time/train_s": result.seconds,
                "train/resumed_from_step": result.start_step,
            }
        )
    metrics.update(val_perplexities(cfg, model, corpus, device))
    report = sparsity_report(model)
    metrics["sparsity/global"] = report["global"]
    metrics["model/params_m"] = count_parameters(model) / 1e6
    log.info(
        "base model: %.2fM params, val ppl %.2f%s",
        metrics["model/params_m"],
        metrics["ppl/val"],
        f" (untrained {metrics['ppl/val_init']:.1f})" if "ppl/val_init" in metrics else "",
    )

    out = layout.root / output
    with atomic_dir(out) as tmp:
        save_checkpoint(
            model.cpu(), tokenizer, tmp, provenance("base", cfg, ("project", "data", "base"), [layout.corpus])
        )
        atomic_write_json(tmp / "train_history.json", history)
    release_resume(resume_dir(cfg, "base"))
    return StageResult(
        metrics=metrics,
        outputs=[out],
        variant="dense",
        history=history,
        artifacts=[out / PROVENANCE, out / "train_history.json"],
    )
