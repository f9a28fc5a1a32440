"""The one table of pipeline stages.

The Prefect flow runs these (each waiting for the stages that produce its inputs),
the CLI's `sparsellama stage NAME` runs one, and `dvc.yaml` is generated from this
table (`sparsellama dvc-yaml --write`); a test fails when they disagree.

The paper's order: data → base → prune 50% → sparse pretrain → prune 70% (from the
50% pretrained model) → sparse pretrain → per task: dense fine-tune (the teacher),
sparse fine-tunes with distillation at each level, and the pruning-during-fine-tuning
baseline at the highest level → evaluations → report. The table depends on the
configuration through `pipeline.sparsities`, `downstream.tasks` and `finetune.baseline`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sparsify.errors import UserInputError
from tasks import base, benchmark, data, evaluate, prune, quantize, report, taskdata, train_stages
from tasks.codedeps import code_files
from tasks.common import Evaluated, Layout, StageResult
from tasks.config import Config

# Output paths relative to project.root, from the one Layout the stages themselves write through.
_REL = Layout(Path())
CORPUS = _REL.corpus.as_posix()
BASE = _REL.model("base").as_posix()  # the dense base model: every sparse model's starting point and teacher
TASK_DATA = _REL.task_data.as_posix()
HELDOUT = taskdata.HELDOUT


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config], StageResult]
    params: tuple[str, ...]  # params.yaml keys the stage reads (DVC params)
    deps: tuple[str, ...]  # outputs of earlier stages, relative to project.root
    outs: tuple[str, ...]
    # dvc.yaml writes the stages of one family as one entry, `foreach`/`matrix` over `item`:
    # the values (sparsity level, task, ...) that vary between the family's stages.
    family: str = ""
    item: tuple[tuple[str, str], ...] = ()
    resumable: bool = False  # keeps resume state in `.resume/<name>` (a persistent DVC output)
    trains: bool = False  # writes its training curve to `plots/<name>.json`
    gpu: bool = False  # wants an accelerator: runs on orchestration.gpu_deployment's work pool when set

    @property
    def code(self) -> tuple[str, ...]:
        """The source files whose change reruns the stage (fingerprint skip and `dvc repro`), derived
        from what the stage's module imports (:mod:`tasks.codedeps`), never listed by hand."""
        fn = self.run.func if isinstance(self.run, partial) else self.run
        return code_files(fn.__module__)

    @property
    def metrics_file(self) -> str:
        return f"metrics/{self.name}.json"

    @property
    def resume_dir(self) -> str:
        return f".resume/{self.name}"

    @property
    def plot_file(self) -> str:
        return f"plots/{self.name}.json"


def level_name(sparsity: float) -> str:
    return f"{round(sparsity * 100)}"


def _prune(name: str, sparsity: float, source: str, family: str, item: dict[str, str]) -> Stage:
    output = f"models/{name}"
    return Stage(
        name=name,
        run=partial(prune.run, name=name, sparsity=sparsity, source=source, output=output),
        params=("project.device", "prune", "pipeline.sparsities", "evaluate.val_blocks"),
        deps=(source, CORPUS),
        outs=(output,),
        family=family,
        item=tuple(item.items()),
        resumable=True,
        gpu=True,
    )


def _finetune(
    name: str, task: str, source: str, teacher: str | None, variant: str, family: str, item: dict[str, str]
) -> Stage:
    output = f"models/{name}"
    return Stage(
        name=name,
        run=partial(
            train_stages.finetune, name=name, task=task, source=source, output=output, teacher=teacher, variant=variant
        ),
        params=("project.seed", "project.device", "finetune"),
        deps=(source, TASK_DATA, *([teacher] if teacher else [])),
        outs=(output,),
        family=family,
        item=tuple(item.items()),
        resumable=True,
        trains=True,
        gpu=True,
    )


def quantized_models(cfg: Config) -> list[tuple[str, str, str, str]]:
    """(stage/model name, scheme, source model, variant) for every quantized model: each
    sparse-pretrained model, and the top-level sparse fine-tunes when `quantize.finetuned`."""
    levels = [level_name(s) for s in cfg.pipeline.sparsities]
    out = [
        (f"quant-{sc}-pretrain{lv}", sc, f"pretrain{lv}", f"sparse{lv}-{sc}")
        for lv in levels
        for sc in cfg.quantize.schemes
    ]
    if cfg.quantize.finetuned:
        out += [
            (
                f"quant-{sc}-ft-sparse{levels[-1]}-{task}",
                sc,
                f"ft-sparse{levels[-1]}-{task}",
                f"sparse{levels[-1]}-{sc}",
            )
            for task in cfg.downstream.tasks
            for sc in cfg.quantize.schemes
        ]
    return out


def evaluated_models(cfg: Config) -> list[Evaluated]:
    """Every model the pipeline evaluates: pretraining-level models on held-out perplexity,
    fine-tuned models on their task, each against its dense counterpart."""
    levels = [level_name(s) for s in cfg.pipeline.sparsities]
    out = [Evaluated("base", "dense", (HELDOUT,), None)]
    for lv in levels:
        out.append(Evaluated(f"prune{lv}", f"sparse{lv}-oneshot", (HELDOUT,), "base"))
        out.append(Evaluated(f"pretrain{lv}", f"sparse{lv}", (HELDOUT,), "base"))
    for task in cfg.downstream.tasks:
        dense = f"ft-dense-{task}"
        out.append(Evaluated(dense, "dense", (task,), None))
        out += [Evaluated(f"ft-sparse{lv}-{task}", f"sparse{lv}", (task,), dense) for lv in levels]
        if cfg.finetune.baseline:
            out.append(Evaluated(f"ft-baseline{levels[-1]}-{task}", f"sparse{levels[-1]}-baseline", (task,), dense))
    for name, _, source, variant in quantized_models(cfg):
        task = source.removeprefix(f"ft-sparse{levels[-1]}-") if source.startswith("ft-") else None
        out.append(Evaluated(name, variant, (task,) if task else (HELDOUT,), f"ft-dense-{task}" if task else "base"))
    return out


def stages(cfg: Config) -> tuple[Stage, ...]:
    table = [
        Stage(name="data", run=data.run, params=("project.seed", "data", "base.source"), deps=(), outs=(CORPUS,)),
        Stage(
            name="taskdata", run=taskdata.run, params=("project.seed", "downstream"), deps=(CORPUS,), outs=(TASK_DATA,)
        ),
        Stage(
            name="base",
            run=partial(base.run, output=BASE),
            params=("project.seed", "project.device", "base", "evaluate.val_blocks"),
            deps=(CORPUS,),
            outs=(BASE,),
            resumable=True,
            trains=True,
            gpu=True,
        ),
    ]
    # Prune → sparse-pretrain, level by level, each level from the previous level's pretrained model.
    previous = BASE
    levels = [level_name(s) for s in cfg.pipeline.sparsities]
    for sparsity, lv in zip(cfg.pipeline.sparsities, levels, strict=True):
        table.append(_prune(f"prune{lv}", sparsity, previous, "prune", {"level": lv, "source": previous}))
        name, output = f"pretrain{lv}", f"models/pretrain{lv}"
        table.append(
            Stage(
                name=name,
                run=partial(
                    train_stages.pretrain,
                    name=name,
                    source=f"models/prune{lv}",
                    teacher=BASE,
                    output=output,
                    variant=f"sparse{lv}",
                ),
                params=("project.seed", "project.device", "pretrain", "evaluate.val_blocks"),
                deps=(f"models/prune{lv}", CORPUS, BASE),
                outs=(output,),
                family="pretrain",
                item=(("level", lv),),
                resumable=True,
                trains=True,
                gpu=True,
            )
        )
        previous = output

    if cfg.pipeline.dense_control:
        table.append(
            Stage(
                name="pretrain-dense",
                run=partial(
                    train_stages.pretrain_dense_control,
                    name="pretrain-dense",
                    source=BASE,
                    output="models/pretrain-dense",
                    levels=len(levels),
                ),
                params=("project.seed", "project.device", "pretrain", "pipeline.sparsities", "evaluate.val_blocks"),
                deps=(BASE, CORPUS),
                outs=("models/pretrain-dense",),
                resumable=True,
                trains=True,
                gpu=True,
            )
        )

    # Per task: the dense teacher, sparse fine-tunes with KD, and the baseline.
    for task in cfg.downstream.tasks:
        teacher = f"models/ft-dense-{task}"
        table.append(_finetune(f"ft-dense-{task}", task, BASE, None, "dense", "ft-dense", {"task": task}))
        for lv in levels:
            table.append(
                _finetune(
                    f"ft-sparse{lv}-{task}",
                    task,
                    f"models/pretrain{lv}",
                    teacher,
                    f"sparse{lv}",
                    "ft-sparse",
                    {"level": lv, "task": task},
                )
            )
        if cfg.finetune.baseline:
            top, lv = cfg.pipeline.sparsities[-1], levels[-1]
            pruned = f"ftprune{lv}-{task}"
            table.append(_prune(pruned, top, teacher, "ftprune", {"task": task}))
            table.append(
                _finetune(
                    f"ft-baseline{lv}-{task}",
                    task,
                    f"models/{pruned}",
                    teacher,
                    f"sparse{lv}-baseline",
                    "ft-baseline",
                    {"task": task},
                )
            )

    for name, scheme, source, variant in quantized_models(cfg):
        output = f"models/{name}"
        family = "quant-ft" if source.startswith("ft-") else "quant"
        varying = (
            source.removeprefix(f"ft-sparse{levels[-1]}-")
            if source.startswith("ft-")
            else source.removeprefix("pretrain")
        )
        table.append(
            Stage(
                name=name,
                run=partial(
                    quantize.run, name=name, scheme=scheme, source=f"models/{source}", output=output, variant=variant
                ),
                params=("project.device", "quantize", "evaluate.val_blocks"),
                deps=(f"models/{source}", CORPUS),
                outs=(output,),
                family=family,
                item=(("scheme", scheme), ("task" if family == "quant-ft" else "level", varying)),
                resumable=True,
                gpu=True,
            )
        )

    models = evaluated_models(cfg)
    for m in models:
        reference = _REL.eval_results(m.reference).as_posix() if m.reference else None
        table.append(
            Stage(
                name=f"eval-{m.model}",
                run=partial(evaluate.run, model=m.model, variant=m.variant, tasks=m.tasks, reference=m.reference),
                params=(
                    "downstream.tasks",
                    "evaluate",
                    "finetune.max_length",
                ),  # targets are cut as fine-tuning cuts them
                deps=(f"models/{m.model}", TASK_DATA, *([reference] if reference else [])),
                outs=tuple(
                    p.as_posix()
                    for p in (_REL.eval_results(m.model), _REL.eval_samples(m.model), _REL.eval_details(m.model))
                ),
                # Dense models have no reference, so one dependency fewer: a family of their own.
                family="eval" if m.reference else "eval-dense",
                item=(("model", m.model), ("reference", m.reference)) if m.reference else (("model", m.model),),
                gpu=True,
            )
        )
    sparsest = f"pretrain{levels[-1]}"
    table.append(
        Stage(
            name="benchmark",
            run=partial(benchmark.run, model=sparsest),
            params=("benchmark",),
            deps=(f"models/{sparsest}",),
            outs=("reports/benchmark",),
        )
    )
    table.append(
        Stage(
            name="report",
            run=partial(report.run, models=models, levels=dict(zip(levels, cfg.pipeline.sparsities, strict=True))),
            params=("prune.method", "pipeline.sparsities"),
            deps=(
                *(_REL.eval_results(m.model).as_posix() for m in models),
                "reports/benchmark",
                *(["models/pretrain-dense"] if cfg.pipeline.dense_control else []),
            ),
            outs=("reports/run",),
        )
    )
    return tuple(table)


def upstream(table: tuple[Stage, ...], stage: Stage) -> list[str]:
    """Names of the stages that produce `stage`'s inputs."""
    producer = {out: s.name for s in table for out in s.outs}
    return [producer[d] for d in stage.deps if d in producer]


def get(cfg: Config, name: str) -> Stage:
    by_name = {s.name: s for s in stages(cfg)}
    if name not in by_name:
        raise UserInputError(f"unknown stage {name!r}; stages: {', '.join(by_name)}")
    return by_name[name]


def _dvc_entry(s: Stage) -> dict:
    outs: list = list(s.outs)
    if s.resumable:  # kept across `dvc repro` runs, so a killed stage resumes where it stopped
        outs.append({s.resume_dir: {"persist": True, "cache": False}})
    entry = {
        "cmd": f"sparsellama stage {s.name}",
        "deps": [*s.deps, *s.code],
        "params": list(s.params),
        "outs": outs,
        "metrics": [{s.metrics_file: {"cache": False}}],
    }
    if s.trains:
        entry["plots"] = [{s.plot_file: {"cache": False, "x": "step", "y": "loss"}}]
    return entry


def _substitute(node, replace):
    """`node` (dvc.yaml data) with `replace` applied to every string, dict keys included."""
    if isinstance(node, str):
        return replace(node)
    if isinstance(node, list):
        return [_substitute(v, replace) for v in node]
    if isinstance(node, dict):
        return {_substitute(k, replace): _substitute(v, replace) for k, v in node.items()}
    return node


def _template(members: list[Stage]) -> dict | None:
    """The entry of `members[0]` with its item values replaced by `${item.<var>}`, if rendering
    that template for every member gives exactly that member's entry; otherwise None."""
    first = dict(members[0].item)
    order = sorted(first, key=lambda var: -len(first[var]))  # longest first: "pretrain50" before "50"

    def templated(text: str) -> str:
        for var in order:
            if first[var]:
                text = text.replace(first[var], f"\0{var}\0")  # placeholders cannot collide with values
        return "".join(f"${{item.{p}}}" if i % 2 else p for i, p in enumerate(text.split("\0")))

    template = _substitute(_dvc_entry(members[0]), templated)
    for m in members:
        values = dict(m.item)
        rendered = _substitute(template, lambda t, v=values: _render(t, v))
        if rendered != _dvc_entry(m):
            return None
    return template


def _render(text: str, values: dict[str, str]) -> str:
    for var, value in values.items():
        text = text.replace(f"${{item.{var}}}", value)
    return text


def _family_entry(family: str, members: list[Stage]) -> tuple[dict, dict[str, str]] | None:
    """One dvc.yaml entry for a family (`matrix` when its items are a full cross product of
    each variable's values, `foreach` over a dict otherwise) and the DVC names of its members."""
    template = _template(members)
    if template is None:
        return None
    variables = [var for var, _ in members[0].item]
    values = {var: list(dict.fromkeys(dict(m.item)[var] for m in members)) for var in variables}
    grid = [tuple(combo) for combo in itertools.product(*values.values())]
    if sorted(grid) == sorted(tuple(dict(m.item)[v] for v in variables) for m in members):
        names = {m.name: f"{family}@" + "-".join(dict(m.item)[v] for v in variables) for m in members}
        return {"matrix": values, **template}, names
    key_var = variables[0]  # foreach over a dict keyed by the first variable (unique in the family)
    keys = [dict(m.item)[key_var] for m in members]
    if len(set(keys)) != len(keys):
        return None
    foreach = {k: dict(m.item) for k, m in zip(keys, members, strict=True)}
    return {"foreach": foreach, "do": template}, {m.name: f"{family}@{k}" for k, m in zip(keys, members, strict=True)}


def dvc_layout(cfg: Config) -> tuple[dict, dict[str, str]]:
    """dvc.yaml as data, and the DVC name of every table stage (`prune@70`, `ft-sparse@70-docsum`).

    A family's stages become one `foreach`/`matrix` entry; a family whose stages don't fit
    one template is written stage by stage instead, so the file always expands to the table.
    """
    table = stages(cfg)
    groups: dict[str, list[Stage]] = {}
    for s in table:
        groups.setdefault(s.family or s.name, []).append(s)
    clash = {s.name for s in table if not s.family} & {s.family for s in table if s.family}
    if clash:
        raise ValueError(f"stage names {sorted(clash)} are also family names")
    entries: dict = {}
    names: dict[str, str] = {}
    for key, members in groups.items():
        family = _family_entry(key, members) if members[0].family else None
        if family is not None:
            entries[key], member_names = family
            names.update(member_names)
            continue
        for m in members:
            entries[m.name] = _dvc_entry(m)
            names[m.name] = m.name
    trained = [s.plot_file for s in table if s.trains]
    plots = [
        {
            "training loss": {
                "x": "step",
                "y": {f: "loss" for f in trained},
                "title": "training loss",
                "x_label": "optimizer step",
                "y_label": "loss",
            }
        },
        {
            "reports/run/plots/perplexity.json": {
                "x": "ppl",
                "y": "model",
                "template": "bar_horizontal",
                "title": "validation perplexity",
            }
        },
        {
            "reports/run/plots/recovery.json": {
                "x": "recovery",
                "y": "model",
                "template": "bar_horizontal",
                "title": "fine-tuned recovery (metric / dense teacher)",
            }
        },
        {
            "reports/run/plots/speedup.json": {
                "x": "speedup_vs_fp32",
                "y": "variant",
                "template": "bar_horizontal",
                "title": "11008x4096 batch-1 speedup vs dense fp32",
            }
        },
    ]
    return {"stages": entries, "plots": plots}, names


def dvc_yaml(cfg: Config) -> dict:
    return dvc_layout(cfg)[0]
