"""Stage `data`: subset, mix, dedup, split, tokenize and pack the pretraining corpus."""

from __future__ import annotations

import logging

from sparsify.config import Config
from sparsify.data import build_corpus
from sparsify.io import atomic_dir
from tasks.common import Layout, StageResult

log = logging.getLogger(__name__)


def run(cfg: Config) -> StageResult:
    out = Layout.of(cfg).corpus
    with atomic_dir(out) as tmp:
        stats = build_corpus(cfg.data, tmp, seed=cfg.project.seed)
    log.info("corpus: %s train / %s val tokens, %d duplicates removed, peak RSS %.0f MB",
             f"{stats['tokens']['train']:,}", f"{stats['tokens']['val']:,}",
             stats["duplicates_removed"], stats["peak_rss_mb"])
    metrics = {
        "data/train_tokens": stats["tokens"]["train"],
        "data/val_tokens": stats["tokens"]["val"],
        "data/duplicates_removed": stats["duplicates_removed"],
        "data/vocab_size": stats["vocab_size"],
        "data/peak_rss_mb": stats["peak_rss_mb"],
        "time/data_s": stats["seconds"],
    }
    return StageResult(metrics=metrics, outputs=[out], variant="dense", artifacts=[out / "stats.json"])
