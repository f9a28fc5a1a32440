"""`sparsellama serve`: a local Prefect server plus the pipeline's deployments, for the Prefect UI.

Starts `prefect server start` on 127.0.0.1 (its UI at http://127.0.0.1:<port>), points this
process at it, and serves the `sparse-llama`, `finetune-task`, `prune-sweep` and `benchmark`
deployments until Ctrl-C.
A user opens the UI, picks a deployment, sets parameters (profile, params, overrides) and
runs it; results appear as Prefect artifacts and in MLflow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


def wait_healthy(api_url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"the Prefect server at {api_url} did not become healthy within {timeout_s:.0f} s")


def serve(host: str = "127.0.0.1", port: int = 4200, config_path: str = "params.yaml") -> None:
    api_url = f"http://{host}:{port}/api"
    os.environ["PREFECT_API_URL"] = api_url  # before prefect is imported in this process
    prefect = Path(sys.executable).with_name("prefect")
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", host, "--port", str(port)], env=os.environ.copy()
    )
    try:
        wait_healthy(api_url)
        from prefect import serve as prefect_serve

        from flows.pipeline import benchmark, finetune_task, prune_sweep, sparse_llama

        config = str(Path(config_path).resolve())
        deployments = [
            sparse_llama.to_deployment(name="default", parameters={"config_path": config}),
            finetune_task.to_deployment(name="default", parameters={"config_path": config, "task": "arithmetic"}),
            prune_sweep.to_deployment(name="default", parameters={"config_path": config}),
            benchmark.to_deployment(name="default", parameters={"config_path": config}),
        ]
        log.info(
            "Prefect UI: http://%s:%d — deployments: %s",
            host,
            port,
            ", ".join(f"{d.flow_name}/{d.name}" for d in deployments),
        )
        prefect_serve(*deployments)
    finally:  # stop serving before the server (the order DESIGN.md records)
        server.terminate()
        server.wait(timeout=30)
