"""The Prefect flows: `sparse-llama` (every stage of the table, under one MLflow parent run),
`finetune-task` (one task's branch), `prune-sweep` (methods × sparsities) and `benchmark`.

Stages are submitted as Prefect tasks that wait for the stages producing their inputs,
so independent work (per-task fine-tunes, evaluations) runs side by side, at most
`orchestration.max_parallel` at a time. Finished stages with an unchanged fingerprint
are skipped (see `tasks.runner.execute`), so re-running a failed flow continues from
the stage that failed. One flow run holds a lock on its `project.root`: a second run on
the same folder fails at once instead of overwriting the first one's outputs.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prefect import flow

from sparsify.errors import UserInputError
from tasks import data
from tasks.common import root_lock
from tasks.config import Config, load_config
from tasks.runner import prefect_task, run_tags
from tasks.stages import stages, upstream
from tasks.tracking import Tracker, flatten, tracking_uri

log = logging.getLogger(__name__)


def _publish(cfg: Config, results: dict[str, dict[str, float]], run_ids: dict[str, str | None]) -> None:
    """Prefect artifacts: the headline metrics per stage and where to find the MLflow runs."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    keys = ("ppl/val", "sparsity/global", "recovery/mean", "time/prune_s", "time/train_s")
    rows = [{"stage": name, **{k: round(ms[k], 4) for k in keys if k in ms}} for name, ms in results.items()]
    create_table_artifact(rows, key="stage-metrics", description="Headline metrics of every stage")
    report = cfg.root / "reports" / "run" / "recovery.md"
    lines = [f"MLflow tracking URI: `{tracking_uri(cfg)}` (experiment `{cfg.tracking.experiment}`)", ""]
    lines += [f"- {name}: run `{rid}`" for name, rid in run_ids.items() if rid]
    if report.is_file():
        lines += ["", report.read_text()]
    create_markdown_artifact("\n".join(lines), key="run-report", description="Recovery table and MLflow runs")


@flow(name="sparse-llama", log_prints=False)
def sparse_llama(
    profile: str | None = None,
    params: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    config_path: str = "params.yaml",
    targets: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Run the whole pipeline, or with `targets` only those stages and the stages they need.

    `params` are nested overrides of params.yaml (e.g. {"prune": {"method": "wanda"}}),
    `overrides` the CLI's KEY=VALUE form; both apply on top of `profile`.
    """
    cfg = load_config(config_path, profile=profile, params=params, overrides=overrides or [])
    table = stages(cfg)
    if targets:
        unknown = sorted(set(targets) - {s.name for s in table})
        if unknown:
            raise UserInputError(f"unknown stage(s) {unknown}; stages: {', '.join(s.name for s in table)}")
        table = tuple(upstream_closure(table, targets))
    with root_lock(cfg.root):
        return _run(cfg, profile, "sparse-llama", table)


@flow(name="run-stage", log_prints=False)
def run_stage(
    stage: str, config: dict[str, Any], parent_run_id: str | None = None, force: bool = False
) -> dict[str, float]:
    """One stage of the pipeline, on whichever worker picked the flow run up: what the orchestrating
    flow dispatches to the GPU work pool (`orchestration.gpu_deployment`). `config` is the
    orchestrating run's whole resolved configuration, so both sides run the same stage table."""
    from tasks.config import validate
    from tasks.runner import execute
    from tasks.stages import get

    cfg = validate(config, f"run-stage {stage} parameters")
    return execute(get(cfg, stage), cfg, parent_run_id, force=force).metrics


@flow(name="finetune-task", log_prints=False)
def finetune_task(
    task: str,
    profile: str | None = None,
    params: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    config_path: str = "params.yaml",
) -> dict[str, dict[str, float]]:
    """One task's branch: its dense teacher, sparse fine-tunes, baseline and their evaluations
    (plus whatever upstream stages they need that are not already up to date)."""
    cfg = load_config(config_path, profile=profile, params=params, overrides=overrides or [])
    if task not in cfg.downstream.tasks:
        raise UserInputError(f"task {task!r} is not in downstream.tasks {cfg.downstream.tasks}")
    table = stages(cfg)
    targets = [s.name for s in table if s.name.startswith("eval-ft-") and s.name.endswith(f"-{task}")]
    with root_lock(cfg.root):
        return _run(cfg, profile, f"finetune-task:{task}", tuple(upstream_closure(table, targets)))


def upstream_closure(table, targets: list[str]) -> list:
    """The stages `targets` need, in table order."""
    by_name = {s.name: s for s in table}
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += upstream(table, by_name[name])
    return [s for s in table if s.name in needed]


@flow(name="prune-sweep", log_prints=False)
def prune_sweep(
    methods: list[str] | None = None,
    sparsities: list[float] | None = None,
    structures: list[str] | None = None,
    profile: str | None = None,
    params: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    config_path: str = "params.yaml",
) -> dict[str, dict[str, float]]:
    """Pruning methods × sparsity patterns on the dense base model (perplexity, time).

    Defaults: magnitude, Wanda and SparseGPT at 50% and 70% unstructured and 2:4. A method may
    carry options, e.g. "admm+owl" or "sparsegpt+refine" (tasks.sweep.OPTIONS; +owl points run
    unstructured only). The other pruning settings (calibration, dampening, ...) come from the
    `prune` section.
    """
    from tasks.sweep import point_config, points, sweep_stages

    cfg = load_config(config_path, profile=profile, params=params, overrides=overrides or [])
    pts = points(
        methods or ["magnitude", "wanda", "sparsegpt"], sparsities or [0.5, 0.7], structures or ["unstructured", "2:4"]
    )
    for p in pts:  # every point's settings are valid before anything runs
        point_config(cfg, p)
    table = tuple(upstream_closure(stages(cfg), ["base"])) + sweep_stages(pts)
    with root_lock(cfg.root):
        results = _run(cfg, profile, "prune-sweep", table)
    _publish_file(cfg.root / "reports" / "sweep" / "prune_sweep.md", "prune-sweep", "Pruning sweep")
    return results


@flow(name="benchmark", log_prints=False)
def benchmark(
    profile: str | None = None,
    params: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    config_path: str = "params.yaml",
) -> dict[str, dict[str, float]]:
    """The kernel benchmark alone, measured again on every run (its upstream stages run only when
    they are not up to date: it also times the pipeline's most sparse model)."""
    cfg = load_config(config_path, profile=profile, params=params, overrides=overrides or [])
    with root_lock(cfg.root):
        return _run(cfg, profile, "benchmark", tuple(upstream_closure(stages(cfg), ["benchmark"])), force={"benchmark"})


def _publish_file(path, key: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    if path.is_file():
        create_markdown_artifact(path.read_text(), key=key, description=description)


def _run(cfg: Config, profile: str | None, name: str, table, force=frozenset()) -> dict[str, dict[str, float]]:
    data.preflight(cfg)  # a tokenizer that cannot work fails here, not hours into the run
    tracker = Tracker(cfg)
    tracker.mark_killed(str(cfg.root.resolve()))  # under the root lock: whatever still RUNNING was killed
    parent = tracker.start(name, tags={"pipeline": name, "profile": profile or "default", **run_tags(cfg)})
    tracker.log(parent, params=flatten(cfg.model_dump(mode="json")))
    stage_task = prefect_task()
    limiter = threading.Semaphore(cfg.orchestration.max_parallel)
    futures: dict[str, Any] = {}
    try:
        for stage in table:
            futures[stage.name] = stage_task.with_options(name=stage.name).submit(
                stage,
                cfg,
                parent,
                limiter,
                table,
                stage.name in force,
                wait_for=[futures[n] for n in upstream(table, stage)],
            )
        results = {name: future.result().metrics for name, future in futures.items()}
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    # The parent run holds every stage's metrics, prefixed by the stage, for side-by-side comparison.
    tracker.log(parent, metrics={f"{name}/{k}": v for name, ms in results.items() for k, v in ms.items()})
    tracker.end(parent, "FINISHED")
    _publish(cfg, results, {"parent": parent})
    return results
