"""What every stage shares: the output layout, results, provenance and the metrics file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sparsify.checkpoint import MASKS
from sparsify.errors import SparsellamaError
from sparsify.evaluation.metrics import token_nll
from sparsify.io import atomic_write_json, remove_stale_temporaries, restore_moved_aside
from tasks.config import Config


@dataclass(frozen=True)
class Layout:
    """Where outputs live under `project.root` (the same relative paths dvc.yaml declares)."""

    root: Path

    @classmethod
    def of(cls, cfg: Config) -> Layout:
        return cls(cfg.root)

    @property
    def corpus(self) -> Path:
        return self.root / "data" / "corpus"

    @property
    def task_data(self) -> Path:
        return self.root / "data" / "tasks"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def stamp(self, stage: str) -> Path:
        """The record of a finished stage's fingerprint (see tasks.runner)."""
        return self.root / ".stamps" / f"{stage}.json"

    def eval_results(self, model: str) -> Path:
        """An eval stage's scores (JSON): what the report and later evaluations read."""
        return self.reports / "eval" / f"{model}.json"

    def eval_samples(self, model: str) -> Path:
        """Every scored document: the model's output beside the target, with its scores (JSONL)."""
        return self.reports / "eval" / f"{model}.samples.jsonl"

    def eval_details(self, model: str) -> Path:
        """lm-eval's own record of the run: task versions, n-shot, task configs (JSON)."""
        return self.reports / "eval" / f"{model}.lmeval.json"


def checkpoint_mb(path: Path) -> float:
    """On-disk size of a checkpoint's weight files (what a deployment ships; the masks are for training)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors") if p.name != MASKS) / 2**20


def is_main_process() -> bool:
    """False on the other ranks of a `torchrun` launch: rank 0 alone saves models, writes metrics
    and stamps and logs to MLflow; the other ranks only take part in the training."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def resume_dir(cfg: Config, stage: str) -> Path:
    """Where a long stage keeps its resume state (tasks.stages.Stage.resume_dir)."""
    return cfg.root / ".resume" / stage


def claim_resume(path: Path, fingerprint: str) -> bool:
    """Make `path` hold resume state for this fingerprint only; True if earlier state was discarded.

    State left by an interrupted attempt with the same fingerprint is kept (the stage continues
    from it); state of a different configuration or input (an interrupted run whose params were
    changed since) is discarded, since it can never be resumed.
    """
    # Beside the folder, not in it: the trainer replaces its checkpoint folder wholesale.
    marker = path.parent / ".fingerprints" / f"{path.name}.json"
    discarded = False
    # A kill between the two renames of the trainer's checkpoint swap left the folder moved aside:
    # put it back, or the stage would start over from step 0 (found by test_crash_anywhere).
    restore_moved_aside(path)
    for written in (path, marker):  # a killed checkpoint write leaves up to a model + its optimizer state
        remove_stale_temporaries(written, replaced=True)
    if path.exists():
        recorded = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        if recorded != fingerprint:
            discarded = any(p.name != "COMPLETE.json" for p in path.iterdir())
            shutil.rmtree(path)
    atomic_write_json(marker, {"fingerprint": fingerprint})
    path.mkdir(parents=True, exist_ok=True)
    return discarded


def release_resume(path: Path) -> None:
    """The stage's outputs are written: drop its resume state, keeping the folder marked complete
    (dvc.yaml declares it a persistent output, which must exist after the stage ran)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "COMPLETE.json", {"complete": True})


def val_perplexities(cfg: Config, model, corpus, device) -> dict[str, float]:
    """`ppl/val` of every stage, and `ppl/val/<source>` for each source of the mix.

    The same validation blocks every time (the first `evaluate.val_blocks`, which the data stage
    writes with the sources interleaved), so stages compare. One forward pass: each predicted
    token's loss is attributed to the source it came from, so the overall figure is exactly the
    token-weighted mix of the per-source ones.
    """
    blocks = corpus.blocks("val")
    n = min(cfg.evaluate.val_blocks, len(blocks))
    nll = token_nll(model.to(device), blocks, max_blocks=n, batch_size=cfg.evaluate.batch_size, device=device)
    out = {"ppl/val": math.exp(nll.mean())}
    owner = corpus.token_sources("val")
    names = corpus.source_names
    if owner is not None and len(names) > 1:
        size = blocks.shape[1]
        predicted = owner[: n * size].reshape(n, size)[:, 1:]  # the source of each predicted token
        for i, name in enumerate(names):
            picked = predicted == i
            if picked.any():
                out[f"ppl/val/{name}"] = math.exp(nll[picked].mean())
    return out


def val_perplexity(cfg: Config, model, corpus, device) -> float:
    """The overall `ppl/val` alone (see `val_perplexities`)."""
    return val_perplexities(cfg, model, corpus, device)["ppl/val"]


@dataclass(frozen=True)
class Evaluated:
    """A model the report compares: which checkpoint, on which tasks, against which reference."""

    model: str  # models/<model>
    variant: str  # dense, sparse50, sparse70-oneshot, sparse70-baseline, ...
    tasks: tuple[str, ...]
    reference: str | None  # the model recovery is measured against


@dataclass
class StageResult:
    metrics: dict[str, float]
    outputs: list[Path]
    variant: str = "dense"
    artifacts: list[Path] = field(default_factory=list)  # small files worth attaching to the MLflow run
    history: list[dict] = field(default_factory=list)  # per-step curves, logged as metric histories
    params: dict[str, str] = field(default_factory=dict)  # run facts that are not numbers (e.g. the kernel ISA)


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance(stage: str, cfg: Config, sections: tuple[str, ...], parents: list[Path]) -> dict:
    """The record saved next to each checkpoint: which stage, with which config, from which inputs."""
    dump = cfg.model_dump(mode="json")
    return {
        "stage": stage,
        "config": {s: dump[s] for s in sections},
        "parents": [str(p) for p in parents],
        "git_commit": git_commit(),
    }


def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    """DVC metrics file, grouped by the first '/' of the metric names (`ppl/val` → {"ppl": {"val": …}}).

    Only the first segment nests: `recovery/docsum` and `recovery/docsum/rougeL` both exist,
    so deeper nesting would need a key to be both a value and a group.
    """
    tree: dict = {}
    for key, value in sorted(metrics.items()):
        group, _, rest = key.partition("/")
        if rest:
            tree.setdefault(group, {})[rest] = value
        else:
            tree[group] = value
    atomic_write_json(path, tree)


def read_metrics(path: Path) -> dict[str, float]:
    """The inverse of `write_metrics`: flat `group/name` keys."""
    tree = json.loads(Path(path).read_text())
    out: dict[str, float] = {}
    for group, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{group}/{k}": v for k, v in value.items()})
        else:
            out[group] = value
    return out


class RootBusy(SparsellamaError, RuntimeError):
    """Another pipeline run is writing to the same project root."""


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".pipeline.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RootBusy(
                f"another pipeline run is using {root}; give this run its own "
                f"project.root (e.g. --set project.root=runs/<name>)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
