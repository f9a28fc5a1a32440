"""The run report: markdown + HTML with figures, recovery numbers, captions, atomic files."""

from __future__ import annotations

import json
import re

import pytest

from sparsify.reporting.report import ReportData, write_report

PNG = b"\x89PNG\r\n\x1a\n"
METRICS = {
    "dense": {"arithmetic": {"exact_match": 0.40}, "heldout": {"word_perplexity": 20.0}},
    "sparse50": {"arithmetic": {"exact_match": 0.36}, "heldout": {"word_perplexity": 22.0}},
    "sparse70": {"arithmetic": {"exact_match": 0.30}, "heldout": {"word_perplexity": 25.0}},
}
CURVE = [
    {"method": method, "sparsity": sparsity, "ppl": ppl}
    for method, points in {
        "sparsegpt": [(0.0, 20), (0.5, 22), (0.7, 30)],
        "magnitude": [(0.0, 20), (0.5, 40), (0.7, 900)],
    }.items()
    for sparsity, ppl in points
]


def test_full_report(tmp_path):
    data = ReportData(
        title="run 42",
        metrics=METRICS,
        ppl_curve=CURVE,
        speedups={"sparse70": 2.5, "sparse70-int8": 5.1},
        run_info={"git": "abc123"},
    )
    md_path = write_report(data, tmp_path)
    md = md_path.read_text()
    html = (tmp_path / "report.html").read_text()

    assert md_path == tmp_path / "report.md"
    # Hand-computed recoveries: 0.36/0.40, 0.30/0.40; perplexity 20/22, 20/25; means.
    for expected in ("0.36 (90.0%)", "0.3 (75.0%)", "22 (90.9%)", "25 (80.0%)", "(90.5%)", "(77.5%)"):
        assert expected in md, expected
    figures = set(re.findall(r"\]\((figures/[^)]+)\)", md))
    assert figures == {"figures/recovery.png", "figures/ppl_vs_sparsity.png", "figures/speedup.png"}
    assert set(re.findall(r'<img src="([^"]+)"', html)) == figures  # relative links, same figures
    for figure in figures:
        assert (tmp_path / figure).read_bytes().startswith(PNG)
    assert "lower is better" in md and "one line per pruning method" in md and "1x = no speedup" in md
    assert "<figcaption>" in html and "<td>abc123</td>" in html and "2.50x" in md
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_report_without_baseline_or_benchmarks(tmp_path):
    write_report(ReportData(metrics={"sparse70": METRICS["sparse70"]}), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Accuracy recovery" not in md and "All metrics" in md
    assert not (tmp_path / "figures").exists()


def test_html_escapes_text(tmp_path):
    write_report(ReportData(title="<script>x</script>", run_info={"note": "a < b"}), tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "<script>" not in html and "a &lt; b" in html


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({"method": "m", "sparsity": 70, "ppl": 3.0}, "fraction"),
        ({"method": "m", "sparsity": 0.7, "ppl": float("nan")}, "positive finite"),
        ({"method": "m", "ppl": 3.0}, "missing"),
    ],
)
def test_invalid_curve(tmp_path, point, message):
    with pytest.raises(ValueError, match=message):
        write_report(ReportData(ppl_curve=[point]), tmp_path)


def test_recovery_table_from_stage_metrics(tmp_path):
    """The pipeline's recovery table: perplexity through the schedule from the stage metrics files,
    per task metric ÷ dense teacher, and the fine-tunes' held-out task loss."""
    from tasks.common import Layout, write_metrics
    from tasks.config import load_config
    from tasks.report import dvc_plots, recovery_markdown, recovery_table
    from tests.conftest import PARAMS

    cfg = load_config(PARAMS, overrides=[f"project.root={tmp_path}", "downstream.tasks=[docsum]"])
    layout = Layout.of(cfg)
    for stage, ppl in {
        "base": 100.0,
        "prune50": 104.0,
        "pretrain50": 101.0,
        "prune70": 130.0,
        "pretrain70": 110.0,
    }.items():
        write_metrics(layout.metrics(stage), {"ppl/val": ppl})
    for stage, loss in {
        "ft-dense-docsum": 2.0,
        "ft-sparse50-docsum": 2.05,
        "ft-sparse70-docsum": 2.2,
        "ft-baseline70-docsum": 2.4,
    }.items():
        write_metrics(layout.metrics(stage), {"train/val_loss": loss})
    evals = {
        "dense": {"docsum": {"rouge1": 0.40}},
        "sparse50": {"docsum": {"rouge1": 0.40}},
        "sparse70": {"docsum": {"rouge1": 0.38}},
        "sparse70-baseline": {"docsum": {"rouge1": 0.30}},
    }
    table = recovery_table(cfg, layout, {"50": 0.5, "70": 0.7}, evals)
    assert [(r["stage"], r["ppl_val"]) for r in table["perplexity"]] == [
        ("base", 100.0),
        ("prune50", 104.0),
        ("pretrain50", 101.0),
        ("prune70", 130.0),
        ("pretrain70", 110.0),
    ]
    row = table["tasks"]["docsum"]
    assert row["recovery"] == pytest.approx({"sparse50": 1.0, "sparse70": 0.95, "sparse70-baseline": 0.75})
    assert row["val_loss"] == {"dense": 2.0, "sparse50": 2.05, "sparse70": 2.2, "sparse70-baseline": 2.4}
    md = recovery_markdown(table)
    assert "| docsum | rouge1 | 0.4 | 0.4 (100.0%) | 0.38 (95.0%) | 0.3 (75.0%) |" in md
    assert "| docsum | val loss (lower is better) | 2 | 2.05 | 2.2 | 2.4 |" in md
    assert row["paired"] == {} and row["target_nll"]["dense"] is None  # no samples: no paired differences

    # With each fine-tune's per-document scores, the paired differences and their standard errors.
    per_doc = {
        "ft-dense-docsum": [0.4, 0.5, 0.3],
        "ft-sparse50-docsum": [0.4, 0.5, 0.3],
        "ft-sparse70-docsum": [0.3, 0.5, 0.3],
        "ft-baseline70-docsum": [0.2, 0.4, 0.2],
    }
    for model, values in per_doc.items():
        rows = [
            {"task": "docsum", "doc_id": i, "target": "t", "output": "o", "rouge1": v} for i, v in enumerate(values)
        ]
        rows.append({"task": "heldout", "doc_id": 0, "target": ""})
        (layout.reports / "eval").mkdir(parents=True, exist_ok=True)
        (layout.reports / "eval" / f"{model}.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paired = recovery_table(cfg, layout, {"50": 0.5, "70": 0.7}, evals)["tasks"]["docsum"]["paired"]["rouge1"]
    assert paired["sparse50 - dense"] == {"diff": 0.0, "se": 0.0}
    # sparse70 - dense: -0.1, 0, 0 -> mean -1/30, sample sd sqrt(((−1/15)² + 2(1/30)²)/2) = sqrt(1/300)
    assert paired["sparse70 - dense"] == {
        "diff": pytest.approx(-1 / 30),
        "se": pytest.approx((1 / 300) ** 0.5 / 3**0.5),
    }
    assert paired["sparse70 - sparse70-baseline"] == {"diff": pytest.approx(0.1), "se": pytest.approx(0.0, abs=1e-12)}
    md = recovery_markdown(recovery_table(cfg, layout, {"50": 0.5, "70": 0.7}, evals))
    assert "| docsum | rouge1 | sparse70 - dense | -0.0333 ± 0.0333 | -1.0 |" in md
    for variant, value in {"dense": 3.0, "sparse50": 3.1, "sparse70": 3.2, "sparse70-baseline": 3.5}.items():
        evals[variant]["docsum"]["target_nll"] = value
    md = recovery_markdown(recovery_table(cfg, layout, {"50": 0.5, "70": 0.7}, evals))
    assert "| docsum | test target NLL (lower is better) | 3 | 3.1 | 3.2 | 3.5 |" in md
    plots = dvc_plots(table, {"models": []}, {"sparse70_bf16": 9.0})
    assert plots["recovery"][-1] == {"model": "docsum sparse70-baseline", "recovery": pytest.approx(0.75)}
    assert plots["speedup"] == [{"variant": "sparse70_bf16", "speedup_vs_fp32": 9.0}]
