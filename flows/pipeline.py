"""The `sparse-llama` Prefect flow: every stage of the table, in order, under one MLflow parent run."""

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

    `params` are nested overrides of params.yaml (e.g. {"prune": {"sparsity": 0.7}}),
    `overrides` the CLI's KEY=VALUE form; both apply on top of `profile`.
    """
    cfg = load_config(config_path, profile=profile, params=params, overrides=overrides or [])
    tracker = Tracker(cfg)
    parent = tracker.start("sparse-llama", tags={"pipeline": "sparse-llama", "profile": profile or "default",
                                                 "git_commit": git_commit() or "unknown"})
    tracker.log(parent, params=flatten(cfg.model_dump(mode="json")))
    results: dict[str, dict[str, float]] = {}
    stage_task = prefect_task()
    try:
        for stage in stages(cfg):
            result = stage_task.with_options(name=stage.name)(stage, cfg, parent)
            results[stage.name] = result.metrics
            tracker.log(parent, metrics=result.metrics)
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    tracker.end(parent, "FINISHED")
    return results
