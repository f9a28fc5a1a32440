"""Recovery arithmetic against hand-computed numbers, direction awareness, errors."""

from __future__ import annotations

import math

import pytest

from sparsify.evaluation.recovery import higher_is_better, paired_difference, primary_metric, recovery

DENSE = {
    "arithmetic": {"exact_match": 0.40},
    "docsum": {"rouge1": 0.50, "rouge2": 0.20, "rougeL": 0.45},
    "heldout": {"word_perplexity": 20.0, "bits_per_byte": 1.0},
}
SPARSE = {
    "arithmetic": {"exact_match": 0.30},
    "docsum": {"rouge1": 0.45, "rouge2": 0.25, "rougeL": 0.36},
    "heldout": {"word_perplexity": 25.0, "bits_per_byte": 1.25},
}


def test_recovery_matches_hand_computed_values():
    out = recovery(SPARSE, DENSE)
    expected = {
        "recovery/arithmetic": 0.75,  # 0.30 / 0.40
        "recovery/arithmetic/exact_match": 0.75,
        "recovery/docsum": 0.9,  # primary rouge1: 0.45 / 0.50
        "recovery/docsum/rouge1": 0.9,
        "recovery/docsum/rouge2": 1.25,  # better than dense
        "recovery/docsum/rougeL": 0.8,  # 0.36 / 0.45
        "recovery/heldout": 0.8,  # lower is better: 20 / 25
        "recovery/heldout/word_perplexity": 0.8,
        "recovery/heldout/bits_per_byte": 0.8,  # 1.0 / 1.25
        "recovery/mean": (0.75 + 0.9 + 0.8) / 3,
    }
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


def test_identical_runs_recover_fully():
    out = recovery(DENSE, DENSE)
    assert all(v == pytest.approx(1.0) for v in out.values())


def test_explicit_primary_metric():
    out = recovery(SPARSE, DENSE, primary={"docsum": "rougeL"})
    assert out["recovery/docsum"] == pytest.approx(0.8)
    assert out["recovery/mean"] == pytest.approx((0.75 + 0.8 + 0.8) / 3)


def test_direction():
    assert higher_is_better("exact_match") and higher_is_better("acc_norm") and higher_is_better("pass@1")
    assert not higher_is_better("word_perplexity") and not higher_is_better("bits_per_byte")
    assert not higher_is_better("ppl/val")


def test_primary_metric_for_standard_lm_eval_tasks():
    assert primary_metric("arc_challenge", {"acc", "acc_norm"}) == "acc_norm"
    gsm8k = {"exact_match_strict_match", "exact_match_flexible_extract"}
    assert primary_metric("gsm8k", gsm8k) == "exact_match_flexible_extract"
    assert primary_metric("custom", {"zeta", "alpha"}) == "alpha"


@pytest.mark.parametrize(
    ("sparse", "dense", "message"),
    [
        ({"arithmetic": {"exact_match": 0.3}}, {}, r"no dense result for \['arithmetic'\]"),
        ({}, {"arithmetic": {"exact_match": 0.3}}, r"no result for dense tasks \['arithmetic'\]"),
        ({}, {}, "no tasks"),
        (
            {"arithmetic": {"exact_match": 0.3}},
            {"arithmetic": {"exact_match": 0.0}},
            "arithmetic/exact_match: dense value is 0",
        ),
        ({"heldout": {"word_perplexity": 0.0}}, {"heldout": {"word_perplexity": 5.0}}, "sparse value is 0"),
        ({"heldout": {"word_perplexity": math.inf}}, {"heldout": {"word_perplexity": 5.0}}, "finite"),
        ({"arithmetic": {"exact_match": 0.3}}, {"arithmetic": {"acc": 0.3}}, "no metric reported by both runs"),
        ({"mean": {"acc": 0.3}}, {"mean": {"acc": 0.3}}, "collide"),
    ],
)
def test_errors(sparse, dense, message):
    with pytest.raises(ValueError, match=message):
        recovery(sparse, dense)


def test_missing_explicit_primary_metric():
    with pytest.raises(ValueError, match="primary metric 'rougeL' missing"):
        recovery({"docsum": {"rouge1": 0.3}}, {"docsum": {"rouge1": 0.3}}, primary={"docsum": "rougeL"})


def test_undefined_secondary_metric_is_skipped():
    dense = {"docsum": {"rouge1": 0.5, "rouge2": 0.0}}
    out = recovery({"docsum": {"rouge1": 0.25, "rouge2": 0.0}}, dense)
    assert out == {"recovery/docsum/rouge1": 0.5, "recovery/docsum": 0.5, "recovery/mean": 0.5}


def test_paired_difference_by_hand():
    # differences 1, 0, -1, 2: mean 0.5, sample variance (0.25+0.25+2.25+2.25)/3 = 5/3
    mean, se = paired_difference([1.0, 1.0, 0.0, 3.0], [0.0, 1.0, 1.0, 1.0])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(math.sqrt(5 / 3 / 4))
    # A constant shift has no noise: pairing removes the per-document spread entirely.
    assert paired_difference([0.9, 0.1, 0.5], [0.8, 0.0, 0.4]) == (pytest.approx(0.1), pytest.approx(0.0, abs=1e-12))


def test_paired_difference_errors():
    with pytest.raises(ValueError, match="same documents: 3 vs 2"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1], [1])
