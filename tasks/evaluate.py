"""Stage `eval-<model>`: score one checkpoint with lm-evaluation-harness, and its recovery.

The pipeline's own tasks (data/tasks) are exposed to lm-eval as local tasks whose
YAML is generated from the task definitions; standard lm-eval task names in
`evaluate.extra_tasks` pass straight through. Recovery is metric ÷ the reference
model's metric (`base` for pruned models), per task and averaged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sparsify.config import Config
from sparsify.downstream import get_task
from sparsify.evaluation import evaluate_model, load_for_eval, write_lmeval_tasks
from sparsify.io import atomic_write_json
from sparsify.recovery import recovery_where_defined
from tasks.common import Layout, StageResult

log = logging.getLogger(__name__)


def results_path(layout: Layout, model: str) -> Path:
    return layout.reports / "eval" / f"{model}.json"


def samples_path(layout: Layout, model: str) -> Path:
    """Every scored document: the model's output beside the target, with its scores (JSONL)."""
    return layout.reports / "eval" / f"{model}.samples.jsonl"


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{metric}": value for task, ms in results.items() for metric, value in ms.items()}


def run(cfg: Config, *, model: str, variant: str, tasks: tuple[str, ...], reference: str | None) -> StageResult:
    """Score models/<model> on the local `tasks` (plus `evaluate.extra_tasks`); recovery vs `reference`."""
    layout = Layout.of(cfg)
    manifest = json.loads((layout.task_data / "manifest.json").read_text())
    specs = []
    for task in tasks:
        entry = manifest.get(task, {}).get("test")
        if entry is None:
            raise ValueError(f"task {task!r} has no test split in {layout.task_data}; rerun the taskdata stage")
        specs.append((get_task(task), layout.task_data / entry["file"]))
    include = cfg.root / ".lmeval" / model  # generated task YAML, rewritten on every run
    write_lmeval_tasks(specs, include)

    net, tokenizer = load_for_eval(layout.model(model))
    names = [spec.name for spec, _ in specs] + list(cfg.evaluate.extra_tasks)
    results = evaluate_model(net, tokenizer, names, include_path=include, limit=cfg.evaluate.limit,
                             batch_size=cfg.evaluate.batch_size, samples_path=samples_path(layout, model))
    metrics = flat_metrics(results)
    if reference is not None:
        ref_file = results_path(layout, reference)
        if not ref_file.is_file():
            raise ValueError(f"no evaluation of the reference model {reference!r} at {ref_file}; run eval-{reference}")
        metrics.update(recovery_where_defined(results, json.loads(ref_file.read_text())["results"])[0])
    out = results_path(layout, model)
    atomic_write_json(out, {"model": model, "variant": variant, "reference": reference, "results": results})
    samples = samples_path(layout, model)
    return StageResult(metrics=metrics, outputs=[out, samples], variant=variant, artifacts=[out, samples])
