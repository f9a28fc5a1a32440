"""The `sparse-llama` Prefect flow: every stage of the table, under one MLflow parent run.

Stages are submitted as Prefect tasks that wait for the stages producing their inputs,
so independent work (per-task fine-tunes, evaluations) can run side by side, bounded by
the flow's task runner (`orchestration.max_parallel`, applied by `run_pipeline`).
Finished stages with an unchanged fingerprint are skipped (see `tasks.runner.execute`).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow

from sparsify.config import load_config
from tasks.common import git_commit
from tasks.runner import prefect_task
from tasks.stages import stages
from tasks.tracking import Tracker, flatten

log = logging.getLogger(__name__)


@flow(name="sparse-llama", log_prints=False)
def sparse_llama(
    profile: str | None = None,
    params: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    config_path: str = "params.yaml",
) -> dict[str, dict[str, float]]:
    """Run the whole pipeline.

    `params` are nested overrides of params.yaml (e.g. {"prune": {"method": "wanda"}}),
    `overrides` the CLI's KEY=VALUE form; both apply on top of `profile`.
    """
    cfg = load_config(config_path, profile=profile, params=params, overrides=overrides or [])
    tracker = Tracker(cfg)
    parent = tracker.start("sparse-llama", tags={"pipeline": "sparse-llama", "profile": profile or "default",
                                                 "git_commit": git_commit() or "unknown"})
    tracker.log(parent, params=flatten(cfg.model_dump(mode="json")))
    table = stages(cfg)
    producer = {out: s.name for s in table for out in s.outs}
    stage_task = prefect_task()
    futures: dict[str, Any] = {}
    try:
        for stage in table:
            upstream = [futures[producer[d]] for d in stage.deps if d in producer]
            futures[stage.name] = stage_task.with_options(name=stage.name).submit(
                stage, cfg, parent, wait_for=upstream)
        results = {name: future.result().metrics for name, future in futures.items()}
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    # The parent run holds every stage's metrics, prefixed by the stage, for side-by-side comparison.
    tracker.log(parent, metrics={f"{name}/{k}": v for name, ms in results.items() for k, v in ms.items()})
    tracker.end(parent, "FINISHED")
    return results


def run_pipeline(profile: str | None = None, overrides: list[str] | None = None,
                 config_path: str = "params.yaml", params: dict[str, Any] | None = None):
    """Run the flow with a task runner sized by `orchestration.max_parallel`."""
    from prefect.task_runners import ThreadPoolTaskRunner

    cfg = load_config(config_path, profile=profile, params=params, overrides=overrides or [])
    runner = ThreadPoolTaskRunner(max_workers=cfg.orchestration.max_parallel)
    return sparse_llama.with_options(task_runner=runner)(
        profile=profile, params=params, overrides=overrides, config_path=config_path)
