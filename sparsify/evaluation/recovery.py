"""Accuracy recovery of a sparse (or quantized) model relative to its dense baseline.

Recovery is a fraction (1.0 = the dense model's score): ``sparse / dense`` for
higher-is-better metrics and ``dense / sparse`` for lower-is-better ones such
as perplexity, so > 1 always means "better than dense". Flat names, stable
across runs::

    recovery/<task>            the task's primary metric
    recovery/<task>/<metric>   every metric both runs report
    recovery/mean              mean of the primary recoveries over tasks
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from sparsify.data.downstream import METRICS, TASKS
from sparsify.errors import DataError

log = logging.getLogger(__name__)

TaskMetrics = Mapping[str, Mapping[str, float]]

#: Tie-break for tasks that are not built-in TaskSpecs (e.g. standard lm-eval tasks).
PRIMARY_PREFERENCE = (
    "exact_match",
    "pass@1",
    "acc_norm",
    "acc",
    "rougeL",
    "rouge1",
    "f1",
    "word_perplexity",
    "perplexity",
)
_LOWER_IS_BETTER_HINTS = ("perplexity", "bits_per_byte", "ppl", "loss", "nll")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric; names carry lm-eval filter suffixes (``exact_match_strict_match``)."""
    if metric in METRICS:
        return METRICS[metric].higher_is_better
    return not any(hint in metric for hint in _LOWER_IS_BETTER_HINTS)


def primary_metric(task: str, available: set[str] | frozenset[str]) -> str:
    """The metric ``recovery/<task>`` uses: the TaskSpec's primary, else by preference."""
    spec = TASKS.get(task)
    if spec is not None and spec.primary_metric in available:
        return spec.primary_metric
    for preferred in PRIMARY_PREFERENCE:
        if preferred in available:
            return preferred
    for preferred in PRIMARY_PREFERENCE:  # filtered variants, e.g. exact_match_flexible_extract
        variants = sorted(m for m in available if m.startswith(preferred + "_"))
        if variants:
            return variants[0]
    if not available:
        raise DataError(f"task {task!r}: no metric reported by both runs")
    return sorted(available)[0]


def primary_metrics(
    metrics: TaskMetrics, dense: TaskMetrics, *, primary: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``{task: primary metric}`` for the tasks of ``metrics``; it must be in both runs."""
    chosen = {}
    for task in sorted(metrics):
        common = set(metrics[task]) & set(dense.get(task, {}))
        main = (primary or {}).get(task) or primary_metric(task, common)
        if main not in common:
            raise DataError(
                f"task {task!r}: primary metric {main!r} missing (sparse has {sorted(metrics[task])}, "
                f"dense has {sorted(dense.get(task, {}))})"
            )
        chosen[task] = main
    return chosen


def metric_recovery(task: str, metric: str, value: float, dense: float) -> float:
    """Recovery of one metric; ValueError when it is undefined (non-finite, zero or negative)."""
    if not (math.isfinite(value) and math.isfinite(dense)):
        raise DataError(f"{task}/{metric}: values must be finite (sparse={value}, dense={dense})")
    numerator, denominator, which = (value, dense, "dense") if higher_is_better(metric) else (dense, value, "sparse")
    if denominator <= 0:
        raise DataError(f"{task}/{metric}: {which} value is {denominator}; recovery is undefined")
    return numerator / denominator


def recovery(metrics: TaskMetrics, dense: TaskMetrics, *, primary: Mapping[str, str] | None = None) -> dict[str, float]:
    """Per-task and mean recovery of ``metrics`` relative to ``dense``.

    Both must cover the same tasks. The primary metric of each task (from
    ``primary``, the task's TaskSpec, or ``PRIMARY_PREFERENCE``) must be
    computable, else ValueError; secondary metrics that are not (e.g. a dense
    ROUGE-2 of 0) are skipped with a warning.
    """
    missing_dense = sorted(set(metrics) - set(dense))
    missing_sparse = sorted(set(dense) - set(metrics))
    if missing_dense or missing_sparse:
        raise DataError(
            f"tasks differ: no dense result for {missing_dense}, no result for dense tasks {missing_sparse}"
        )
    if not metrics:
        raise DataError("no tasks to compute recovery for")
    if "mean" in metrics:
        raise DataError("a task named 'mean' would collide with recovery/mean")
    out: dict[str, float] = {}
    primaries = []
    for task, main in primary_metrics(metrics, dense, primary=primary).items():
        for metric in sorted(set(metrics[task]) & set(dense[task])):
            try:
                value = metric_recovery(task, metric, metrics[task][metric], dense[task][metric])
                out[f"recovery/{task}/{metric}"] = value
            except ValueError as err:
                if metric == main:
                    raise
                log.warning("skipping recovery of %s/%s: %s", task, metric, err)
        out[f"recovery/{task}"] = out[f"recovery/{task}/{main}"]
        primaries.append(out[f"recovery/{task}"])
    out["recovery/mean"] = sum(primaries) / len(primaries)
    return out


def recovery_where_defined(metrics: TaskMetrics, dense: TaskMetrics) -> tuple[dict[str, float], list[str]]:
    """Recovery over the tasks where it is defined; returns (recovery metrics, tasks left out).

    A task is left out when the dense run lacks it or scores 0 on its primary metric
    (a base model before fine-tuning scores 0 on generation tasks such as arithmetic),
    so one undefined task does not hide the recovery of the others.
    """
    usable, skipped = {}, []
    for task, ms in metrics.items():
        ref = dense.get(task, {})
        common = set(ms) & set(ref)
        if common and ref[primary_metric(task, common)] > 0:
            usable[task] = ms
        else:
            skipped.append(task)
    if skipped:
        log.info("recovery undefined (dense scores 0 or lacks the task) for: %s", ", ".join(sorted(skipped)))
    if not usable:
        return {}, skipped
    return recovery(usable, {t: dense[t] for t in usable}), skipped


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a[i] - b[i]`` over the same documents, and its standard error (the sample
    standard deviation of the differences over sqrt(n)). Pairing takes each document's own
    difficulty out of the noise, so two models scored on the same few hundred documents can be
    told apart by differences far smaller than either score's own standard error."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same documents: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        raise ValueError(f"a standard error needs at least 2 paired values, got {len(a)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = math.fsum(diffs) / len(diffs)
    var = math.fsum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))
