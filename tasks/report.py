"""Stage `report`: one readable report per pipeline run (markdown + HTML with plots).

Collects the evaluation results of every model, the stage metrics and, when present,
the pruning-method benchmark, and renders the recovery table, perplexity vs sparsity
and per-task recovery bars (speedups join once benchmarking exists).
"""

from __future__ import annotations

import json
import logging

from sparsify.config import Config
from sparsify.report import ReportData, write_report
from tasks.common import Layout, StageResult, git_commit
from tasks.evaluate import results_path

log = logging.getLogger(__name__)


def _read(path):
    return json.loads(path.read_text()) if path.is_file() else None


def ppl_curve(cfg: Config, layout: Layout, levels: dict[str, float]) -> list[dict]:
    """Perplexity vs sparsity: the pipeline's own (iterative) points, plus the method benchmark if run.

    Every line starts at the dense model (sparsity 0) so the cost of pruning reads off the plot.
    """
    pipeline = f"{cfg.prune.method} (pipeline)"
    base = _read(layout.metrics("base"))
    points = []
    if base:
        points.append({"method": pipeline, "sparsity": 0.0, "ppl": base["ppl"]["val"]})
    for stage, sparsity in levels.items():
        m = _read(layout.metrics(stage))
        if m:
            points.append({"method": pipeline, "sparsity": sparsity, "ppl": m["ppl"]["val"]})
    rows = (_read(layout.reports / "prune_methods.json") or {}).get("rows", [])
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    for method in sorted({r["method"] for r in rows} - {"dense"}):
        label = f"{method} (one-shot benchmark)"
        if dense is not None:
            points.append({"method": label, "sparsity": 0.0, "ppl": dense})
        points += [{"method": label, "sparsity": r["sparsity"], "ppl": r["ppl"]}
                   for r in rows if r["method"] == method and r["pattern"].endswith("%")]
    return points


def run(cfg: Config, *, models: dict[str, str], levels: dict[str, float]) -> StageResult:
    """`models`: {model name: variant} evaluated by eval-<model>; `levels`: {prune stage: sparsity}."""
    layout = Layout.of(cfg)
    evals = {}
    for model, variant in models.items():
        found = _read(results_path(layout, model))
        if found is None:
            raise ValueError(f"no evaluation results for {model!r}; run eval-{model} first")
        evals[variant] = found["results"]
    data = ReportData(
        title="sparsellama pipeline report",
        metrics=evals,
        dense_variant="dense",
        ppl_curve=ppl_curve(cfg, layout, levels),
        run_info={"git commit": git_commit() or "unknown", "root": str(cfg.root.resolve()),
                  "pruning": f"{cfg.prune.method}, {cfg.prune.structure}, levels {cfg.pipeline.sparsities}"},
    )
    out = layout.reports / "run"
    md = write_report(data, out)
    return StageResult(metrics={"report/models": len(evals)}, outputs=[out], variant="all",
                       artifacts=[out])
