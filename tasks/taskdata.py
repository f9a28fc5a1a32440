"""Stage `taskdata`: the downstream tasks' train/test records, plus the held-out perplexity task.

Writes `data/tasks/<task>/{train,test}.jsonl` (normalized records: id, prompt, target)
and `data/tasks/manifest.json`. The embedded tasks are generated offline with exact
ground truth; real datasets come from the hub or from `downstream.data_files`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sparsify.checkpoint import load_tokenizer
from sparsify.data.corpus import Corpus
from sparsify.data.downstream import (
    DATASETS,
    apply_chat_template,
    chat_tasks,
    check_chat_template,
    generate_arithmetic,
    generate_docsum,
    load_humaneval,
    load_records,
    split_by_hash,
    text_records,
    write_task_jsonl,
)
from sparsify.errors import ConfigError
from sparsify.io import atomic_dir, atomic_write_json
from tasks.common import Layout, StageResult
from tasks.config import Config

log = logging.getLogger(__name__)

HELDOUT = "heldout"


def task_records(cfg: Config, task: str) -> dict[str, list[dict]]:
    d = cfg.downstream
    if task == "arithmetic":
        return generate_arithmetic(d.train_size, d.test_size, seed=cfg.project.seed)
    if task == "docsum":
        return generate_docsum(d.train_size, d.test_size)
    if task == "humaneval":  # evaluation only; code fine-tuning data is evol_codealpaca
        return {"train": [], "test": load_humaneval(limit=d.test_size)}
    if task not in DATASETS:
        raise ConfigError(f"task {task!r} has no data source; known: arithmetic, docsum, humaneval, {sorted(DATASETS)}")
    files = d.data_files.get(task, {})
    if "test" not in DATASETS[task].splits and "test" not in files:
        # Dolly, Open-Platypus and evol-codealpaca publish one split: hold out a test split from it,
        # by hash of the prompt, so no prompt is in both.
        rows = load_records(task, "train", data_files=files.get("train"))
        return split_by_hash(((r["prompt"], r) for r in rows), d.train_size, d.test_size, test_percent=10)
    out = {}
    for split, size in (("train", d.train_size), ("test", d.test_size)):
        out[split] = load_records(task, split, data_files=files.get(split), limit=size)
    return out


def shortfalls(cfg: Config, splits: dict[str, dict[str, list]]) -> list[str]:
    """One message per split that came out smaller than `downstream` asks: its source has no more
    records (e.g. docsum: the stdlib has ~2,700 documented functions). Empty splits are by design
    (humaneval has no train split) and the held-out documents have their own count."""
    asked = {"train": cfg.downstream.train_size, "test": cfg.downstream.test_size}
    return [
        f"task {task!r} has {len(rows):,} {split} records, fewer than downstream.{split}_size="
        f"{asked[split]:,}: its source has no more"
        for task, records in splits.items()
        if task != HELDOUT
        for split, rows in records.items()
        if rows and len(rows) < asked.get(split, 0)
    ]


def run(cfg: Config) -> StageResult:
    layout = Layout.of(cfg)
    corpus = Corpus.open(layout.corpus)
    tokenizer = load_tokenizer(corpus.tokenizer_path)
    check_chat_template(cfg.downstream.tasks, tokenizer, str(cfg.tokenizer_source or corpus.tokenizer_path))
    out = layout.task_data
    manifest: dict[str, dict] = {}
    metrics: dict[str, float] = {}
    with atomic_dir(out) as tmp:
        splits = {task: task_records(cfg, task) for task in cfg.downstream.tasks}
        for task in chat_tasks(splits):
            splits[task] = {split: apply_chat_template(rows, tokenizer) for split, rows in splits[task].items()}
        for message in shortfalls(cfg, splits):
            log.warning(message)
        splits[HELDOUT] = {"test": text_records(corpus.documents("val", tokenizer, cfg.downstream.heldout_docs))}
        for task, records in splits.items():
            manifest[task] = {}
            for split, rows in records.items():
                if rows:
                    path = write_task_jsonl(rows, tmp / task / f"{split}.jsonl")
                    manifest[task][split] = {"file": str(Path(task) / path.name), "records": len(rows)}
                    metrics[f"taskdata/{task}/{split}_records"] = len(rows)
        atomic_write_json(tmp / "manifest.json", manifest)
    log.info("task data: %s", {t: {s: v["records"] for s, v in m.items()} for t, m in manifest.items()})
    return StageResult(metrics=metrics, outputs=[out], variant="data", artifacts=[out / "manifest.json"])
