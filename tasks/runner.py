"""Run one stage with its MLflow run and metrics file; the same code under the CLI, DVC and Prefect."""

from __future__ import annotations

import logging
import time

from sparsify.config import Config
from tasks.common import Layout, StageResult, git_commit, write_metrics
from tasks.stages import Stage
from tasks.tracking import Tracker, flatten

log = logging.getLogger(__name__)


def section_params(cfg: Config, keys: tuple[str, ...]) -> dict[str, str]:
    dump = cfg.model_dump(mode="json")
    out: dict[str, str] = {}
    for key in keys:
        node = dump
        for part in key.split("."):
            node = node[part]
        out.update(flatten({key: node}) if isinstance(node, dict | list) else {key: str(node)})
    return out


def execute(stage: Stage, cfg: Config, parent_run_id: str | None = None) -> StageResult:
    """Run `stage`, log it as a (nested) MLflow run and write its DVC metrics file."""
    if cfg.project.threads:
        import torch

        torch.set_num_threads(cfg.project.threads)
    tracker = Tracker(cfg)
    run_id = tracker.start(stage.name, tags={"stage": stage.name, "git_commit": git_commit() or "unknown"},
                           parent_run_id=parent_run_id)
    tracker.log(run_id, params=section_params(cfg, stage.params))
    t0 = time.perf_counter()
    try:
        result = stage.run(cfg)
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    result.metrics[f"time/stage_{stage.name}_s"] = time.perf_counter() - t0
    write_metrics(Layout.of(cfg).metrics(stage.name), result.metrics)
    tracker.log(run_id, metrics=result.metrics, tags={"variant": result.variant})
    tracker.log_history(run_id, result.history, prefix="train")
    tracker.artifacts(run_id, result.artifacts)
    tracker.end(run_id, "FINISHED")
    log.info("stage %s done in %.1f s: %s", stage.name, time.perf_counter() - t0,
             ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())))
    return result


def prefect_task():
    """The Prefect task around `execute` (built on demand: `sparsellama stage` need not import Prefect).

    Inputs (a Config) are not hashed for caching: whether a stage must run is decided by
    the stage table and DVC, not by Prefect's cache.
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(execute, name="stage", cache_policy=NO_CACHE, log_prints=False)
