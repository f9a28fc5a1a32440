"""End to end on the smoke profile with the real components: Prefect flow, MLflow (sqlite), DVC."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main, render_dvc_yaml
from tasks.config import load_config, load_raw, resolve_raw
from tasks.stages import dvc_layout, stages
from tests.conftest import PARAMS, REPO

STAGES = stages(load_config(PARAMS))


def _expanded_by_dvc(root: Path) -> dict[str, dict]:
    """dvc.yaml as DVC itself expands it (foreach/matrix resolved), keyed by the table stage each
    entry runs: its DVC name, deps, params and outs."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    repo = Repo.init(str(root), no_scm=True)
    out = {}
    for st in repo.index.stages:
        name = st.cmd.removeprefix("sparsellama stage ")
        assert name not in out, f"two dvc.yaml entries run {name}"
        out[name] = {
            "dvc_name": st.name,
            "deps": [str(d.def_path) for d in st.deps if not isinstance(d, ParamsDependency)],
            "params": [p for d in st.deps if isinstance(d, ParamsDependency) for p in d.params],
            "outs": sorted((str(o.def_path), o.persist, o.use_cache, bool(o.metric), bool(o.plot)) for o in st.outs),
        }
    return out


def test_committed_dvc_yaml_matches_the_stage_table(tmp_path):
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(PARAMS)
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / f, tmp_path / f)
    expanded = _expanded_by_dvc(tmp_path)
    _, dvc_names = dvc_layout(load_config(PARAMS))
    assert sorted(expanded) == sorted(s.name for s in STAGES)  # every table stage, once
    for s in STAGES:
        e = expanded[s.name]
        assert e["dvc_name"] == dvc_names[s.name]
        assert e["deps"] == [*s.deps, *s.code] and e["params"] == list(s.params)
        assert e["outs"] == sorted(
            [(o, False, True, False, False) for o in s.outs]
            + [(s.metrics_file, False, False, True, False)]
            + ([(s.resume_dir, True, False, False, False)] if s.resumable else [])
            + ([(s.plot_file, False, False, False, True)] if s.trains else [])
        ), s.name
    # The families are written as foreach/matrix entries, not stage by stage.
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {
        "prune",
        "pretrain",
        "ft-dense",
        "ft-sparse",
        "ftprune",
        "ft-baseline",
        "quant",
        "quant-ft",
        "eval",
        "eval-dense",
    } <= set(declared)
    assert declared["ft-sparse"]["matrix"] == {"level": ["50", "70"], "task": ["arithmetic", "docsum"]}
    assert dvc_names["prune70"] == "prune@70" and dvc_names["ft-sparse70-docsum"] == "ft-sparse@70-docsum"
    assert {"base", "pretrain70", "ft-sparse70-docsum"} <= {s.name for s in STAGES if s.trains}

    for stage in STAGES:  # each dependency on another stage's output names an earlier stage
        earlier = {o for s in STAGES[: STAGES.index(stage)] for o in s.outs}
        assert set(stage.deps) <= earlier, stage.name
    names = [s.name for s in STAGES]
    assert names[:7] == ["data", "taskdata", "base", "prune50", "pretrain50", "prune70", "pretrain70"]
    for task in ("arithmetic", "docsum"):  # the paper's per-task branch, for each default task
        assert {
            f"ft-dense-{task}",
            f"ft-sparse50-{task}",
            f"ft-sparse70-{task}",
            f"ftprune70-{task}",
            f"ft-baseline70-{task}",
            f"eval-ft-sparse70-{task}",
            f"eval-ft-baseline70-{task}",
        } <= set(names)
    assert names[-1] == "report"
    by_name = {s.name: s for s in STAGES}
    assert by_name["prune70"].deps[0] == "models/pretrain50"  # 70% starts from the 50% sparse-pretrained model
    assert "models/ft-dense-arithmetic" in by_name["ft-sparse70-arithmetic"].deps  # the KD teacher


def test_a_family_that_fits_no_template_is_written_stage_by_stage(tmp_path, monkeypatch):
    """An item value that also occurs in unrelated text ("a" in "data/corpus") defeats the
    substitution: that family is written stage by stage, and the file still expands to the table."""
    import tasks.stages as st

    def member(lv: str) -> st.Stage:
        return st.Stage(
            name=f"p{lv}",
            run=st.prune.run,
            params=("prune",),
            deps=("data/corpus",),
            outs=(f"models/p{lv}",),
            family="p",
            item=(("level", lv),),
        )

    table = (member("a"), member("b"), member("c"))
    assert st._family_entry("p", list(table)) is None
    monkeypatch.setattr(st, "stages", lambda cfg: table)
    doc, names = st.dvc_layout(load_config(PARAMS))
    assert list(doc["stages"]) == ["pa", "pb", "pc"] and names == {"pa": "pa", "pb": "pb", "pc": "pc"}
    assert doc["stages"]["pb"]["deps"] == ["data/corpus", *table[1].code]
    table = (member("1"), member("2"))
    monkeypatch.setattr(st, "stages", lambda cfg: table)
    doc, names = st.dvc_layout(load_config(PARAMS))
    assert doc["stages"]["p"]["matrix"] == {"level": ["1", "2"]} and names == {"p1": "p@1", "p2": "p@2"}


@pytest.mark.slow
def test_flow_runs_end_to_end_and_tracks_in_mlflow(tmp_path, prefect_server, caplog):
    from mlflow.tracking import MlflowClient

    # Under pytest the CLI's logging.basicConfig(INFO) is a no-op (pytest's capture handler is already on the
    # root logger), and Prefect's logging setup then leaves the root at WARNING: give the stage loggers the
    # INFO level a real run has, so their records reach Prefect as they do there.
    caplog.set_level(logging.INFO, logger="tasks")
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
    # MLflow's own source-commit tag (its UI shows it), and the root that finds a killed flow's runs.
    assert base.tags["mlflow.source.git.commit"] == parent.data.tags["mlflow.source.git.commit"] != ""
    assert base.tags["project_root"] == str(tmp_path.resolve())
    # The stage loggers' records reach the flow run's logs in the Prefect UI.
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log records go to the server in batches: send what is still queued
    with get_client(sync_client=True) as prefect_client:
        logs = prefect_client.read_logs(LogFilter(text=LogFilterTextSearch(query="stage base done")))
    # (Prefect's text search matches words, so other stages' records come back too.)
    ours = [log for log in logs if log.name == "tasks.runner" and log.message.startswith("stage base done")]
    assert len(ours) == 1 and ours[0].flow_run_id is not None and ours[0].task_run_id is not None
    sparse = children["prune70"].data
    assert sparse.tags["variant"] == "sparse70-oneshot" and abs(sparse.metrics["sparsity/global"] - 0.7) < 1e-3
    assert "time/prune_s" in sparse.metrics
    pretrained = children["pretrain70"].data
    assert pretrained.tags["variant"] == "sparse70" and abs(pretrained.metrics["sparsity/global"] - 0.7) < 1e-3
    evaluated = children["eval-pretrain70"].data
    assert {"eval/heldout/byte_perplexity", "recovery/heldout", "recovery/mean"} <= set(evaluated.metrics)
    finetuned = children["eval-ft-sparse70-arithmetic"].data
    assert finetuned.tags["variant"] == "sparse70" and "eval/arithmetic/exact_match" in finetuned.metrics
    # Every scored test document, with the model's output and the target's NLL (the test-split loss).
    assert 0 < finetuned.metrics["eval/arithmetic/target_nll"] < 20
    samples = [
        json.loads(line)
        for line in (tmp_path / "reports" / "eval" / "ft-sparse70-arithmetic.samples.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 16 and all("output" in r and r["target_tokens"] > 0 for r in samples)
    # lm-eval's own record of how the scores were computed.
    details = json.loads((tmp_path / "reports" / "eval" / "ft-sparse70-arithmetic.lmeval.json").read_text())
    assert {"versions", "n-shot", "configs", "results"} <= set(details) and "arithmetic" in details["configs"]
    mean_nll = sum(r["target_nll"] * r["target_tokens"] for r in samples) / sum(r["target_tokens"] for r in samples)
    assert mean_nll == pytest.approx(finetuned.metrics["eval/arithmetic/target_nll"], rel=1e-6)
    assert (tmp_path / "reports" / "run" / "report.html").is_file()
    bench = children["benchmark"].data.metrics  # the smoke profile's quick kernel benchmark
    assert {
        "bench/cpu/11008x4096_b1/sparse70_bf16/speedup_vs_fp32",
        "bench/cpu/11008x4096_b1/dense_fp32/ms",
        "bench/cpu/stream_gbps",
    } <= set(bench)
    assert (tmp_path / "reports" / "run" / "figures" / "speedup.png").is_file()
    recovery = json.loads((tmp_path / "reports" / "run" / "recovery.json").read_text())
    assert [r["stage"] for r in recovery["perplexity"]] == [
        "base",
        "pretrain-dense",
        "prune50",
        "pretrain50",
        "prune70",
        "pretrain70",
    ]
    control = children["pretrain-dense"].data  # the dense base trained on the same extra tokens
    assert control.tags["variant"] == "dense-control" and control.metrics["sparsity/global"] == 0.0
    assert set(recovery["tasks"]) == {"arithmetic", "docsum"}
    assert parent.data.metrics["prune70/sparsity/global"] == sparse.metrics["sparsity/global"]

    # A second run finds every stage up to date and skips it, logging the recorded metrics again.
    assert main(["run", "--config", str(PARAMS), "--profile", "smoke", "--set", f"project.root={tmp_path}"]) == 0
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    second = next(r for r in runs if r.data.tags.get("pipeline") == "sparse-llama")
    assert second.info.run_id != parent.info.run_id
    again = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second.info.run_id]
    assert len(again) == len(STAGES) and all(r.data.tags["skipped"] == "true" for r in again)
    assert (
        next(r for r in again if r.data.tags["stage"] == "prune70").data.metrics["sparsity/global"]
        == sparse.metrics["sparsity/global"]
    )


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["run", "--config", str(PARAMS), "--set", "prune.sparsityy=0.7"]) == 2
    err = capsys.readouterr().err
    assert "prune.sparsityy: unknown key; allowed keys here: " in err and ", sparsity, structure" in err
    assert main(["stage", "nope", "--config", str(PARAMS)]) == 2
    assert "unknown stage 'nope'; stages: data, taskdata, base, prune50, pretrain50" in capsys.readouterr().err
    bad = tmp_path / "params.yaml"
    bad.write_text("data: {train_tokens: 5\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def _dvc(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    out = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def output_paths() -> set[str]:
    """Every path (relative to the root) the pipeline writes: each stage's outputs, metrics, plots and
    resume state from the stage table, and the tracking and orchestration state beside them."""
    paths = {"mlflow.db", "mlartifacts", ".prefect", ".stamps", ".lmeval", ".pipeline.lock", ".dvc/cache", ".dvc/tmp"}
    for s in STAGES:
        paths.update([*s.outs, s.metrics_file, s.plot_file, s.resume_dir])
    return paths


def _dvc_yaml_outs() -> set[str]:
    """Every out, metric and plot path dvc.yaml declares, its `${item.*}` placeholders filled with a name."""
    paths = set()
    for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        entry = entry.get("do", entry)  # foreach / matrix families
        for key in ("outs", "metrics", "plots"):
            for out in entry.get(key, []):
                path = next(iter(out)) if isinstance(out, dict) else out
                paths.add(re.sub(r"\$\{[^}]*\}", "x", path))
    return paths


def test_pipeline_outputs_are_git_ignored():
    """Whoever writes the outputs (the flow, `sparsellama stage`, `dvc repro`), git ignores them: each
    output of the stage table and of dvc.yaml, a file inside it, and the tracking/orchestration state."""
    paths = output_paths() | _dvc_yaml_outs()
    assert {"data/corpus", "data/tasks", "models/base", "reports/run", "metrics/data.json"} <= paths
    queries = sorted(paths | {f"{p}/x" for p in paths})
    out = subprocess.run(
        ["git", "check-ignore", "--stdin"], cwd=REPO, input="\n".join(queries), capture_output=True, text=True
    )
    assert out.returncode in (0, 1), out.stderr
    assert sorted(set(queries) - set(out.stdout.split())) == []
    # ...while the code and data/README.md stay visible to git.
    kept = subprocess.run(
        ["git", "check-ignore", "data/README.md", "tasks/stages.py", "dvc.yaml", "params.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert kept.returncode == 1 and kept.stdout == ""


def copy_checkout(dest: Path) -> None:
    """The checkout's code into ``dest``, never a user's pipeline outputs (after a `make pipeline` in
    this checkout, copied outputs would be committed in the copy and dvc would refuse them as tracked
    by git). An output's top folder is left out whole (models/, reports/, ...) unless git tracks files
    in it (data/ holds data/README.md): then only the output itself."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    tracked_tops = {t.split("/")[0] for t in tracked if "/" in t}
    skip = set()
    for o in output_paths():
        top = o.split("/")[0]
        skip.add(o if top in tracked_tops else top)
    tooling = {".venv", ".git", "__pycache__", ".cache", ".pytest_cache", ".ruff_cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(REPO)
        return {n for n in names if n in tooling or n.endswith(".egg-info") or (rel / n).as_posix() in skip}

    shutil.copytree(REPO, dest, ignore=ignore)


def test_copy_checkout_leaves_pipeline_outputs_behind(tmp_path, monkeypatch):
    """The DVC test's copy of a checkout after a `make pipeline` in it: code and data/README.md
    copied; every output the stage table names left behind."""
    fake = tmp_path / "checkout"
    for rel in (
        "sparsify/x.py",
        "data/README.md",
        "data/tasks/arithmetic.jsonl",
        "data/corpus/train.bin",
        "reports/eval/base.json",
        "plots/base.json",
        "metrics/base.json",
        "models/base/config.json",
        "models/prune70/config.json",
        ".resume/base/x",
        "mlflow.db",
    ):
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text("x")
    for cmd in (["init", "-q"], ["add", "sparsify/x.py", "data/README.md"]):
        subprocess.run(["git", *cmd], cwd=fake, check=True)
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake)
    copy_checkout(tmp_path / "copy")
    copied = sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert copied == ["data/README.md", "sparsify/x.py"]


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed(tmp_path):
    repo = tmp_path / "repo"
    copy_checkout(repo)
    # The smoke profile with one sparsity level, one task and one quantization scheme, resolved into
    # the params.yaml that dvc reads; dvc.yaml regenerated from it (fewer stages keep this test short).
    raw = resolve_raw(
        load_raw(PARAMS),
        "smoke",
        overrides=[
            "pipeline.sparsities=[0.5]",
            "downstream.tasks=[arithmetic]",
            "quantize.schemes=[w8a8]",
            "quantize.finetuned=false",
            "finetune.baseline=false",
        ],
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / "dvc.yaml").write_text(render_dvc_yaml(repo / "params.yaml"))
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)

    first = _dvc(repo, "repro")
    cfg = load_config(repo / "params.yaml")
    dvc_name = dvc_layout(cfg)[1]
    names = [dvc_name[s.name] for s in stages(cfg)]
    assert all(f"Running stage '{n}'" in first for n in names)
    assert json.loads((repo / ".resume" / "base" / "COMPLETE.json").read_text()) == {"complete": True}
    assert "Running stage" not in _dvc(repo, "repro")  # nothing changed: a no-op

    # One quantization parameter: only the quantized model, its evaluation and the report rerun.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["quantize"]["dampening"] = 0.02
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _dvc(repo, "repro")
    rerun = sorted(n for n in names if f"Running stage '{n}'" in third)
    assert rerun == ["eval@quant-w8a8-pretrain50", "quant@w8a8-50", "report"], rerun
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    base_metrics = shown[""]["data"]["metrics/base.json"]["data"]
    assert base_metrics["ppl"]["val"] < base_metrics["ppl"]["val_init"]
    plots = json.loads(_dvc(repo, "plots", "show", "--json"))
    assert not plots.get("errors"), plots["errors"]
    loss = plots["data"]["training loss"][0]["content"]["data"]["values"]  # the Vega spec's data, every stage
    assert {row["filename"] for row in loss} == {f"{s.name}.json" for s in stages(cfg) if s.trains}
    assert plots["data"]["reports/run/plots/perplexity.json"][0]["content"]["data"]["values"][0]["model"] == "dense"


SMALL = [
    "pipeline.sparsities=[0.5]",
    "downstream.tasks=[arithmetic]",
    "quantize.schemes=[w8a8]",
    "quantize.finetuned=false",
    "finetune.baseline=false",
]


@pytest.mark.slow
def test_killed_flow_resumes_then_sweep_and_benchmark_flows(tmp_path, prefect_server):
    """A flow killed (SIGKILL) mid-training continues where it stopped: finished stages are skipped,
    the interrupted one resumes from its checkpoint. Then the smaller flows on the same root."""
    import signal
    import time

    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import benchmark, prune_sweep, sparse_llama

    root = tmp_path / "run"
    overrides = [f"project.root={root}", *SMALL, "base.train.steps=400"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        str(PARAMS),
        "--profile",
        "smoke",
        *(a for o in overrides for a in ("--set", o)),
    ]
    child = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = root / ".resume" / "base" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not state.is_file():  # the base model's first checkpoint (step 20 of 400)
        assert child.poll() is None, "the flow ended before the base model wrote a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 400 and not (root / "models" / "base").exists()

    sparse_llama(profile="smoke", overrides=overrides, config_path=str(PARAMS))
    resumed = json.loads((root / "metrics" / "base.json").read_text())["train"]["resumed_from_step"]
    assert resumed >= step  # continued from the killed run's last checkpoint, not from step 0
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sparsellama")
    parents = client.search_runs(
        [exp.experiment_id], "tags.pipeline = 'sparse-llama'", order_by=["attributes.start_time DESC"]
    )
    # The killed run never ended its MLflow runs; the next flow run on the root marked them KILLED.
    assert [p.info.status for p in parents] == ["FINISHED", "KILLED"]
    killed_children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[1].info.run_id}'")
    assert killed_children and all(r.info.status in ("FINISHED", "KILLED") for r in killed_children)
    assert any(r.info.status == "KILLED" and r.data.tags["stage"] == "base" for r in killed_children)
    children = {
        r.data.tags["stage"]: r.data.tags["skipped"]
        for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    }
    assert (
        children["data"] == "true"
        and children["base"] == "false"
        and len(children) == len(stages(load_config(PARAMS, profile="smoke", overrides=overrides)))
    )
    assert json.loads((root / ".resume" / "base" / "COMPLETE.json").read_text()) == {"complete": True}

    # The pruning sweep reuses data and base, prunes each point and summarizes them.
    prune_sweep(
        methods=["magnitude", "sparsegpt"],
        sparsities=[0.7],
        structures=["unstructured", "2:4"],
        profile="smoke",
        overrides=overrides,
        config_path=str(PARAMS),
    )
    sweep = json.loads((root / "reports" / "sweep" / "prune_sweep.json").read_text())
    assert [(r["method"], r["pattern"]) for r in sweep["rows"]] == [
        ("magnitude", "70"),
        ("sparsegpt", "70"),
        ("magnitude", "2of4"),
        ("sparsegpt", "2of4"),
    ]
    assert [round(r["sparsity"], 3) for r in sweep["rows"]] == [0.7, 0.7, 0.5, 0.5]
    assert all(r["ppl"] > sweep["dense_ppl"] * 0.9 for r in sweep["rows"])
    sweep_run = client.search_runs([exp.experiment_id], "tags.pipeline = 'prune-sweep'")[0]
    swept = {
        r.data.tags["stage"]: r
        for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{sweep_run.info.run_id}'")
    }
    assert swept["base"].data.tags["skipped"] == "true"
    assert swept["sweep-sparsegpt-70"].data.tags["variant"] == "sparsegpt-70"
    assert swept["sweep-sparsegpt-70"].data.metrics["ppl/val"] == sweep["rows"][1]["ppl"]

    # The benchmark flow measures again even though its stage is up to date; nothing else reruns.
    before = json.loads((root / "reports" / "benchmark" / "sparse_kernels.json").read_text())
    benchmark(profile="smoke", overrides=overrides, config_path=str(PARAMS))
    bench_run = client.search_runs([exp.experiment_id], "tags.pipeline = 'benchmark'")[0]
    ran = {
        r.data.tags["stage"]: r.data.tags["skipped"]
        for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{bench_run.info.run_id}'")
    }
    assert ran.pop("benchmark") == "false" and set(ran.values()) == {"true"}
    assert json.loads((root / "reports" / "benchmark" / "sparse_kernels.json").read_text()) != before


def test_only_transient_failures_are_retried():
    from types import SimpleNamespace

    from prefect.states import Failed

    from tasks.runner import _retry_if_transient, is_transient

    run = SimpleNamespace(name="base-1")
    assert _retry_if_transient(None, run, Failed(data=ConnectionError("tracking server reset")))
    assert _retry_if_transient(None, run, Failed(data=TimeoutError()))
    assert _retry_if_transient(None, run, Failed(data=RuntimeError("(sqlite3.OperationalError) database is locked")))
    assert not _retry_if_transient(None, run, Failed(data=ValueError("masks do not match the checkpoint")))
    assert not _retry_if_transient(None, run, Failed(data=FileNotFoundError("models/base")))
    assert not is_transient(None)


def test_resume_state_is_kept_for_the_same_fingerprint_only(tmp_path):
    """An interrupted attempt's state is resumed by the same stage configuration; after a params
    change the stage would fail on it forever (layerwise/trainer refuse foreign state), so it goes."""
    from tasks.common import claim_resume, release_resume

    d = tmp_path / ".resume" / "prune70"
    assert not claim_resume(d, "fp-a")
    (d / "trainer_state.json").write_text("{}")
    shutil.rmtree(d)  # the trainer replaces its checkpoint folder wholesale on every checkpoint
    d.mkdir()
    (d / "trainer_state.json").write_text("{}")
    assert not claim_resume(d, "fp-a") and (d / "trainer_state.json").is_file()  # same: resume
    assert claim_resume(d, "fp-b") and not (d / "trainer_state.json").exists()  # changed: discarded
    release_resume(d)
    assert [p.name for p in d.iterdir()] == ["COMPLETE.json"]
    assert not claim_resume(d, "fp-b")  # a finished stage's marker is not resume state

    # Killed inside the trainer's checkpoint swap: between its two renames (the last checkpoint moved
    # aside, the new one still a temporary folder). The last checkpoint is put back, the temporary goes.
    (d / "trainer_state.json").write_text('{"step": 4}')
    d.rename(d.with_name(".prune70.old-k1"))
    (d.parent / ".prune70.tmp-k2").mkdir()
    assert not claim_resume(d, "fp-b") and (d / "trainer_state.json").read_text() == '{"step": 4}'
    assert sorted(p.name for p in d.parent.iterdir()) == [".fingerprints", "prune70"]
