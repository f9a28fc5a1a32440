"""Run one stage with its MLflow run and metrics file; the same code under the CLI, DVC and Prefect."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sparsify.fingerprint import file_digest
from sparsify.fingerprint import fingerprint as fingerprint_of
from sparsify.io import atomic_write_json, remove_stale_temporaries
from tasks.common import Layout, StageResult, claim_resume, git_commit, is_main_process, read_metrics, write_metrics
from tasks.config import Config
from tasks.stages import Stage, stages, upstream
from tasks.tracking import Tracker, flatten, stage_monitoring

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def run_tags(cfg: Config) -> dict[str, str]:
    """Tags of every pipeline MLflow run: MLflow's standard source-commit tag (shown in its UI) and the
    project root, which finds the runs a killed flow left RUNNING (Tracker.mark_killed)."""
    return {"mlflow.source.git.commit": git_commit() or "unknown", "project_root": str(cfg.root.resolve())}


def section_params(cfg: Config, keys: tuple[str, ...]) -> dict[str, str]:
    dump = cfg.model_dump(mode="json")
    out: dict[str, str] = {}
    for key in keys:
        node = dump
        for part in key.split("."):
            node = node[part]
        out.update(flatten({key: node}) if isinstance(node, dict | list) else {key: str(node)})
    return out


def fingerprint(stage: Stage, cfg: Config, table: tuple[Stage, ...] | None = None) -> str:
    """What a stage's outputs are a function of: its config keys, its code, its inputs' fingerprints.

    Inputs are identified by the fingerprints their producing stages recorded, so a change
    anywhere upstream changes every fingerprint downstream of it.
    """
    layout = Layout.of(cfg)
    deps = {}
    for name in upstream(table or stages(cfg), stage):
        stamp = layout.stamp(name)
        deps[name] = json.loads(stamp.read_text())["fingerprint"] if stamp.is_file() else "unknown"
    payload = {
        "stage": stage.name,
        "params": section_params(cfg, stage.params),
        "code": {c: file_digest(REPO / c) for c in stage.code},
        "deps": deps,
    }
    return fingerprint_of(payload)


def finished(stage: Stage, cfg: Config, fp: str) -> dict | None:
    """The stamp of an earlier run with the same fingerprint whose outputs are all present."""
    layout = Layout.of(cfg)
    stamp = layout.stamp(stage.name)
    if not stamp.is_file() or not layout.metrics(stage.name).is_file():
        return None
    record = json.loads(stamp.read_text())
    if record.get("fingerprint") != fp or not all((cfg.root / o).exists() for o in stage.outs):
        return None
    return record


def stage_files(stage: Stage, cfg: Config) -> list[Path]:
    """Every file or folder `execute` writes for `stage` outside its resume state: outputs, metrics,
    plot, stamp."""
    return [
        *(cfg.root / o for o in stage.outs),
        cfg.root / stage.metrics_file,
        *([cfg.root / stage.plot_file] if stage.trains else []),
        Layout.of(cfg).stamp(stage.name),
    ]


def execute(
    stage: Stage,
    cfg: Config,
    parent_run_id: str | None = None,
    *,
    force: bool = False,
    table: tuple[Stage, ...] | None = None,
) -> StageResult:
    """Run `stage`, log it as a (nested) MLflow run and write its DVC metrics file.

    Without `force`, a stage whose outputs exist with the same fingerprint is skipped (its
    recorded metrics are logged again, tagged skipped=true), so re-running a failed flow
    continues from the stage that failed. `sparsellama stage` forces: there DVC decides.
    `table`: the stages `stage` belongs to (default: the pipeline's), where its inputs' producers are.
    """
    if cfg.project.threads:
        import torch

        torch.set_num_threads(cfg.project.threads)
    layout = Layout.of(cfg)
    fp = fingerprint(stage, cfg, table)
    done = None if force else finished(stage, cfg, fp)
    if not is_main_process():
        # torchrun: the other ranks join the training stages' data parallelism and nothing else.
        if done is None and stage.trains:
            stage.run(cfg)
        return StageResult(metrics={}, outputs=[cfg.root / o for o in stage.outs], variant="")
    tracker = Tracker(cfg)
    run_id = tracker.start(
        stage.name,
        tags={"stage": stage.name, **run_tags(cfg), "fingerprint": fp, "skipped": str(done is not None).lower()},
        parent_run_id=parent_run_id,
    )
    tracker.log(run_id, params=section_params(cfg, stage.params))
    if done is not None:
        metrics = read_metrics(layout.metrics(stage.name))
        tracker.log(run_id, metrics=metrics, tags={"variant": done["variant"]})
        tracker.end(run_id, "FINISHED")
        log.info("stage %s: up to date (fingerprint %s), skipped", stage.name, fp[:12])
        return StageResult(metrics=metrics, outputs=[cfg.root / o for o in stage.outs], variant=done["variant"])
    # What earlier attempts killed mid-write left beside this stage's outputs (never read, but as
    # big as the outputs): removed before the stage writes them again (found by test_crash_anywhere).
    written = stage_files(stage, cfg)
    for path in written:
        remove_stale_temporaries(path)
    if stage.resumable and claim_resume(cfg.root / stage.resume_dir, fp):
        log.warning("stage %s: discarded the resume state of an earlier run with another configuration", stage.name)
    t0 = time.perf_counter()
    try:
        with stage_monitoring(cfg, tracker, run_id) as live:
            result = stage.run(cfg)
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    result.metrics[f"time/stage_{stage.name}_s"] = time.perf_counter() - t0
    write_metrics(layout.metrics(stage.name), result.metrics)
    if stage.trains:  # the training curve DVC plots (empty when nothing was trained, e.g. base.source)
        # DVC reads only rows with identical keys: keep the fields every row has (val_loss is not one).
        common = set.intersection(*(set(r) for r in result.history)) if result.history else set()
        atomic_write_json(cfg.root / stage.plot_file, [{k: r[k] for k in r if k in common} for r in result.history])
    atomic_write_json(layout.stamp(stage.name), {"fingerprint": fp, "variant": result.variant})
    for path in written:  # now also a previous output a killed folder swap had moved aside
        remove_stale_temporaries(path, replaced=True)
    tracker.log(run_id, metrics=result.metrics, params=result.params, tags={"variant": result.variant})
    # Rows the live sink did not see: all of them without it, else those of a run this one resumed.
    first_live = live.first_step if live is not None and live.first_step is not None else None
    tracker.log_history(
        run_id, [r for r in result.history if first_live is None or r["step"] < first_live], prefix="train"
    )
    tracker.artifacts(run_id, result.artifacts)
    tracker.end(run_id, "FINISHED")
    log.info(
        "stage %s done in %.1f s: %s",
        stage.name,
        time.perf_counter() - t0,
        ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())),
    )
    return result


class RemoteStageFailed(RuntimeError):
    """A stage dispatched to a work pool did not complete there."""


def execute_remote(
    deployment: str, stage: Stage, cfg: Config, parent_run_id: str | None, *, force: bool = False
) -> StageResult:
    """Run `stage` as a flow run of the `run-stage` deployment `deployment` (on its work pool's
    worker, e.g. a GPU machine) and wait for it; the worker writes the outputs, metrics and stamp
    into the same project.root, where they are read back."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        deployment,
        timeout=None,
        parameters={
            "stage": stage.name,
            "config": cfg.model_dump(mode="json"),
            "parent_run_id": parent_run_id,
            "force": force,
        },
    )
    if not flow_run.state.is_completed():
        raise RemoteStageFailed(
            f"stage {stage.name} on deployment {deployment} ended {flow_run.state.name}: "
            f"{flow_run.state.message or 'see the flow run ' + str(flow_run.id)}"
        )
    layout = Layout.of(cfg)
    variant = json.loads(layout.stamp(stage.name).read_text())["variant"]
    return StageResult(
        metrics=read_metrics(layout.metrics(stage.name)), outputs=[cfg.root / o for o in stage.outs], variant=variant
    )


def _execute_limited(
    stage: Stage, cfg: Config, parent_run_id: str | None, limiter, table: tuple[Stage, ...], force: bool = False
) -> StageResult:
    with limiter:  # a semaphore shared by one flow run's stages: orchestration.max_parallel
        deployment = cfg.orchestration.gpu_deployment
        # Only the pipeline's own stages can be rebuilt from the config on the worker (not sweep points).
        if deployment and stage.gpu and stage.name in {s.name for s in stages(cfg)}:
            return execute_remote(deployment, stage, cfg, parent_run_id, force=force)
        return execute(stage, cfg, parent_run_id, force=force, table=table)


def is_transient(exc: BaseException | None) -> bool:
    """Failures worth retrying: a tracking server or network connection hiccuped, or the sqlite
    store was busy. Bad input, a bug or a diverged run fail the same way again: no retry."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return exc is not None and "database is locked" in str(exc)


def _retry_if_transient(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001  (an unreadable result is not a reason to retry)
            return False
    retry = is_transient(exc if isinstance(exc, BaseException) else None)
    if retry:
        log.warning("%s failed with a transient error (%r): retrying", task_run.name, exc)
    return retry


def prefect_task():
    """The Prefect task around `execute` (built on demand: `sparsellama stage` need not import Prefect).

    Inputs (a Config) are not hashed for caching: whether a stage must run is decided by
    the stage fingerprints, not by Prefect's cache. Retries only for transient failures
    (`is_transient`); a retried stage continues from its resume state.
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(
        _execute_limited,
        name="stage",
        cache_policy=NO_CACHE,
        log_prints=False,
        retries=2,
        retry_delay_seconds=[10, 60],
        retry_condition_fn=_retry_if_transient,
    )
