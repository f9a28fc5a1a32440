"""Stage `report`: one readable report per pipeline run (markdown + HTML with plots).

Collects the evaluation results of every model, the stage metrics and, when present,
the pruning-method benchmark, and renders the recovery table, perplexity vs sparsity
and per-task recovery bars (speedups join once benchmarking exists).
"""

from __future__ import annotations

import dataclasses
import json
import logging

from sparsify.data.downstream import get_task
from sparsify.errors import DataError
from sparsify.evaluation.recovery import metric_recovery, paired_difference
from sparsify.io import atomic_write_json, atomic_write_text
from sparsify.reporting.claims import paper_claims
from sparsify.reporting.report import ReportData, write_report
from tasks.common import Evaluated, Layout, StageResult, checkpoint_mb, git_commit
from tasks.config import Config

log = logging.getLogger(__name__)


def _read(path):
    return json.loads(path.read_text()) if path.is_file() else None


def ppl_curve(cfg: Config, layout: Layout, levels: dict[str, float]) -> list[dict]:
    """Perplexity vs sparsity: the pipeline's one-shot and sparse-pretrained models, plus the
    pruning-method benchmark when it has been run. Every line starts at the dense model."""
    base = _read(layout.metrics("base"))
    points = []
    for label, prefix in (
        (f"{cfg.prune.method} one-shot (pipeline)", "prune"),
        ("sparse-pretrained (pipeline)", "pretrain"),
    ):
        if base:
            points.append({"method": label, "sparsity": 0.0, "ppl": base["ppl"]["val"]})
        for lv, sparsity in levels.items():
            m = _read(layout.metrics(f"{prefix}{lv}"))
            if m:
                points.append({"method": label, "sparsity": sparsity, "ppl": m["ppl"]["val"]})
    rows = (_read(layout.reports / "prune_methods.json") or {}).get("rows", [])
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    for method in sorted({r["method"] for r in rows} - {"dense"}):
        label = f"{method} one-shot (benchmark)"
        if dense is not None:
            points.append({"method": label, "sparsity": 0.0, "ppl": dense})
        points += [
            {"method": label, "sparsity": r["sparsity"], "ppl": r["ppl"]}
            for r in rows
            if r["method"] == method and r["pattern"].endswith("%")
        ]
    return points


def _sample_rows(layout: Layout, model: str, task: str) -> list[dict]:
    """`model`'s per-document eval rows on `task` (empty without a samples file)."""
    path = layout.eval_samples(model)
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["task"] == task]


def _scores(rows: list[dict], metric: str) -> dict[int, float] | None:
    """``{doc_id: metric}`` over the rows that have it, or None when none does."""
    return {r["doc_id"]: r[metric] for r in rows if metric in r} or None


def _paired(a: dict[int, float] | None, b: dict[int, float] | None) -> dict[str, float] | None:
    """``{"diff", "se"}`` of a - b over the same documents; None unless both scored the same ones."""
    if not a or not b or a.keys() != b.keys() or len(a) < 2:
        return None
    ids = sorted(a)
    diff, se = paired_difference([a[i] for i in ids], [b[i] for i in ids])
    return {"diff": diff, "se": se}


def recovery_table(
    cfg: Config, layout: Layout, levels: dict[str, float], evals: dict[str, dict[str, dict[str, float]]]
) -> dict:
    """The paper's comparison: validation perplexity through the schedule, and per task the
    dense teacher vs the sparse fine-tunes vs the pruning-during-fine-tuning baseline."""
    rows = [("dense", "base"), ("dense + the same extra tokens (control)", "pretrain-dense")]
    rows += [
        (f"{kind} {lv}%", f"{prefix}{lv}")
        for lv in levels
        for kind, prefix in (("one-shot", "prune"), ("sparse-pretrained", "pretrain"))
    ]
    ppl = []
    for label, stage in rows:
        m = _read(layout.metrics(stage))
        if m:
            ppl.append({"model": label, "stage": stage, "ppl_val": m["ppl"]["val"]})
    top = list(levels)[-1]
    columns = ["dense", *(f"sparse{lv}" for lv in levels), f"sparse{top}-baseline"]
    tasks = {}
    for task in cfg.downstream.tasks:
        metric = get_task(task).primary_metric
        values = {c: evals.get(c, {}).get(task, {}).get(metric) for c in columns}
        dense = values["dense"]
        rec = {
            c: (metric_recovery(task, metric, v, dense) if v is not None and dense else None)
            for c, v in values.items()
            if c != "dense"
        }
        # The fine-tunes' loss on held-out task records: a finer signal than a generation metric
        # scored on a few hundred test documents, which small models leave within noise.
        stages_of = {
            "dense": f"ft-dense-{task}",
            **{f"sparse{lv}": f"ft-sparse{lv}-{task}" for lv in levels},
            f"sparse{top}-baseline": f"ft-baseline{top}-{task}",
        }
        val_loss = {
            c: (_read(layout.metrics(st)) or {}).get("train", {}).get("val_loss") for c, st in stages_of.items()
        }
        # The test-split target NLL (eval stage): the same loss on the test documents.
        nll = {c: evals.get(c, {}).get(task, {}).get("target_nll") for c in columns}
        # Whether a difference is more than noise: every fine-tune is scored on the same test
        # documents, so the paired difference has a standard error (see paired_difference).
        rows_of = {c: _sample_rows(layout, st, task) for c, st in stages_of.items()}
        pairs = [(c, "dense") for c in columns[1:]] + [(f"sparse{top}", f"sparse{top}-baseline")]
        paired = {}
        for m in (metric, "target_nll"):
            scores = {c: _scores(rows, m) for c, rows in rows_of.items()}
            for a, b in pairs:
                found = _paired(scores[a], scores[b])
                if found is not None:
                    paired.setdefault(m, {})[f"{a} - {b}"] = found
        tasks[task] = {
            "metric": metric,
            "values": values,
            "recovery": rec,
            "val_loss": val_loss,
            "target_nll": nll,
            "paired": paired,
        }
    return {"perplexity": ppl, "tasks": tasks, "columns": columns}


def quant_table(
    cfg: Config, layout: Layout, levels: dict[str, float], evals: dict[str, dict[str, dict[str, float]]]
) -> dict:
    """Quantization on top of sparsity: perplexity and on-disk size of each sparse model and its
    quantized versions, and the task metrics of the quantized fine-tuned models."""
    rows = []
    base_mb = checkpoint_mb(layout.model("base")) if layout.model("base").exists() else None
    rows.append(
        {
            "model": "dense",
            "ppl_val": (_read(layout.metrics("base")) or {}).get("ppl", {}).get("val"),
            "size_mb": base_mb,
            "ppl_change": None,
        }
    )
    for lv in levels:
        sparse = (_read(layout.metrics(f"pretrain{lv}")) or {}).get("ppl", {}).get("val")
        rows.append(
            {
                "model": f"sparse{lv}",
                "ppl_val": sparse,
                "ppl_change": None,
                "size_mb": checkpoint_mb(layout.model(f"pretrain{lv}"))
                if layout.model(f"pretrain{lv}").exists()
                else None,
            }
        )
        for scheme in cfg.quantize.schemes:
            m = _read(layout.metrics(f"quant-{scheme}-pretrain{lv}"))
            if m:
                ppl = m["ppl"]["val"]
                rows.append(
                    {
                        "model": f"sparse{lv}-{scheme}",
                        "ppl_val": ppl,
                        "size_mb": m["size"]["mb"],
                        "sparse_format_mb": m["size"]["sparse_format_mb"],
                        "ppl_change": ppl / sparse - 1 if sparse else None,
                    }
                )
    top = list(levels)[-1]
    tasks = {}
    for task in cfg.downstream.tasks:
        metric = get_task(task).primary_metric
        variants = [f"sparse{top}", *(f"sparse{top}-{s}" for s in cfg.quantize.schemes)]
        tasks[task] = {"metric": metric, **{v: evals.get(v, {}).get(task, {}).get(metric) for v in variants}}
    return {"models": rows, "tasks": tasks}


def quant_markdown(table: dict) -> str:
    def fmt(v, spec=".4g"):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "## Quantization on top of sparsity",
        "",
        "| model | ppl (val) | change vs sparse | size (MB, compressed-tensors) | size (MB, bitmask format) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {fmt(r['ppl_val'], '.2f')} | {fmt(r['ppl_change'], '+.2%')} | "
        f"{fmt(r['size_mb'], '.2f')} | {fmt(r.get('sparse_format_mb'), '.2f')} |"
        for r in table["models"]
    ]
    if table["tasks"]:
        cols = [c for c in next(iter(table["tasks"].values())) if c != "metric"]
        lines += ["", "| task | metric | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
        lines += [
            f"| {t} | {row['metric']} | " + " | ".join(fmt(row[c]) for c in cols) + " |"
            for t, row in table["tasks"].items()
        ]
    return "\n".join(lines) + "\n"


def recovery_markdown(table: dict) -> str:
    def fmt(v, pct=False):
        return "n/a" if v is None else (f"{v:.1%}" if pct else f"{v:.4g}")

    lines = ["## Validation perplexity through the schedule", "", "| model | ppl (val) |", "|---|---:|"]
    lines += [f"| {r['model']} | {r['ppl_val']:.2f} |" for r in table["perplexity"]]
    cols = table["columns"]
    lines += [
        "",
        "## Fine-tuned recovery (metric, and ÷ dense teacher)",
        "",
        "| task | metric | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for task, row in table["tasks"].items():
        cells = [fmt(row["values"]["dense"])] + [
            f"{fmt(row['values'][c])} ({fmt(row['recovery'][c], pct=True)})" for c in cols[1:]
        ]
        lines.append(f"| {task} | {row['metric']} | " + " | ".join(cells) + " |")
        for key, label in (
            ("val_loss", "val loss (lower is better)"),
            ("target_nll", "test target NLL (lower is better)"),
        ):
            if any(v is not None for v in row.get(key, {}).values()):
                lines.append(f"| {task} | {label} | " + " | ".join(fmt(row[key].get(c)) for c in cols) + " |")
    paired = [
        (task, metric, pair, d)
        for task, row in table["tasks"].items()
        for metric, pairs in row.get("paired", {}).items()
        for pair, d in pairs.items()
    ]
    if paired:
        lines += [
            "",
            "Paired differences on the same test documents (± standard error; |diff| > 2 SE is more than noise):",
            "",
            "| task | metric | difference | value | in SE |",
            "|---|---|---|---:|---:|",
        ]
        lines += [
            f"| {task} | {metric} | {pair} | {d['diff']:+.4f} ± {d['se']:.4f} | "
            f"{d['diff'] / d['se'] if d['se'] > 0 else float('inf'):+.1f} |"
            for task, metric, pair, d in paired
        ]
    return "\n".join(lines) + "\n"


def dvc_plots(table: dict, quant: dict, speedups: dict[str, float]) -> dict[str, list[dict]]:
    """Flat rows for `dvc plots show` (dvc.yaml's top-level plots): one bar per model/variant."""
    return {
        "perplexity": [{"model": r["model"], "ppl": r["ppl_val"]} for r in table["perplexity"]]
        + [
            {"model": r["model"], "ppl": r["ppl_val"]}
            for r in quant["models"]
            if r["ppl_change"] is not None and r["ppl_val"] is not None
        ],
        "recovery": [
            {"model": f"{task} {col}", "recovery": v}
            for task, row in table["tasks"].items()
            for col, v in row["recovery"].items()
            if v is not None
        ],
        "speedup": [{"variant": v, "speedup_vs_fp32": x} for v, x in speedups.items()],
    }


def code_sandbox_line(sandboxes: dict[str, list[str]]) -> str:
    """What generated code (pass@1) ran under, e.g. `bwrap(net,fs,...)`; per model when they differ."""
    if len(sandboxes) == 1:
        return next(iter(sandboxes))
    return "; ".join(f"{iso} ({', '.join(models)})" for iso, models in sorted(sandboxes.items()))


def run(cfg: Config, *, models: list[Evaluated], levels: dict[str, float]) -> StageResult:
    """`models`: what eval-<model> scored; `levels`: {"50": 0.5, ...}."""
    layout = Layout.of(cfg)
    evals: dict[str, dict[str, dict[str, float]]] = {}
    sandboxes: dict[str, list[str]] = {}  # protections generated code ran under -> the models it scored
    for m in models:
        found = _read(layout.eval_results(m.model))
        if found is None:
            raise DataError(f"no evaluation results for {m.model!r}; run eval-{m.model} first")
        # One column per variant: e.g. "dense" = the base model's perplexity + each task's dense fine-tune.
        evals.setdefault(m.variant, {}).update(found["results"])
        if found.get("sandbox"):
            sandboxes.setdefault(found["sandbox"], []).append(m.model)
    bench = _read(layout.reports / "benchmark" / "sparse_kernels.json") or {}
    # The speedup chart: batch-1 11008x4096 (an MLP projection of Llama-2-7B) over dense fp32.
    speedups = {
        r["variant"]: r["speedup_vs_fp32"]
        for r in bench.get("layers", {}).get("rows", [])
        if r["shape"] == "11008x4096" and r["batch"] == 1 and "speedup_vs_fp32" in r
    }
    table = recovery_table(cfg, layout, levels, evals)
    claims = paper_claims(table["tasks"], list(levels), bench)
    data = ReportData(
        title="sparsellama pipeline report",
        claims=claims,
        metrics=evals,
        dense_variant="dense",
        ppl_curve=ppl_curve(cfg, layout, levels),
        speedups=speedups,
        run_info={
            "git commit": git_commit() or "unknown",
            "root": str(cfg.root.resolve()),
            "pruning": f"{cfg.prune.method}, {cfg.prune.structure}, levels {cfg.pipeline.sparsities}",
            "tasks": ", ".join(cfg.downstream.tasks),
            **({"code sandbox": code_sandbox_line(sandboxes)} if sandboxes else {}),
        },
    )
    out = layout.reports / "run"
    write_report(data, out)
    quant = quant_table(cfg, layout, levels, evals)
    atomic_write_json(out / "recovery.json", table | {"quantization": quant})
    atomic_write_json(out / "claims.json", [dataclasses.asdict(c) for c in claims])
    # Without quantization schemes the section would only repeat the perplexities above.
    quant_md = "\n" + quant_markdown(quant) if cfg.quantize.schemes else ""
    atomic_write_text(out / "recovery.md", recovery_markdown(table) + quant_md)
    for name, rows in dvc_plots(table, quant, speedups).items():
        atomic_write_json(out / "plots" / f"{name}.json", rows)
    metrics: dict[str, float] = {"report/variants": len(evals)}
    metrics.update(
        {
            f"claims/{v.replace(' ', '_')}": sum(c.verdict == v for c in claims)
            for v in ("met", "not met", "inconclusive", "not measured")
        }
    )
    metrics.update({f"ppl/val/{r['stage']}": r["ppl_val"] for r in table["perplexity"]})
    metrics.update(
        {
            f"recovery/{task}/{col}": v
            for task, row in table["tasks"].items()
            for col, v in row["recovery"].items()
            if v is not None
        }
    )
    metrics.update(
        {
            f"paired/{task}/{metric}/{pair.replace(' ', '')}/{k}": v
            for task, row in table["tasks"].items()
            for metric, pairs in row["paired"].items()
            for pair, d in pairs.items()
            for k, v in d.items()
        }
    )
    return StageResult(metrics=metrics, outputs=[out], variant="all", artifacts=[out])
