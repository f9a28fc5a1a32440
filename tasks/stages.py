"""The one table of pipeline stages.

The Prefect flow runs these in order, the CLI's `sparsellama stage NAME` runs one,
and `dvc.yaml` is generated from this table (`sparsellama dvc-yaml --write`); a
test fails when the committed dvc.yaml and this table disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sparsify.config import Config
from tasks import base, data
from tasks.common import StageResult


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config], StageResult]
    params: tuple[str, ...]  # params.yaml keys the stage reads (DVC params)
    deps: tuple[str, ...]  # outputs of earlier stages, relative to project.root
    outs: tuple[str, ...]
    code: tuple[str, ...]  # source files whose change reruns the stage under `dvc repro`

    @property
    def metrics_file(self) -> str:
        return f"metrics/{self.name}.json"


STAGES: tuple[Stage, ...] = (
    Stage(
        name="data",
        run=data.run,
        params=("project.seed", "data"),
        deps=(),
        outs=("data/corpus",),
        code=("sparsify/data.py", "tasks/data.py"),
    ),
    Stage(
        name="base",
        run=base.run,
        params=("project.seed", "project.device", "base"),
        deps=("data/corpus",),
        outs=("models/base",),
        code=("sparsify/model.py", "sparsify/trainer.py", "sparsify/metrics.py", "tasks/base.py"),
    ),
)

BY_NAME = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def dvc_yaml() -> dict:
    """dvc.yaml as data, one entry per stage, each calling the CLI."""
    stages = {}
    for s in STAGES:
        entry: dict = {"cmd": f"sparsellama stage {s.name}"}
        entry["deps"] = [*s.deps, *s.code]
        entry["params"] = list(s.params)
        entry["outs"] = list(s.outs)
        entry["metrics"] = [{s.metrics_file: {"cache": False}}]
        stages[s.name] = entry
    return {"stages": stages}
