"""MLflow tracking with explicit run ids.

MLflow's "active run" is thread-local, and Prefect runs tasks in worker threads
(and DVC runs each stage in its own process), so every call here names its run
id through `MlflowClient` instead of relying on `mlflow.start_run` state.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tasks.config import Config

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000
BATCH = 100  # MLflow's log_batch limit for params is 100 per call


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": [1, {"c": 2}]}} → {"a.b.0": "1", "a.b.1.c": "2"} (stable, flat MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list | tuple) and tree and any(isinstance(x, dict | list) for x in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(tree)[:MAX_PARAM_CHARS]
    return out


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or f"sqlite:///{(cfg.root / 'mlflow.db').resolve()}"


def row_metrics(row: dict, prefix: str, timestamp_ms: int) -> list[Metric]:
    """One training-history row (``{"step": n, "loss": ..., ...}``) as MLflow metrics ``<prefix>/<key>`` at that
    step; values that are not finite numbers are left out (MLflow would refuse the batch)."""
    step = int(row["step"])
    return [
        Metric(f"{prefix}/{k}", float(v), timestamp_ms, step)
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and math.isfinite(v)
    ]


class Tracker:
    """Parent run per pipeline run, one nested run per stage; a no-op when tracking is disabled."""

    def __init__(self, cfg: Config):
        self.enabled = cfg.tracking.enabled
        if not self.enabled:
            return
        self.client = MlflowClient(tracking_uri=tracking_uri(cfg))
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            artifacts = (cfg.root / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id

    def start(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def log(
        self,
        run_id: str | None,
        *,
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        step: int = 0,
        tags: dict[str, str] | None = None,
    ) -> None:
        if not (self.enabled and run_id):
            return
        now = int(time.time() * 1000)
        ps = [Param(k, v) for k, v in (params or {}).items()]
        ms = [
            Metric(k, float(v), now, step)
            for k, v in (metrics or {}).items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ps), len(ms), len(ts), 1), BATCH):
            self.client.log_batch(run_id, metrics=ms[i : i + BATCH], params=ps[i : i + BATCH], tags=ts[i : i + BATCH])

    def log_history(self, run_id: str | None, rows: Iterable[dict], prefix: str) -> None:
        """Per-step curves (e.g. train loss) as metric histories."""
        if not (self.enabled and run_id):
            return
        now = int(time.time() * 1000)
        self.send_metrics(run_id, [m for row in rows for m in row_metrics(row, prefix, now)])

    def send_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        """``metrics`` to the run, in MLflow's batches of at most 1,000."""
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def artifacts(self, run_id: str | None, paths: Iterable[Path]) -> None:
        if not (self.enabled and run_id):
            return
        for p in paths:
            p = Path(p)
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path=p.name)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p))

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id:
            self.client.set_terminated(run_id, status=status)

    def mark_killed(self, root: str) -> list[str]:
        """End as KILLED every run of ``root`` still marked RUNNING: what a killed flow left behind.

        Called under the project root's lock (one flow run per root), so no run of this root can
        really be running. Returns the ids it ended."""
        if not self.enabled:
            return []
        stale = self.client.search_runs(
            [self.experiment_id], f"tags.project_root = '{root}' and attributes.status = 'RUNNING'", max_results=1000
        )
        for run in stale:
            self.client.set_terminated(run.info.run_id, status="KILLED")
        if stale:
            log.warning("marked %d runs of %s left RUNNING by a killed flow as KILLED", len(stale), root)
        return [r.info.run_id for r in stale]


# --------------------------------------------------------------------------- while a stage runs

_LIVE: ContextVar[LiveMetrics | None] = ContextVar("sparsellama_live_metrics", default=None)


class LiveMetrics:
    """Training rows sent to the running stage's MLflow run as they come (in batches every ``every_s``
    seconds), so a long stage's curves can be watched in the MLflow UI while it trains.

    A tracking server that fails to answer costs a warning, never the training run."""

    def __init__(self, tracker: Tracker, run_id: str, prefix: str = "train", every_s: float = 5.0):
        self.tracker, self.run_id, self.prefix, self.every_s = tracker, run_id, prefix, every_s
        self.first_step: int | None = None  # rows before it (a resumed run's) are logged at the end
        self._pending: list[Metric] = []
        self._last = time.monotonic()

    def __call__(self, row: dict) -> None:
        if self.first_step is None:
            self.first_step = int(row["step"])
        self._pending += row_metrics(row, self.prefix, int(time.time() * 1000))
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        pending, self._pending, self._last = self._pending, [], time.monotonic()
        try:
            self.tracker.send_metrics(self.run_id, pending)
        except Exception as err:  # noqa: BLE001  (tracking is not worth a training run)
            log.warning("live metrics for run %s not logged (%s: %s)", self.run_id, type(err).__name__, err)


@contextmanager
def stage_monitoring(
    cfg: Config, tracker: Tracker, run_id: str | None, *, live_every_s: float = 5.0
) -> Iterator[LiveMetrics | None]:
    """Around a stage's work: the live training-metrics sink (see :func:`live_step_logger`) and MLflow's
    system metrics (CPU, memory, disk, network, GPU; ``tracking.system_metrics_interval_s``)."""
    if not (tracker.enabled and run_id):
        yield None
        return
    live = LiveMetrics(tracker, run_id, every_s=live_every_s)
    token = _LIVE.set(live)
    monitor = None
    if cfg.tracking.system_metrics_interval_s:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=cfg.tracking.system_metrics_interval_s, tracking_uri=tracking_uri(cfg)
        )
        monitor.start()
    try:
        yield live
    finally:
        _LIVE.reset(token)
        live.flush()
        if monitor is not None:
            monitor.finish()


def live_step_logger() -> Callable[[dict], None] | None:
    """What a training stage passes to ``sparsify.training.trainer.train(on_step=...)``: the running stage's live
    MLflow sink, or None outside a tracked stage."""
    return _LIVE.get()
