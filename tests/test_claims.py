"""The paper's claims against a run: closed-form standard errors and every verdict, on hand-made tables."""

from __future__ import annotations

import math

import pytest

from sparsify.reporting.claims import ahead_verdict, mean_paired, mean_recovery, paper_claims, verdict
from sparsify.reporting.report import ReportData, write_report


def task(metric: str, values: dict[str, float], paired: dict[str, tuple[float, float]]) -> dict:
    return {
        "metric": metric,
        "values": values,
        "paired": {metric: {pair: {"diff": d, "se": se} for pair, (d, se) in paired.items()}},
    }


TASKS = {
    "arith": task(
        "exact_match",
        {"dense": 0.5, "sparse70": 0.45, "sparse70-baseline": 0.30},
        {"sparse70 - dense": (-0.05, 0.02), "sparse70 - sparse70-baseline": (0.15, 0.03)},
    ),
    "code": task(
        "pass@1",
        {"dense": 0.4, "sparse70": 0.44, "sparse70-baseline": 0.36},
        {"sparse70 - dense": (0.04, 0.01), "sparse70 - sparse70-baseline": (0.08, 0.02)},
    ),
}


def test_mean_recovery_and_its_standard_error_in_closed_form():
    value, se = mean_recovery(TASKS, "sparse70")
    assert value == pytest.approx((0.45 / 0.5 + 0.44 / 0.4) / 2)
    assert se == pytest.approx(math.sqrt((0.02 / 0.5) ** 2 + (0.01 / 0.4) ** 2) / 2)


def test_lower_is_better_metrics_invert_the_ratio_and_its_derivative():
    tasks = {"ppl": task("perplexity", {"dense": 10.0, "sparse50": 12.5}, {"sparse50 - dense": (2.5, 0.5)})}
    value, se = mean_recovery(tasks, "sparse50")
    assert value == pytest.approx(10 / 12.5)
    assert se == pytest.approx(10 / 12.5**2 * 0.5)
    # For a lower-is-better metric "ahead" means a negative difference.
    diff, diff_se, dense = mean_paired(tasks, "sparse50 - dense")
    assert (diff, diff_se, dense) == (pytest.approx(-2.5), pytest.approx(0.5), 10.0)


def test_a_missing_pair_or_a_zero_dense_score_gives_no_figure():
    assert mean_recovery(TASKS, "sparse50") == (None, None)
    zero = {"t": task("exact_match", {"dense": 0.0, "sparse70": 0.0}, {"sparse70 - dense": (0.0, 0.0)})}
    assert mean_recovery(zero, "sparse70") == (None, None)


@pytest.mark.parametrize(
    ("value", "se", "expected"),
    [
        (None, None, "not measured"),
        (float("nan"), 0.01, "not measured"),
        (0.97, 0.01, "met"),  # within two standard errors of the target (0.99)
        (0.96, 0.01, "not met"),
        (0.50, 0.20, "inconclusive"),  # far below, but the SE is beyond the resolution
        (1.2, None, "met"),
        (0.8, None, "not met"),  # point estimates (no spread recorded)
    ],
)
def test_verdict_rules(value, se, expected):
    assert verdict(value, se, 0.99, resolution=0.05) == expected


@pytest.mark.parametrize(
    ("value", "se", "expected"),
    [
        (0.1, 0.02, "met"),
        (0.03, 0.02, "not met"),
        (0.03, 0.2, "inconclusive"),
        (-0.2, 0.01, "not met"),
        (None, None, "not measured"),
    ],
)
def test_ahead_verdict_needs_two_standard_errors_above_zero(value, se, expected):
    assert ahead_verdict(value, se, resolution=0.05) == expected


def test_paper_claims_from_tables_and_benchmarks():
    bench = {
        "machine": {"cpu_isa": "avx512"},
        "decode": {
            "layers": 2,
            "variants": {
                "sparse70_bf16": {"speedup_vs_fp32": 3.8, "speedup_vs_fp32_se": 0.1},
                "sparse70_int8_head": {"speedup_vs_fp32": 8.0, "speedup_vs_fp32_se": 0.1},
            },
        },
    }
    claims = {c.claim: c for c in paper_claims(TASKS, ["70"], bench)}
    rec = claims["Fine-tuned 70% sparse models recover the dense model's accuracy"]
    assert rec.verdict == "met" and rec.ours == pytest.approx(1.0) and rec.ours_text().startswith("100.0% ± ")
    ahead = claims["At 70%, sparse pretraining beats pruning during fine-tuning"]
    # Mean paired difference (0.15 + 0.08) / 2 over the mean dense score 0.45, SE sqrt(.03² + .02²)/2 / 0.45.
    assert ahead.ours == pytest.approx(0.115 / 0.45) and ahead.se == pytest.approx(math.hypot(0.03, 0.02) / 2 / 0.45)
    assert ahead.verdict == "met"
    cpu = claims["CPU inference speedup from sparsity alone (70%)"]
    assert (cpu.ours, cpu.verdict, cpu.ours_text()) == (3.8, "met", "3.80x ± 0.10") and "avx512" in cpu.basis
    assert claims["CPU speedup of sparse-quantized (70% + INT8)"].verdict == "not met"  # 8.0 + 0.2 < 8.6
    assert claims["GPU inference speedup from sparsity alone"].verdict == "not measured"


def test_layer_rows_stand_in_when_the_run_has_no_decode_benchmark():
    bench = {
        "machine": {"cpu_isa": "avx2 avx512f", "kernels": "avx2", "isa_caps": {"ATEN_CPU_CAPABILITY": "avx2"}},
        "layers": {
            "rows": [
                {"variant": "sparse70_bf16", "shape": "11008x4096", "batch": 1, "speedup_vs_fp32": 4.9},
                {"variant": "sparse70_int8", "shape": "11008x4096", "batch": 1, "speedup_vs_fp32": 5.1},
                {"variant": "sparse70_bf16", "shape": "11008x4096", "batch": 16, "speedup_vs_fp32": 1.2},
            ]
        },
        "gpu": [{"variant": "sparse24_fp16", "shape": "11008x4096", "batch": 16, "speedup_vs_fp16": 1.3}],
    }
    claims = paper_claims(TASKS, ["70"], bench)
    cpu, quant, gpu = claims[-3:]
    assert (cpu.ours, cpu.se, cpu.verdict) == (4.9, None, "met") and "one 11008x4096 layer" in cpu.basis
    assert cpu.basis.endswith("CPU avx2 avx512f; kernels avx2; capped ATEN_CPU_CAPABILITY=avx2")
    assert (quant.ours, quant.verdict) == (5.1, "not met")
    assert (gpu.ours, gpu.verdict) == (1.3, "not met") and "batch 16" in gpu.basis


def test_claims_come_first_in_the_report(tmp_path):
    claims = paper_claims(TASKS, ["70"], {})
    md = write_report(ReportData(claims=claims, run_info={"git commit": "abc"}), tmp_path).read_text()
    assert md.index("The paper's claims") < md.index("git commit")
    assert "**not measured**" in md and "full (100%)" in md
    assert "The paper&#x27;s claims" in (tmp_path / "report.html").read_text()


def test_accuracy_claims_at_the_noise_floor_are_inconclusive_not_unmeasured():
    floor = {
        "arith": task(
            "exact_match",
            {"dense": 0.0, "sparse70": 0.0, "sparse70-baseline": 0.0},
            {"sparse70 - dense": (0.0, 0.0), "sparse70 - sparse70-baseline": (0.0, 0.0)},
        )
    }
    claims = paper_claims(floor, ["70"], {})
    assert [c.verdict for c in claims[:2]] == ["inconclusive", "inconclusive"]
    assert "scores 0 on arith" in claims[0].basis
    missing = {"arith": task("exact_match", {"dense": 0.5}, {})}  # no fine-tuned model scored: not measured
    assert [c.verdict for c in paper_claims(missing, ["70"], {})[:2]] == ["not measured", "not measured"]
