"""MLflow observability: training metrics that arrive while a stage trains, system metrics, and the
runs a killed flow left RUNNING — against a real MLflow store."""

from __future__ import annotations

import time
from pathlib import Path

from sparsify.training.trainer import train
from tasks.config import load_config
from tasks.tracking import Tracker, live_step_logger, stage_monitoring
from tests.test_trainer import random_blocks, tiny_config, tiny_llama

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def config(root: Path, *overrides: str):
    return load_config(PARAMS, overrides=[f"project.root={root}", *overrides])


def test_training_metrics_reach_mlflow_while_the_stage_trains(tmp_path):
    cfg = config(tmp_path, "tracking.system_metrics_interval_s=0.2")
    tracker = Tracker(cfg)
    run_id = tracker.start("base", tags={})
    seen: list[int] = []
    with stage_monitoring(cfg, tracker, run_id, live_every_s=0) as live:
        sink = live_step_logger()
        assert sink is live

        def on_step(row: dict) -> None:
            sink(row)  # what the stages pass to train(on_step=live_step_logger())
            seen.append(len(tracker.client.get_metric_history(run_id, "train/loss")))

        train(tiny_llama(), random_blocks(), None, tiny_config(steps=4), seed=0, progress=False, on_step=on_step)
        time.sleep(1.0)  # a few system-metrics samples
    assert live_step_logger() is None  # only inside a monitored stage
    assert seen == [1, 2, 3, 4]  # each step's row was in MLflow before the next step ran
    history = tracker.client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3] and live.first_step == 0
    metrics = tracker.client.get_run(run_id).data.metrics
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(metrics)
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)


def test_no_system_metrics_when_turned_off_and_nothing_without_a_run(tmp_path):
    cfg = config(tmp_path, "tracking.system_metrics_interval_s=null")
    tracker = Tracker(cfg)
    run_id = tracker.start("s", tags={})
    with stage_monitoring(cfg, tracker, run_id, live_every_s=0) as live:
        live({"step": 0, "loss": 1.5})
        time.sleep(0.3)
    assert set(tracker.client.get_run(run_id).data.metrics) == {"train/loss"}
    with stage_monitoring(cfg, tracker, None) as live:
        assert live is None and live_step_logger() is None


def test_runs_a_killed_flow_left_running_are_marked_killed(tmp_path):
    cfg = config(tmp_path)
    tracker = Tracker(cfg)
    root, other = str(tmp_path.resolve()), "/somewhere/else"
    stale_parent = tracker.start("sparse-llama", tags={"project_root": root})
    stale_child = tracker.start("base", tags={"project_root": root}, parent_run_id=stale_parent)
    done = tracker.start("data", tags={"project_root": root})
    tracker.end(done, "FINISHED")
    elsewhere = tracker.start("sparse-llama", tags={"project_root": other})
    assert sorted(tracker.mark_killed(root)) == sorted([stale_parent, stale_child])
    status = {r: tracker.client.get_run(r).info.status for r in (stale_parent, stale_child, done, elsewhere)}
    assert status == {stale_parent: "KILLED", stale_child: "KILLED", done: "FINISHED", elsewhere: "RUNNING"}
    assert tracker.mark_killed(root) == []
