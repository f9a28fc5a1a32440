"""Stage `data`: subset, mix, dedup, split, tokenize and pack the pretraining corpus."""

from __future__ import annotations

import logging

from sparsify.checkpoint import load_tokenizer
from sparsify.data.corpus import build_corpus, check_tokenizer_for_model
from sparsify.data.downstream import check_chat_template
from sparsify.io import atomic_dir
from tasks.common import Layout, StageResult
from tasks.config import Config

log = logging.getLogger(__name__)


def preflight(cfg: Config) -> None:
    """The checks that need the tokenizer, run before any work (the flow calls this first):
    with a base checkpoint every token is written with the checkpoint's own tokenizer, and a
    chat task needs a tokenizer with a chat template."""
    if not cfg.tokenizer_source:
        return  # the embedded default trains its own BPE, which carries a chat template
    tokenizer = load_tokenizer(cfg.tokenizer_source, hub=True)
    if cfg.base.source and cfg.data.tokenizer:
        check_tokenizer_for_model(tokenizer, cfg.base.source)
    check_chat_template(cfg.downstream.tasks, tokenizer, cfg.tokenizer_source)


def run(cfg: Config) -> StageResult:
    preflight(cfg)
    out = Layout.of(cfg).corpus
    with atomic_dir(out) as tmp:
        data_cfg = cfg.data.model_copy(update={"tokenizer": cfg.tokenizer_source})
        stats = build_corpus(data_cfg, tmp, seed=cfg.project.seed)
    log.info(
        "corpus: %s train / %s val tokens, %d duplicates removed, peak RSS %.0f MB",
        f"{stats['tokens']['train']:,}",
        f"{stats['tokens']['val']:,}",
        stats["duplicates_removed"],
        stats["peak_rss_mb"],
    )
    metrics = {
        "data/train_tokens": stats["tokens"]["train"],
        "data/val_tokens": stats["tokens"]["val"],
        "data/duplicates_removed": stats["duplicates_removed"],
        "data/vocab_size": stats["vocab_size"],
        "data/peak_rss_mb": stats["peak_rss_mb"],
        "time/data_s": stats["seconds"],
    }
    return StageResult(metrics=metrics, outputs=[out], variant="dense", artifacts=[out / "stats.json"])
