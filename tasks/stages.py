"""The one table of pipeline stages.

The Prefect flow runs these in order, the CLI's `sparsellama stage NAME` runs one,
and `dvc.yaml` is generated from this table (`sparsellama dvc-yaml --write`); a
test fails when the committed dvc.yaml and this table disagree.

The table depends on the configuration only through `pipeline.sparsities`: one
prune stage per level, each starting from the previous level's checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from sparsify.config import Config
from tasks import base, data, evaluate, prune, report, taskdata
from tasks.common import StageResult

CORPUS = "data/corpus"
TASK_DATA = "data/tasks"


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


def level_name(sparsity: float) -> str:
    return f"{round(sparsity * 100)}"


def stages(cfg: Config) -> tuple[Stage, ...]:
    table = [
        Stage(
            name="data",
            run=data.run,
            params=("project.seed", "data"),
            deps=(),
            outs=(CORPUS,),
            code=("sparsify/data.py", "tasks/data.py"),
        ),
        Stage(
            name="taskdata",
            run=taskdata.run,
            params=("project.seed", "downstream"),
            deps=(CORPUS,),
            outs=(TASK_DATA,),
            code=("sparsify/downstream.py", "tasks/taskdata.py"),
        ),
        Stage(
            name="base",
            run=base.run,
            params=("project.seed", "project.device", "base"),
            deps=(CORPUS,),
            outs=("models/base",),
            code=("sparsify/model.py", "sparsify/trainer.py", "sparsify/metrics.py", "tasks/base.py"),
        ),
    ]
    previous = "models/base"
    for sparsity in cfg.pipeline.sparsities:
        name = f"prune{level_name(sparsity)}"
        output = f"models/{name}"
        table.append(Stage(
            name=name,
            run=partial(prune.run, name=name, sparsity=sparsity, source=previous, output=output),
            params=("project.device", "prune", "pipeline.sparsities"),
            deps=(previous, CORPUS),
            outs=(output,),
            code=("sparsify/pruning.py", "sparsify/layerwise.py", "sparsify/masks.py", "tasks/prune.py"),
        ))
        previous = output

    # Evaluation of every model, then the run report.
    models = {"base": "dense"} | {f"prune{level_name(s)}": f"sparse{level_name(s)}" for s in cfg.pipeline.sparsities}
    eval_code = ("sparsify/evaluation.py", "sparsify/downstream.py", "sparsify/recovery.py", "sparsify/sandbox.py",
                 "tasks/evaluate.py")
    for model, variant in models.items():
        reference = None if model == "base" else "base"
        table.append(Stage(
            name=f"eval-{model}",
            run=partial(evaluate.run, model=model, variant=variant, reference=reference),
            params=("downstream.tasks", "evaluate"),
            deps=(f"models/{model}", TASK_DATA, *([f"reports/eval/{reference}.json"] if reference else [])),
            outs=(f"reports/eval/{model}.json",),
            code=eval_code,
        ))
    levels = {f"prune{level_name(s)}": s for s in cfg.pipeline.sparsities}
    table.append(Stage(
        name="report",
        run=partial(report.run, models=models, levels=levels),
        params=("prune.method", "pipeline.sparsities"),
        deps=tuple(f"reports/eval/{m}.json" for m in models),
        outs=("reports/run",),
        code=("sparsify/report.py", "tasks/report.py"),
    ))
    return tuple(table)


def get(cfg: Config, name: str) -> Stage:
    by_name = {s.name: s for s in stages(cfg)}
    if name not in by_name:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(by_name)}")
    return by_name[name]


def dvc_yaml(cfg: Config) -> dict:
    """dvc.yaml as data, one entry per stage, each calling the CLI."""
    entries = {}
    for s in stages(cfg):
        entries[s.name] = {
            "cmd": f"sparsellama stage {s.name}",
            "deps": [*s.deps, *s.code],
            "params": list(s.params),
            "outs": list(s.outs),
            "metrics": [{s.metrics_file: {"cache": False}}],
        }
    return {"stages": entries}
