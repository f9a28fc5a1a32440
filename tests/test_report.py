"""The run report: markdown + HTML with figures, recovery numbers, captions, atomic files."""

from __future__ import annotations

import re

import pytest

from sparsify.report import ReportData, write_report

PNG = b"\x89PNG\r\n\x1a\n"
METRICS = {
    "dense": {"arithmetic": {"exact_match": 0.40}, "heldout": {"word_perplexity": 20.0}},
    "sparse50": {"arithmetic": {"exact_match": 0.36}, "heldout": {"word_perplexity": 22.0}},
    "sparse70": {"arithmetic": {"exact_match": 0.30}, "heldout": {"word_perplexity": 25.0}},
}
CURVE = [{"method": method, "sparsity": sparsity, "ppl": ppl}
         for method, points in {"sparsegpt": [(0.0, 20), (0.5, 22), (0.7, 30)],
                                "magnitude": [(0.0, 20), (0.5, 40), (0.7, 900)]}.items()
         for sparsity, ppl in points]


def test_full_report(tmp_path):
    data = ReportData(title="run 42", metrics=METRICS, ppl_curve=CURVE,
                      speedups={"sparse70": 2.5, "sparse70-int8": 5.1}, run_info={"git": "abc123"})
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


@pytest.mark.parametrize(("point", "message"), [
    ({"method": "m", "sparsity": 70, "ppl": 3.0}, "fraction"),
    ({"method": "m", "sparsity": 0.7, "ppl": float("nan")}, "positive finite"),
    ({"method": "m", "ppl": 3.0}, "missing"),
])
def test_invalid_curve(tmp_path, point, message):
    with pytest.raises(ValueError, match=message):
        write_report(ReportData(ppl_curve=[point]), tmp_path)
