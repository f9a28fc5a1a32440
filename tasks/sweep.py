"""The pruning sweep: methods × sparsity patterns on the dense base model.

Each point prunes a fresh copy of `models/base` with the pipeline's calibration set and
scores it on the same validation blocks as every stage's `ppl/val`. Points are stages
(`sweep-<method>-<pattern>`) built like the pipeline's, so they get the same fingerprint
skip, metrics file and nested MLflow run; the `prune-sweep` flow runs them after `data`
and `base`, and `sweep-report` gathers them into `reports/sweep/prune_sweep.{json,md}`.
The masks are not kept: the sweep compares methods, the pipeline's prune stages make models.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial

import torch

from sparsify.checkpoint import load_model
from sparsify.data.corpus import Corpus
from sparsify.errors import UserInputError
from sparsify.io import atomic_write_json, atomic_write_text
from sparsify.model import pick_device
from sparsify.sparsity.layerwise import prune_model
from sparsify.sparsity.masks import sparsity_report
from sparsify.sparsity.pruning import PruneConfig
from tasks.common import Layout, StageResult, val_perplexity
from tasks.config import Config
from tasks.stages import BASE, CORPUS, Stage

log = logging.getLogger(__name__)

OUT = "reports/sweep"


# A sweep method is a `prune.method`, optionally with options appended, e.g. "admm+owl" or
# "sparsegpt+refine": each option turns on the `prune` keys below for that point only.
OPTIONS = {"owl": {"owl": True}, "refine": {"refine": True}}


@dataclass(frozen=True)
class Point:
    method: str  # "<prune.method>[+option...]", options from OPTIONS
    sparsity: float
    structure: str = "unstructured"

    @property
    def pattern(self) -> str:
        if self.structure == "unstructured":
            return f"{round(self.sparsity * 100)}"
        return self.structure.replace(":", "of")

    @property
    def slug(self) -> str:
        """The method in stage, run and metric names ("admm+owl" -> "admm-owl": MLflow metric names refuse '+')."""
        return self.method.replace("+", "-")

    @property
    def name(self) -> str:
        return f"sweep-{self.slug}-{self.pattern}"


def points(methods: list[str], sparsities: list[float], structures: list[str]) -> list[Point]:
    """Every method at every unstructured sparsity, plus every N:M structure (its sparsity is 1 - N/M).

    Methods with "+owl" run at the unstructured sparsities only: OWL gives each decoder layer
    its own sparsity, which an N:M pattern fixes.
    """
    out = []
    for structure in structures:
        if structure == "unstructured":
            out += [Point(m, s) for s in sparsities for m in methods]
        else:
            n, _, m_ = structure.partition(":")
            if not (n.isdigit() and m_.isdigit() and int(m_) > 0):
                raise UserInputError(f"pruning sweep structure {structure!r}: expected 'unstructured' or N:M, e.g. 2:4")
            out += [Point(m, 1 - int(n) / int(m_), structure) for m in methods if "owl" not in m.split("+")[1:]]
    return out


def point_config(cfg: Config, point: Point) -> PruneConfig:
    """The `prune` section with the point's method, options and pattern (a clear error for a bad one)."""
    method, *options = point.method.split("+")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise UserInputError(
            f"pruning sweep method {point.method!r}: unknown option(s) {unknown}; "
            f"expected <prune.method>[+{'|+'.join(OPTIONS)}]"
        )
    fields = {**cfg.prune.model_dump(), "method": method, "sparsity": point.sparsity, "structure": point.structure}
    for option in options:
        fields |= OPTIONS[option]
    try:
        return PruneConfig.model_validate(fields)
    except ValueError as err:
        raise UserInputError(f"pruning sweep point {point.name}: {err}") from None


def prune_point(cfg: Config, *, point: Point, source: str) -> StageResult:
    layout = Layout.of(cfg)
    pcfg = point_config(cfg, point)
    corpus = Corpus.open(layout.corpus)
    model = load_model(layout.root / source, dtype=torch.float32)
    device = pick_device(cfg.project.device)
    result = prune_model(model, corpus.calibration(), pcfg, device=device, progress=False)
    ppl = val_perplexity(cfg, model, corpus, device)
    row = {
        "method": point.method,
        "pattern": point.pattern,
        "structure": point.structure,
        "sparsity": sparsity_report(model.cpu(), result.masks)["global"],
        "ppl": ppl,
        "seconds": result.total_seconds,
    }
    atomic_write_json(cfg.root / OUT / f"{point.name}.json", row)
    log.info("%s: ppl %.2f at sparsity %.3f in %.1f s", point.name, ppl, row["sparsity"], row["seconds"])
    return StageResult(
        metrics={"ppl/val": ppl, "sparsity/global": row["sparsity"], "time/prune_s": row["seconds"]},
        outputs=[cfg.root / OUT / f"{point.name}.json"],
        variant=f"{point.slug}-{point.pattern}",
    )


def report(cfg: Config, *, pts: list[Point]) -> StageResult:
    layout = Layout.of(cfg)
    dense = json.loads(layout.metrics("base").read_text())["ppl"]["val"]
    rows = [json.loads((cfg.root / OUT / f"{p.name}.json").read_text()) for p in pts]
    for r in rows:
        r["ppl_change"] = r["ppl"] / dense - 1
    atomic_write_json(cfg.root / OUT / "prune_sweep.json", {"dense_ppl": dense, "rows": rows})
    atomic_write_text(cfg.root / OUT / "prune_sweep.md", markdown(dense, rows))
    metrics = {f"sweep/{p.slug}-{r['pattern']}/ppl": r["ppl"] for p, r in zip(pts, rows, strict=True)}
    return StageResult(
        metrics=metrics,
        outputs=[cfg.root / OUT / "prune_sweep.md"],
        variant="sweep",
        artifacts=[cfg.root / OUT / "prune_sweep.json", cfg.root / OUT / "prune_sweep.md"],
    )


def markdown(dense: float, rows: list[dict]) -> str:
    lines = [
        f"Dense base: val ppl {dense:.2f}.",
        "",
        "| method | pattern | sparsity | val ppl | vs dense | time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | {r['ppl_change']:+.2%} | "
        f"{r['seconds']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def sweep_stages(pts: list[Point]) -> tuple[Stage, ...]:
    """The sweep's stages: one per point (after `base`), then the summary."""
    if not pts:
        raise UserInputError("the pruning sweep has no points: give at least one method and one sparsity or structure")
    table = [
        Stage(
            name=p.name,
            run=partial(prune_point, point=p, source=BASE),
            params=("project.device", "prune", "evaluate.val_blocks"),
            deps=(BASE, CORPUS),
            outs=(f"{OUT}/{p.name}.json",),
        )
        for p in pts
    ]
    table.append(
        Stage(
            name="sweep-report",
            run=partial(report, pts=pts),
            params=(),
            deps=tuple(s.outs[0] for s in table),
            outs=(f"{OUT}/prune_sweep.md",),
        )
    )
    return tuple(table)
