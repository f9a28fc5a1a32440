"""Per-run report: recovery table, perplexity-vs-sparsity, recovery bars, speedups.

``write_report(data, out_dir)`` writes ``report.md`` and ``report.html`` (same
content; the HTML links the figures by relative path) plus ``figures/*.png``.
The document is built once as a list of blocks and rendered twice, so the two
formats cannot drift apart. Figures use matplotlib's object API with the Agg
canvas (no pyplot global state, no display needed). Every file is written
atomically.
"""

from __future__ import annotations

import dataclasses
import html
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sparsify.errors import DataError
from sparsify.evaluation.recovery import primary_metrics, recovery_where_defined
from sparsify.io import atomic_write_bytes, atomic_write_text
from sparsify.reporting.claims import Claim

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"


@dataclasses.dataclass(frozen=True)
class ReportData:
    """Everything a run report shows; every part is optional.

    Attributes:
        metrics: ``{variant: {task: {metric: value}}}``, e.g. from
            ``evaluation.evaluate_model`` for dense, sparse50, sparse70...
        dense_variant: the baseline for recovery (when present in ``metrics``).
        ppl_curve: points ``{"method", "sparsity" (fraction 0-1), "ppl"}``.
        speedups: ``{variant: speedup over the dense baseline}`` from benchmarks.
        run_info: free-form provenance shown at the top (run id, commit, ...).
        claims: the paper's claims against this run (:func:`sparsify.reporting.claims.paper_claims`), shown first.
    """

    title: str = "sparsellama run report"
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]] = dataclasses.field(default_factory=dict)
    dense_variant: str = "dense"
    ppl_curve: Sequence[Mapping[str, Any]] = ()
    speedups: Mapping[str, float] = dataclasses.field(default_factory=dict)
    run_info: Mapping[str, str] = dataclasses.field(default_factory=dict)
    claims: Sequence[Claim] = ()


# --------------------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclasses.dataclass(frozen=True)
class _Paragraph:
    text: str


@dataclasses.dataclass(frozen=True)
class _Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclasses.dataclass(frozen=True)
class _Figure:
    path: str  # relative to the report
    caption: str


_Block = _Heading | _Paragraph | _Table | _Figure


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


# --------------------------------------------------------------------------- figures


def _new_figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_figure(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def _validate_curve(points: Sequence[Mapping[str, Any]]) -> None:
    for index, point in enumerate(points):
        missing = {"method", "sparsity", "ppl"} - set(point)
        if missing:
            raise DataError(f"ppl_curve point {index}: missing {sorted(missing)}")
        if not 0.0 <= float(point["sparsity"]) <= 1.0:
            raise DataError(f"ppl_curve point {index}: sparsity {point['sparsity']} is not a fraction in [0, 1]")
        if not (math.isfinite(float(point["ppl"])) and float(point["ppl"]) > 0):
            raise DataError(f"ppl_curve point {index}: ppl {point['ppl']} is not a positive finite number")


def plot_ppl_vs_sparsity(points: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One line per pruning method: perplexity against sparsity (log y when it spans >20x)."""
    _validate_curve(points)
    figure = _new_figure()
    axes = figure.add_subplot()
    for method in sorted({str(p["method"]) for p in points}):
        series = sorted((float(p["sparsity"]), float(p["ppl"])) for p in points if str(p["method"]) == method)
        axes.plot([100 * s for s, _ in series], [ppl for _, ppl in series], marker="o", label=method)
    values = [float(p["ppl"]) for p in points]
    if max(values) / min(values) > 20:
        axes.set_yscale("log")
    axes.set_xlabel("sparsity (% of weights pruned)")
    axes.set_ylabel("perplexity (lower is better)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    _save_figure(figure, path)


def plot_recovery_bars(recoveries: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Grouped bars: per task, one bar per variant's recovery (%), with the 100% line."""
    variants = list(recoveries)
    tasks = sorted({task for r in recoveries.values() for task in r})
    width = 0.8 / max(1, len(variants))
    figure = _new_figure(max(6.4, 1.2 * len(tasks) + 2))
    axes = figure.add_subplot()
    for offset, variant in enumerate(variants):
        xs = [i + (offset - (len(variants) - 1) / 2) * width for i in range(len(tasks))]
        axes.bar(xs, [100 * recoveries[variant].get(task, math.nan) for task in tasks], width, label=variant)
    axes.axhline(100, color="black", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axes.set_ylabel("recovery (% of dense)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    _save_figure(figure, path)


def plot_speedups(speedups: Mapping[str, float], path: Path) -> None:
    """Horizontal bars of speedup over the dense baseline, with the 1x line."""
    names = list(speedups)
    figure = _new_figure(6.4, max(2.5, 0.5 * len(names) + 1.5))
    axes = figure.add_subplot()
    bars = axes.barh(names, [speedups[n] for n in names])
    axes.bar_label(bars, labels=[f"{speedups[n]:.2f}x" for n in names], padding=3)
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1)
    axes.margins(x=0.15)  # room for the value labels
    axes.invert_yaxis()  # first variant on top, as listed
    axes.set_xlabel("speedup over dense (higher is better)")
    _save_figure(figure, path)


# --------------------------------------------------------------------------- document


def _recoveries(data: ReportData) -> dict[str, dict[str, float]]:
    """``{variant: recovery(...)}`` for every non-dense variant, if a dense baseline exists."""
    dense = data.metrics.get(data.dense_variant)
    if dense is None:
        return {}
    out = {v: recovery_where_defined(m, dense)[0] for v, m in data.metrics.items() if v != data.dense_variant}
    return {v: r for v, r in out.items() if r}


def _recovery_table(data: ReportData, recoveries: Mapping[str, Mapping[str, float]]) -> _Table:
    """Rows: the dense variant's tasks; a variant that lacks a task (e.g. a one-shot model that
    was only scored on perplexity) or whose recovery is undefined shows n/a."""
    dense = data.metrics[data.dense_variant]
    variants = list(recoveries)
    rows = []
    for task, metric in primary_metrics(dense, dense).items():
        cells = []
        for v in variants:
            value = data.metrics[v].get(task, {}).get(metric)
            rec = recoveries[v].get(f"recovery/{task}")
            cells.append("n/a" if value is None else f"{_fmt(value)} ({_pct(rec) if rec is not None else 'n/a'})")
        rows.append([task, metric, _fmt(dense[task][metric]), *cells])
    rows.append(["**mean**", "", "", *(f"({_pct(recoveries[v]['recovery/mean'])})" for v in variants)])
    return _Table(["task", "metric", data.dense_variant, *variants], rows)


def _metrics_table(data: ReportData) -> _Table:
    variants = list(data.metrics)
    keys = sorted({(task, metric) for m in data.metrics.values() for task, ms in m.items() for metric in ms})
    rows = [
        [
            task,
            metric,
            *(
                _fmt(data.metrics[v][task][metric]) if metric in data.metrics[v].get(task, {}) else "n/a"
                for v in variants
            ),
        ]
        for task, metric in keys
    ]
    return _Table(["task", "metric", *variants], rows)


def build_blocks(data: ReportData, figures_dir: Path) -> list[_Block]:
    """The report's content; draws the figures into ``figures_dir`` as it goes."""
    blocks: list[_Block] = [_Heading(1, data.title)]
    if data.claims:  # first: what a reader opens the report for
        blocks += [
            _Heading(2, "The paper's claims, on this run"),
            _Table(
                ["claim", "paper", "this run (± SE)", "verdict", "how measured"],
                [[c.claim, c.paper, c.ours_text(), f"**{c.verdict}**", c.basis] for c in data.claims],
            ),
            _Paragraph(
                "Met: within 2 standard errors of the paper's figure, with an SE small enough to tell; "
                "inconclusive: the SE is too large to decide (see `sparsify/reporting/claims.py`)."
            ),
        ]
    if data.run_info:
        blocks.append(_Table(["", ""], [[k, str(v)] for k, v in data.run_info.items()]))
    recoveries = _recoveries(data)
    if recoveries:
        blocks += [
            _Heading(2, "Accuracy recovery"),
            _Paragraph(
                f"Primary metric per task for each variant, with recovery relative to "
                f"`{data.dense_variant}` in parentheses (sparse/dense; dense/sparse for perplexity, "
                f"so above 100% is better than dense)."
            ),
            _recovery_table(data, recoveries),
        ]
        undefined = sorted(
            t for t in data.metrics[data.dense_variant] if not any(f"recovery/{t}" in r for r in recoveries.values())
        )
        if undefined:
            blocks.append(
                _Paragraph(
                    f"n/a: recovery is undefined where `{data.dense_variant}` scores 0 "
                    f"({', '.join(undefined)}); the raw metrics are in the table below."
                )
            )
        tasks = sorted(data.metrics[data.dense_variant])
        per_task = {
            v: {task: r[f"recovery/{task}"] for task in tasks if f"recovery/{task}" in r} for v, r in recoveries.items()
        }
        plot_recovery_bars(per_task, figures_dir / "recovery.png")
        blocks.append(
            _Figure(
                f"{FIGURES_DIR}/recovery.png",
                f"Recovery of each task's primary metric, in % of the {data.dense_variant} model "
                f"(dashed line: 100% = full recovery), one bar per variant.",
            )
        )
    if data.metrics:
        blocks += [_Heading(2, "All metrics"), _metrics_table(data)]
    if data.ppl_curve:
        plot_ppl_vs_sparsity(data.ppl_curve, figures_dir / "ppl_vs_sparsity.png")
        blocks += [
            _Heading(2, "Perplexity vs. sparsity"),
            _Figure(
                f"{FIGURES_DIR}/ppl_vs_sparsity.png",
                "Validation perplexity (lower is better) against the fraction of weights pruned, "
                "one line per pruning method; each point is one pruned model.",
            ),
        ]
    if data.speedups:
        plot_speedups(data.speedups, figures_dir / "speedup.png")
        blocks += [
            _Heading(2, "Inference speedup"),
            _Figure(
                f"{FIGURES_DIR}/speedup.png",
                "Measured inference speedup of each variant over the dense baseline (dashed line: 1x = no speedup).",
            ),
            _Table(["variant", "speedup"], [[k, f"{v:.2f}x"] for k, v in data.speedups.items()]),
        ]
    return blocks


def render_markdown(blocks: Sequence[_Block]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    parts = []
    for block in blocks:
        if isinstance(block, _Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, _Paragraph):
            parts.append(block.text)
        elif isinstance(block, _Table):
            lines = ["| " + " | ".join(cell(h) for h in block.headers) + " |", "|" + "---|" * len(block.headers)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        elif isinstance(block, _Figure):
            parts.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


def render_html(blocks: Sequence[_Block], title: str) -> str:
    def text(value: str) -> str:  # the markdown's **bold** and `code`, escaped otherwise
        escaped = html.escape(value)
        while escaped.count("**") >= 2:
            escaped = escaped.replace("**", "<b>", 1).replace("**", "</b>", 1)
        while escaped.count("`") >= 2:
            escaped = escaped.replace("`", "<code>", 1).replace("`", "</code>", 1)
        return escaped

    body = []
    for block in blocks:
        if isinstance(block, _Heading):
            body.append(f"<h{block.level}>{text(block.text)}</h{block.level}>")
        elif isinstance(block, _Paragraph):
            body.append(f"<p>{text(block.text)}</p>")
        elif isinstance(block, _Table):
            head = "".join(f"<th>{text(h)}</th>" for h in block.headers)
            rows = "".join("<tr>" + "".join(f"<td>{text(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, _Figure):
            body.append(
                f'<figure><img src="{html.escape(block.path)}" alt="{html.escape(block.caption)}">'
                f"<figcaption>{text(block.caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(data: ReportData, out_dir: str | os.PathLike) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/`` under ``out_dir``; return the .md path."""
    out = Path(out_dir)
    blocks = build_blocks(data, out / FIGURES_DIR)
    atomic_write_text(out / "report.html", render_html(blocks, data.title))
    atomic_write_text(out / "report.md", render_markdown(blocks))
    log.info("report written to %s", out / "report.md")
    return out / "report.md"
