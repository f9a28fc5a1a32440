"""End to end on the smoke profile with the real components: Prefect flow, MLflow (sqlite), DVC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main, render_dvc_yaml
from sparsify.config import load_raw, resolve_raw
from sparsify.config import load_config
from tasks.stages import dvc_yaml, stages
from tests.conftest import PARAMS, REPO


@pytest.fixture(scope="module")
def prefect_server():
    """Prefect's real temporary server, started once and stopped before pytest closes its log capture."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


STAGES = stages(load_config(PARAMS))


def test_committed_dvc_yaml_matches_the_stage_table():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(PARAMS)
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(declared) == [s.name for s in STAGES]
    for stage in STAGES:  # each dependency on another stage's output names an earlier stage
        earlier = {o for s in STAGES[: STAGES.index(stage)] for o in s.outs}
        assert set(stage.deps) <= earlier, stage.name
    assert dvc_yaml(load_config(PARAMS))["stages"] == declared
    names = [s.name for s in STAGES]
    assert names[:7] == ["data", "taskdata", "base", "prune50", "pretrain50", "prune70", "pretrain70"]
    for task in ("arithmetic", "docsum"):  # the paper's per-task branch, for each default task
        assert {f"ft-dense-{task}", f"ft-sparse50-{task}", f"ft-sparse70-{task}", f"ftprune70-{task}",
                f"ft-baseline70-{task}", f"eval-ft-sparse70-{task}", f"eval-ft-baseline70-{task}"} <= set(names)
    assert names[-1] == "report"
    by_name = {s.name: s for s in STAGES}
    assert by_name["prune70"].deps[0] == "models/pretrain50"  # 70% starts from the 50% sparse-pretrained model
    assert "models/ft-dense-arithmetic" in by_name["ft-sparse70-arithmetic"].deps  # the KD teacher


@pytest.mark.slow
def test_flow_runs_end_to_end_and_tracks_in_mlflow(tmp_path, prefect_server):
    from mlflow.tracking import MlflowClient

    assert main(["run", "--config", str(PARAMS), "--profile", "smoke", "--set", f"project.root={tmp_path}"]) == 0
    for stage in STAGES:
        assert (tmp_path / stage.metrics_file).is_file()
        for out in stage.outs:
            assert (tmp_path / out).exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sparsellama")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline") == "sparse-llama"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {s.name for s in STAGES}
    assert children["data"].data.metrics["data/train_tokens"] == 60000
    base = children["base"].data
    assert base.tags["variant"] == "dense"
    assert base.metrics["ppl/val"] < base.metrics["ppl/val_init"]
    assert "sparsity/global" in base.metrics
    assert base.params["base.train.steps"] == "120"
    assert parent.data.params["data.train_tokens"] == "60000"
    assert client.get_metric_history(children["base"].info.run_id, "train/loss")
    sparse = children["prune70"].data
    assert sparse.tags["variant"] == "sparse70-oneshot" and abs(sparse.metrics["sparsity/global"] - 0.7) < 1e-3
    assert "time/prune_s" in sparse.metrics
    pretrained = children["pretrain70"].data
    assert pretrained.tags["variant"] == "sparse70" and abs(pretrained.metrics["sparsity/global"] - 0.7) < 1e-3
    evaluated = children["eval-pretrain70"].data
    assert {"eval/heldout/byte_perplexity", "recovery/heldout", "recovery/mean"} <= set(evaluated.metrics)
    finetuned = children["eval-ft-sparse70-arithmetic"].data
    assert finetuned.tags["variant"] == "sparse70" and "eval/arithmetic/exact_match" in finetuned.metrics
    assert (tmp_path / "reports" / "run" / "report.html").is_file()
    bench = children["benchmark"].data.metrics  # the smoke profile's quick kernel benchmark
    assert {"bench/cpu/11008x4096_b1/sparse70_bf16/speedup_vs_fp32", "bench/cpu/11008x4096_b1/dense_fp32/ms",
            "bench/cpu/stream_gbps"} <= set(bench)
    assert (tmp_path / "reports" / "run" / "figures" / "speedup.png").is_file()
    recovery = json.loads((tmp_path / "reports" / "run" / "recovery.json").read_text())
    assert [r["stage"] for r in recovery["perplexity"]] == ["base", "prune50", "pretrain50", "prune70", "pretrain70"]
    assert set(recovery["tasks"]) == {"arithmetic", "docsum"}
    assert parent.data.metrics["prune70/sparsity/global"] == sparse.metrics["sparsity/global"]

    # A second run finds every stage up to date and skips it, logging the recorded metrics again.
    assert main(["run", "--config", str(PARAMS), "--profile", "smoke", "--set", f"project.root={tmp_path}"]) == 0
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    second = next(r for r in runs if r.data.tags.get("pipeline") == "sparse-llama")
    assert second.info.run_id != parent.info.run_id
    again = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second.info.run_id]
    assert len(again) == len(STAGES) and all(r.data.tags["skipped"] == "true" for r in again)
    assert next(r for r in again if r.data.tags["stage"] == "prune70").data.metrics["sparsity/global"] == \
        sparse.metrics["sparsity/global"]


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["run", "--config", str(PARAMS), "--set", "prune.sparsityy=0.7"]) == 2
    assert "prune.sparsityy: unknown key; allowed keys here: block_size" in capsys.readouterr().err
    assert main(["stage", "nope", "--config", str(PARAMS)]) == 2
    assert "unknown stage 'nope'; stages: data, taskdata, base, prune50, pretrain50" in capsys.readouterr().err
    bad = tmp_path / "params.yaml"
    bad.write_text("data: {train_tokens: 5\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed(tmp_path):
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "models", "metrics", "mlflow.db",
                                    "mlartifacts", ".prefect", ".cache", "corpus", "*.egg-info")
    shutil.copytree(REPO, repo, ignore=ignore)
    # The smoke profile with one sparsity level, one task and one quantization scheme, resolved into
    # the params.yaml that dvc reads; dvc.yaml regenerated from it (fewer stages keep this test short).
    raw = resolve_raw(load_raw(PARAMS), "smoke", overrides=[
        "pipeline.sparsities=[0.5]", "downstream.tasks=[arithmetic]", "quantize.schemes=[w8a8]",
        "quantize.finetuned=false", "finetune.baseline=false"])
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / "dvc.yaml").write_text(render_dvc_yaml(repo / "params.yaml"))
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)

    first = _dvc(repo, "repro")
    names = [s.name for s in stages(load_config(repo / "params.yaml"))]
    assert all(f"Running stage '{n}'" in first for n in names)
    assert "Running stage" not in _dvc(repo, "repro")  # nothing changed: a no-op

    # One quantization parameter: only the quantized model, its evaluation and the report rerun.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["quantize"]["dampening"] = 0.02
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _dvc(repo, "repro")
    rerun = sorted(n for n in names if f"Running stage '{n}'" in third)
    assert rerun == ["eval-quant-w8a8-pretrain50", "quant-w8a8-pretrain50", "report"], rerun
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    base_metrics = shown[""]["data"]["metrics/base.json"]["data"]
    assert base_metrics["ppl"]["val"] < base_metrics["ppl"]["val_init"]
