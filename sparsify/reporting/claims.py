"""The paper's headline claims, each against this run's own figure, its standard error and a verdict.

Agarwalla et al. (2024), abstract: sparse foundational Llama-2-7B models "achieve full accuracy
recovery for fine-tuning tasks at up to 70% sparsity"; "inference acceleration of up to 3x on CPUs"
(DeepSparse) "and 1.7x on GPUs" (nm-vllm) "via sparsity alone"; "a total speedup on CPUs for
sparse-quantized LLaMA models of up to 8.6x". Their comparison at 70% shows the sparse-pretrained
models ahead of pruning during fine-tuning (the baseline).

A verdict is one of:

* ``met``: the figure reaches the paper's within two standard errors, and the standard error is
  small enough to tell (``resolution``): a figure at the noise floor proves nothing either way;
* ``not met``: resolved, and short of the paper's by more than two standard errors;
* ``inconclusive``: the standard error is too large to decide (e.g. tasks scored on too few
  documents, or a model that scores near zero);
* ``not measured``: this run has no figure for it (e.g. no GPU).

A speed figure without a recorded spread (the layer benchmark's medians) is judged on its point
estimate and shown without ± .

Everything here is a pure function of the report's tables, so the verdicts are tested on
hand-made tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sparsify.evaluation.recovery import higher_is_better

Verdict = Literal["met", "not met", "inconclusive", "not measured"]


@dataclasses.dataclass(frozen=True)
class Claim:
    claim: str  # the paper's statement, short
    paper: str  # the paper's figure, as it prints it
    target: float  # that figure as a number in ``unit`` (1.0 = 100% recovery, 3.0 = 3x)
    unit: Literal["%", "x"]
    ours: float | None
    se: float | None
    verdict: Verdict
    basis: str  # what our figure is, and how it was measured

    def ours_text(self) -> str:
        if self.ours is None:
            return "n/a"
        if self.unit == "%":
            text = f"{100 * self.ours:.1f}%"
            return text if self.se is None else f"{text} ± {100 * self.se:.1f}"
        text = f"{self.ours:.2f}x"
        return text if self.se is None else f"{text} ± {self.se:.2f}"


def verdict(value: float | None, se: float | None, target: float, resolution: float) -> Verdict:
    """Reaching ``target``: see the module docstring. Without a standard error (``se`` None: a figure
    that is a median of interleaved repeats with no spread recorded) the point estimate decides."""
    if value is None or not math.isfinite(value):
        return "not measured"
    if se is None:
        return "met" if value >= target else "not met"
    if not math.isfinite(se) or se > resolution:
        return "inconclusive"
    return "met" if value + 2 * se >= target else "not met"


def ahead_verdict(value: float | None, se: float | None, resolution: float) -> Verdict:
    """Being *ahead* (value > 0): met only when more than two standard errors above zero."""
    if value is None or se is None or not math.isfinite(value):
        return "not measured"
    if value - 2 * se > 0:
        return "met"
    return "inconclusive" if not math.isfinite(se) or se > resolution else "not met"


def mean_recovery(
    tasks: Mapping[str, Mapping[str, Any]], column: str, reference: str = "dense"
) -> tuple[float | None, float | None]:
    """Mean over tasks of ``column``'s primary metric ÷ ``reference``'s (the report's recovery), and its
    standard error from the paired differences on the same test documents.

    Per task, recovery r = s/d (higher is better) or d/s; with the paired difference s − d known to
    ± σ and d held fixed, σ_r = σ/d (or d·σ/s²) by the delta method. Tasks are independent, so the
    mean's SE is sqrt(Σσ_r²)/T. None when a task lacks the figure or its paired SE.
    """
    recoveries, variances = [], []
    for row in tasks.values():
        metric = row["metric"]
        s, d = row["values"].get(column), row["values"].get(reference)
        pair = row.get("paired", {}).get(metric, {}).get(f"{column} - {reference}")
        if s is None or d is None or pair is None:
            return None, None
        if higher_is_better(metric):
            if d <= 0:
                return None, None
            r, dr_ds = s / d, 1 / d
        else:
            if s <= 0:
                return None, None
            r, dr_ds = d / s, d / s**2
        recoveries.append(r)
        variances.append((dr_ds * pair["se"]) ** 2)
    if not recoveries:
        return None, None
    return sum(recoveries) / len(recoveries), math.sqrt(sum(variances)) / len(recoveries)


def mean_paired(tasks: Mapping[str, Mapping[str, Any]], pair: str) -> tuple[float | None, float | None, float]:
    """Mean over tasks of the paired difference ``pair`` (e.g. ``sparse70 - sparse70-baseline``) on each
    task's primary metric, its SE, and the mean dense score (the scale the difference is read against)."""
    diffs, variances, dense = [], [], []
    for row in tasks.values():
        found = row.get("paired", {}).get(row["metric"], {}).get(pair)
        if found is None:
            return None, None, float("nan")
        sign = 1 if higher_is_better(row["metric"]) else -1
        diffs.append(sign * found["diff"])
        variances.append(found["se"] ** 2)
        dense.append(row["values"].get("dense") or 0.0)
    if not diffs:
        return None, None, float("nan")
    return sum(diffs) / len(diffs), math.sqrt(sum(variances)) / len(diffs), sum(dense) / len(dense)


def _machine_text(machine: Mapping[str, Any]) -> str:
    """The CPU's extensions, the kernel path the figure ran on, and any ISA caps: a capped AVX-512
    machine measures the AVX2 class, and the flags alone would not say so."""
    text = machine.get("cpu_isa", "unknown ISA")
    if machine.get("kernels"):
        text += f"; kernels {machine['kernels']}"
    if machine.get("isa_caps"):
        text += "; capped " + " ".join(f"{k}={v}" for k, v in sorted(machine["isa_caps"].items()))
    return text


def _decode_speedup(bench: Mapping[str, Any], variant: str) -> tuple[float | None, float | None, str]:
    """``variant``'s speedup over dense fp32: decode tokens/s when the run has the decode benchmark, else
    the batch-1 11008x4096 layer (an MLP projection of Llama-2-7B)."""
    isa = _machine_text(bench.get("machine", {}))
    decode = bench.get("decode", {}).get("variants", {})
    if variant in decode and "speedup_vs_fp32" in decode[variant]:
        row = decode[variant]
        what = f"decode tokens/s of a random {bench['decode'].get('layers', '?')}-layer Llama-2-7B-shaped model"
        return row["speedup_vs_fp32"], row.get("speedup_vs_fp32_se"), f"{what} over dense fp32, CPU {isa}"
    layer_variant = variant.removesuffix("_head")
    for row in bench.get("layers", {}).get("rows", []):
        if row["variant"] == layer_variant and row["shape"] == "11008x4096" and row["batch"] == 1:
            return (
                row.get("speedup_vs_fp32"),
                None,
                f"one 11008x4096 layer at batch 1 over dense fp32 (no decode benchmark in this run), CPU {isa}",
            )
    return None, None, "no CPU benchmark in this run"


def _gpu_speedup(bench: Mapping[str, Any]) -> tuple[float | None, float | None, str]:
    rows = [r for r in bench.get("gpu", []) if r.get("variant") == "sparse24_fp16" and "speedup_vs_fp16" in r]
    if not rows:
        return None, None, "no GPU in this run"
    best = max(rows, key=lambda r: r["speedup_vs_fp16"])
    return (
        best["speedup_vs_fp16"],
        None,
        f"2:4 fp16 over dense fp16, layer {best['shape']} at batch {best['batch']} (the largest speedup measured)",
    )


def _at_floor(tasks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Tasks whose dense model scores 0 on a higher-is-better primary metric: recovery there is undefined and a
    difference says nothing, so the accuracy claims are inconclusive rather than unmeasured."""
    return sorted(
        t
        for t, row in tasks.items()
        if row["values"].get("dense") is not None and row["values"]["dense"] <= 0 and higher_is_better(row["metric"])
    )


def paper_claims(
    tasks: Mapping[str, Mapping[str, Any]], levels: Sequence[str], bench: Mapping[str, Any]
) -> list[Claim]:
    """The claims, in the paper's order, from the report's recovery table's ``tasks`` (with paired
    differences), the sparsity levels (``["50", "70"]``) and the CPU benchmark's JSON (may be empty)."""
    floor = _at_floor(tasks)
    floor_note = f"; the dense model scores 0 on {', '.join(floor)} (noise floor): undefined" if floor else ""

    def accuracy(claim: Claim) -> Claim:
        """A task-accuracy claim with no figure is inconclusive, not unmeasured, when tasks sit at the noise floor."""
        if floor and claim.verdict == "not measured":
            return dataclasses.replace(claim, verdict="inconclusive", basis=claim.basis + floor_note)
        return claim

    claims = []
    for lv in levels:
        value, se = mean_recovery(tasks, f"sparse{lv}")
        claims.append(
            accuracy(
                Claim(
                    claim=f"Fine-tuned {lv}% sparse models recover the dense model's accuracy",
                    paper="full (100%)",
                    target=1.0,
                    unit="%",
                    ours=value,
                    se=se,
                    verdict=verdict(value, se, 1.0, resolution=0.05),
                    basis=f"mean over {len(tasks)} tasks of sparse{lv} ÷ dense teacher on the primary metric; SE "
                    "from paired differences on the same test documents (resolved when SE ≤ 5 points)",
                )
            )
        )
    top = levels[-1]
    diff, se, dense = mean_paired(tasks, f"sparse{top} - sparse{top}-baseline")
    scale = abs(dense) if dense and math.isfinite(dense) else None
    ahead = None if diff is None or scale is None else diff / scale
    ahead_se = None if se is None or scale is None else se / scale
    claims.append(
        accuracy(
            Claim(
                claim=f"At {top}%, sparse pretraining beats pruning during fine-tuning",
                paper="ahead of the baseline",
                target=0.0,
                unit="%",
                ours=ahead,
                se=ahead_se,
                verdict=ahead_verdict(ahead, ahead_se, resolution=0.05),
                basis=f"mean paired difference sparse{top} − baseline on the primary metric, in % of the dense "
                "score; met only when above zero by more than 2 SE",
            )
        )
    )
    # Speed claims: met when the figure reaches the paper's; resolved when its SE is within 10% of the target.
    for text, paper, target, (value, se, basis) in (
        ("CPU inference speedup from sparsity alone (70%)", "up to 3x", 3.0, _decode_speedup(bench, "sparse70_bf16")),
        (
            "CPU speedup of sparse-quantized (70% + INT8)",
            "up to 8.6x",
            8.6,
            _decode_speedup(bench, "sparse70_int8_head"),
        ),
        ("GPU inference speedup from sparsity alone", "up to 1.7x", 1.7, _gpu_speedup(bench)),
    ):
        claims.append(
            Claim(
                claim=text,
                paper=paper,
                target=target,
                unit="x",
                ours=value,
                se=se,
                verdict=verdict(value, se, target, resolution=0.1 * target),
                basis=basis,
            )
        )
    return claims
