"""Stages run where the hardware is: prefect.yaml's `run-stage/gpu` deployment on a work pool, with a
real Prefect process worker, while the orchestrating flow runs the other stages itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PARAMS, REPO


def test_prefect_yaml_deploys_every_flow_and_the_stage_runner():
    from flows import pipeline

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {(d["entrypoint"].split(":")[1], d["name"]): d["work_pool"]["name"] for d in spec["deployments"]}
    assert deployments == {
        ("sparse_llama", "default"): "cpu",
        ("finetune_task", "default"): "cpu",
        ("prune_sweep", "default"): "cpu",
        ("benchmark", "default"): "cpu",
        ("run_stage", "gpu"): "gpu",
    }
    for entry in spec["deployments"]:
        path, func = entry["entrypoint"].split(":")
        assert (REPO / path).is_file() and callable(getattr(pipeline, func))


def test_accelerator_stages_are_marked():
    from tasks.config import load_config
    from tasks.stages import stages

    gpu = {s.name for s in stages(load_config(PARAMS)) if s.gpu}
    assert {"base", "prune70", "pretrain70", "ft-sparse70-docsum", "quant-w8a8-pretrain70", "eval-base"} <= gpu
    assert not {"data", "taskdata", "benchmark", "report"} & gpu  # the CPU benchmark measures the flow's machine


@pytest.mark.slow
def test_gpu_stages_run_on_the_gpu_pools_worker(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import sparse_llama
    from tasks.common import read_metrics

    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "SPARSELLAMA_REPO": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }

    def cli(*args: str) -> None:
        done = subprocess.run([prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"

    cli("work-pool", "create", "gpu", "--type", "process")
    cli("--no-prompt", "deploy", "--name", "gpu")  # from prefect.yaml, as a user deploys
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "gpu", "--limit", "1"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        results = sparse_llama(
            profile="smoke",
            config_path=str(PARAMS),
            targets=["base"],
            overrides=[
                f"project.root={tmp_path / 'run'}",
                "tracking.enabled=false",
                "base.train.steps=20",
                "orchestration.gpu_deployment=run-stage/gpu",
            ],
        )
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # Prefect's worker sometimes ignores the SIGINT it forwards itself;
            worker.kill()  # what this test checks (stages dispatched to the pool) is already decided
            worker.wait()
        log.close()
    assert set(results) == {"data", "base"}
    assert results["base"] == read_metrics(tmp_path / "run" / "metrics" / "base.json")

    async def stage_runs():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"]))
            )
            return [(r.parameters["stage"], r.state.type.value) for r in runs]

    # base ran as a flow run of the gpu pool's deployment; data ran in the flow's own process.
    assert asyncio.run(stage_runs()) == [("base", "COMPLETED")], (tmp_path / "worker.log").read_text()[-3000:]
