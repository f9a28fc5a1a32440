"""One-layer pruning algorithms: SparseGPT, Wanda, magnitude, ADMM; mask refinement; OWL layer-wise sparsities.

Notation and conventions
------------------------
* ``W`` is a Linear weight ``[out, in]``; ``X`` its calibration inputs ``[in, n]`` (n tokens).
* ``H = 2 X Xᵀ / n`` is the Hessian of the layer-wise reconstruction loss ‖WX − ŴX‖²
  (up to the 1/n), accumulated by the caller as a running average over mini-batches.
* A mask is bool ``[out, in]``, True = kept. Every function returns ``(W_new, mask)`` with
  ``W_new`` exactly zero where the mask is False.
* ``nm=(N, M)`` ("2:4") means N weights are *kept* in every group of M consecutive
  input weights of a row (NVIDIA's convention; SparseGPT's ``prunen:prunem`` counts
  the pruned ones — the two agree for 2:4 and 4:8). The layer sparsity is then fixed
  at 1 − N/M and ``sparsity`` must equal it, so a config cannot silently mean two things.
* ``keep_mask`` (iterative pruning): weights it prunes (False) stay pruned — the new mask
  is a subset of it — and the rest of the budget goes to the best remaining weights.
* Unstructured sparsity is exact: a layer prunes ``round(sparsity · numel)`` weights
  (unless ``keep_mask`` already prunes more: old zeros always stay zero).

All methods share the mask selection helpers below; magnitude, Wanda and SparseGPT differ
only in the score (|W|, |W|·‖X_j‖, or SparseGPT's w²/[H⁻¹]_jj) and in whether weights are
updated. ``admm`` (after ALPS, Meng et al. 2024) starts from SparseGPT's result and searches
the pattern for a lower reconstruction loss with ADMM, then re-fits the kept weights by CG;
the optional refinement pass (after DSnoT, Zhang et al. 2024) swaps kept and pruned weights
within rows. Both minimise SparseGPT's damped loss on the same H and keep a layer's result
only where it lowers :func:`reconstruction_error`.

Cost (admm, on top of SparseGPT's): one Cholesky factorisation of an in×in matrix per
penalty value (``admm_iterations / 3``), per iteration one Cholesky solve with ``out``
right-hand sides and a layer-wide top-k, per CG step one out×in×in product; with the
defaults (30 + 10) about 45 products of 2·out·in² flops, i.e. ~90·out·in² against
SparseGPT's ~2·out·in² plus its column loop. Measured on a 2048×5504 Linear (2 Zen 4
cores): 53 s against SparseGPT's 3.4 s. Refinement: per round, for each of 8 candidates,
a gather of H' rows and a few element-wise passes over the layer — memory-bound, ~50 s
for 50 rounds on that Linear (docs/prune_admm.md).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from sparsify.config import Section

log = logging.getLogger(__name__)

NM = tuple[int, int]

_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_CHOLESKY_RETRIES = 6  # dampening grows 10x per retry: up to 1e6x the configured value


# --------------------------------------------------------------------------- configuration


def parse_structure(structure: str) -> NM | None:
    """``"unstructured"`` → None, ``"2:4"`` → (2, 4); ValueError for anything else."""
    if structure == "unstructured":
        return None
    match = _NM_PATTERN.match(structure)
    if match is None:
        raise ValueError(f"structure must be 'unstructured' or 'N:M' such as '2:4', got {structure!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"structure {structure!r}: N:M keeps N of every M weights, so it needs 0 < N < M")
    return n, m


def check_ignore_patterns(patterns: list[str]) -> list[str]:
    """``patterns`` unchanged after checking that every ``re:`` pattern compiles (shared by config sections)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"ignore pattern {pattern!r} is not a valid regular expression: {err}") from err
    return patterns


class PruneConfig(Section):
    """Options of one pruning run; this is the ``prune`` section of params.yaml."""

    method: Literal["sparsegpt", "wanda", "magnitude", "admm"] = "admm"  # params.yaml says why
    sparsity: float = 0.5  # fraction of zeros per layer, in [0, 1)
    # "unstructured", or "N:M": N weights kept in every M consecutive input weights (then sparsity = 1 - N/M)
    structure: str = "unstructured"
    block_size: int = Field(default=128, gt=0)  # SparseGPT: columns per lazy-update block (a multiple of M)
    dampening: float = Field(default=0.01, gt=0)  # SparseGPT: fraction of mean(diag H) added to diag H
    num_samples: int = Field(default=128, gt=0)  # calibration sequences
    seq_len: int = Field(default=256, gt=0)  # tokens per calibration sequence
    ignore: list[str] = []  # module-name patterns left dense: globs, or "re:<regex>"
    owl: bool = False  # outlier-weighted layer-wise sparsity (unstructured only)
    owl_lambda: float = Field(default=0.08, ge=0)  # per-layer sparsity stays within sparsity ± owl_lambda
    owl_threshold: float = Field(default=5.0, gt=0)  # outlier: Wanda score > owl_threshold × the layer mean
    # admm: ADMM steps from SparseGPT's result; penalty ρ (for the unit-diagonal Hessian) and its growth factor
    admm_iterations: int = Field(default=30, ge=0)
    admm_rho: float = Field(default=0.1, gt=0)
    admm_rho_growth: float = Field(default=1.5, ge=1)
    cg_iterations: int = Field(default=10, ge=0)  # admm and refine: CG steps re-fitting the kept weights
    refine: bool = False  # DSnoT-style swaps of pruned and kept weights within rows, after any method
    refine_iterations: int = Field(default=50, ge=0)  # refine: at most this many swaps per row
    # The weights' dtype while calibrating (the prune stage loads the model in it): bfloat16 halves the
    # model's memory and, where the device has native bf16, the forward time; Hessians and the SparseGPT
    # sweep stay fp32 either way. "auto": bfloat16 where native (sparsify.model.bf16_supported), else float32.
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v: float) -> float:
        if not (0.0 <= v < 1.0 and math.isfinite(v)):
            raise ValueError(f"sparsity must be in [0, 1) (0.5 = half the weights zero), got {v}")
        return v

    @field_validator("structure")
    @classmethod
    def _structure_format(cls, v: str) -> str:
        parse_structure(v)
        return v

    @field_validator("ignore")
    @classmethod
    def _ignore_patterns(cls, v: list[str]) -> list[str]:
        return check_ignore_patterns(v)

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        nm = self.nm
        if nm is not None:
            n, m = nm
            if not math.isclose(self.sparsity, 1 - n / m, abs_tol=1e-9):
                raise ValueError(
                    f"structure {self.structure!r} keeps {n} of {m} weights, i.e. sparsity {1 - n / m:g}, "
                    f"but sparsity is {self.sparsity:g}: set sparsity to {1 - n / m:g} or structure to 'unstructured'"
                )
            if self.block_size % m:
                raise ValueError(
                    f"block_size ({self.block_size}) must be a multiple of M={m} (structure {self.structure!r})"
                )
            if self.owl:
                raise ValueError("owl sets a different sparsity per layer: it needs structure 'unstructured'")
        if self.owl:
            lo, hi = self.sparsity - self.owl_lambda, self.sparsity + self.owl_lambda
            if lo < 0 or hi >= 1:
                raise ValueError(
                    f"owl: sparsity ± owl_lambda = [{lo:g}, {hi:g}] must lie within [0, 1); lower owl_lambda"
                )
        return self

    @property
    def nm(self) -> NM | None:
        return parse_structure(self.structure)


def _check_args(W: Tensor, sparsity: float, nm: NM | None, keep_mask: Tensor | None) -> None:
    """Shared argument validation of the per-layer functions (the config may be bypassed)."""
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor [out, in], got {tuple(W.shape)} {W.dtype}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not torch.isfinite(W).all():
        raise ValueError("weight has nan/inf entries")
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        if W.shape[1] % m:
            raise ValueError(f"N:M with M={m} needs the input width to be a multiple of M, got {W.shape[1]}")
        if not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
            raise ValueError(f"{n}:{m} means sparsity {1 - n / m:g}, got sparsity={sparsity:g}")
    if keep_mask is not None and (keep_mask.shape != W.shape or keep_mask.dtype != torch.bool):
        raise ValueError(f"keep_mask must be bool {tuple(W.shape)}, got {keep_mask.dtype} {tuple(keep_mask.shape)}")


# --------------------------------------------------------------------------- mask selection (shared)


def _prune_lowest(scores: Tensor, n_prune: Tensor, keep: Tensor | None) -> Tensor:
    """Keep-mask for ``scores`` [G, S] pruning the ``n_prune[g]`` lowest entries of each row g.

    Entries that ``keep`` already prunes rank below every score, so they are pruned first;
    callers request ``n_prune`` ≥ their count. Ties break by position (the first ones are
    pruned), which makes the result deterministic: it is the mask a stable sort gives.

    No full sort: a row's k-th smallest score t (k = n_prune) splits it; everything below t
    is pruned, and of the entries equal to t the first ``k − #below`` by position. With one
    k for all rows (SparseGPT's per-block quota, N:M) t comes from a selection (kthvalue,
    linear time); SparseGPT calls this per block on up to 11008 × 128 scores, where a sort
    took 80 ms a call (1/10 of a 7B-shaped layer's pruning time).
    """
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    n_prune = n_prune.to(scores.device)
    k = n_prune.clamp(min=1)[:, None]  # rows with k = 0 prune nothing (handled by `need` = 0 below)
    if bool((n_prune == n_prune[0]).all()):
        threshold = torch.kthvalue(scores, int(k[0]), dim=1, keepdim=True).values
    else:
        threshold = torch.sort(scores, dim=1).values.gather(1, k - 1)
    below = scores < threshold
    need = (n_prune[:, None] - below.sum(1, keepdim=True)).clamp(min=0)
    ties = scores == threshold
    return ~(below | (ties & (torch.cumsum(ties, dim=1) <= need)))


def _allocate_prune_counts(sizes: Tensor, forced: Tensor, sparsity: float) -> Tensor:
    """How many entries each group (row, block, ...) prunes so the layer is exactly on target.

    Group g of ``sizes[g]`` entries gets its share of ``round(sparsity · Σ sizes)`` by
    cumulative rounding (shares differ by at most one from ``sparsity · size`` and sum
    exactly to the total). Each share is then raised to ``forced[g]`` (entries already
    pruned that must stay pruned), and the excess this creates is taken back from groups
    that have room, proportionally to their room. If the forced entries alone exceed the
    total, every group prunes just its forced entries (the layer ends above target).
    """
    sizes, forced = sizes.long().cpu(), forced.long().cpu()
    ideal = torch.round(torch.cumsum(sizes, 0).double() * sparsity).long()
    counts = torch.maximum(torch.diff(ideal, prepend=ideal.new_zeros(1)), forced)
    excess = int(counts.sum()) - int(ideal[-1])
    if excess <= 0:
        return counts
    room = counts - forced
    total_room = int(room.sum())
    if total_room <= excess:
        log.warning(
            "keep_mask already prunes %d of %d weights, more than the target %.3f: keeping the old zeros only",
            int(forced.sum()),
            int(sizes.sum()),
            sparsity,
        )
        return forced
    take = room * excess // total_room  # floor of each group's proportional part ...
    left = room - take
    rest = excess - int(take.sum())  # ... and the remainder (< #groups with room), one each, to the roomiest
    take[torch.argsort(left, descending=True, stable=True)[:rest]] += 1
    return counts - take


def _nm_mask(scores: Tensor, nm: NM, keep: Tensor | None) -> Tensor:
    """Keep-mask with the N best of every M consecutive entries of each row of ``scores``."""
    n, m = nm
    groups = scores.reshape(-1, m)
    group_keep = None if keep is None else keep.reshape(-1, m)
    # Built on the scores' device: SparseGPT calls this every M columns, so no host round trips.
    n_prune = torch.full((groups.shape[0],), m - n, dtype=torch.long, device=scores.device)
    if group_keep is not None:  # a group that already has more zeros keeps them (still ≤ N nonzeros)
        n_prune = torch.maximum(n_prune, (~group_keep).sum(1))
    return _prune_lowest(groups, n_prune, group_keep).reshape(scores.shape)


def _unstructured_mask(scores: Tensor, sparsity: float, keep: Tensor | None, *, per_row: bool) -> Tensor:
    """Keep-mask pruning the lowest scores, compared within each row or across the whole layer."""
    groups = scores if per_row else scores.reshape(1, -1)
    group_keep = None if keep is None else keep.reshape(groups.shape)
    sizes = torch.full((groups.shape[0],), groups.shape[1], dtype=torch.long)
    forced = torch.zeros_like(sizes) if group_keep is None else (~group_keep).sum(1).cpu()
    n_prune = _allocate_prune_counts(sizes, forced, sparsity)
    return _prune_lowest(groups, n_prune, group_keep).reshape(scores.shape)


def _select_mask(scores: Tensor, sparsity: float, nm: NM | None, keep: Tensor | None, *, per_row: bool) -> Tensor:
    if nm is not None:
        return _nm_mask(scores, nm, keep)
    return _unstructured_mask(scores, sparsity, keep, per_row=per_row)


# --------------------------------------------------------------------------- magnitude and Wanda


def magnitude_prune(
    W: Tensor, sparsity: float, *, nm: NM | None = None, keep_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Prune the smallest |w| of the layer (compared across the whole layer, or per N:M group)."""
    _check_args(W, sparsity, nm, keep_mask)
    mask = _select_mask(W.abs(), sparsity, nm, keep_mask, per_row=False)
    return W.masked_fill(~mask, 0), mask


def wanda_scores(W: Tensor, x_norm_sq: Tensor) -> Tensor:
    """Wanda's importance |W_ij| · ‖X_j‖: a weight matters as much as the inputs it multiplies."""
    return W.abs().float() * x_norm_sq.float().clamp_min(0).sqrt()[None, :]


def wanda_prune(
    W: Tensor, x_norm_sq: Tensor, sparsity: float, *, nm: NM | None = None, keep_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Wanda (Sun et al. 2024): prune the lowest |W|·‖X_j‖, compared within each output row.

    ``x_norm_sq[j] = Σ_tokens x_j²``; any positive multiple works (e.g. ``diag(H)``), since
    only the ranking within a row matters. Per-row comparison is what the paper found
    best for LLMs; per-row counts differ by at most one so the layer total is exact.
    """
    _check_args(W, sparsity, nm, keep_mask)
    if x_norm_sq.shape != (W.shape[1],):
        raise ValueError(f"x_norm_sq must have shape ({W.shape[1]},), got {tuple(x_norm_sq.shape)}")
    mask = _select_mask(wanda_scores(W, x_norm_sq), sparsity, nm, keep_mask, per_row=True)
    return W.masked_fill(~mask, 0), mask


# --------------------------------------------------------------------------- SparseGPT


class LinearPruneResult(NamedTuple):
    weight: Tensor
    mask: Tensor
    cholesky_retries: int
    error: float  # relative output error on the calibration inputs (reconstruction_error)


def _compute_dtype(W: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 weights (the OBS updates need the mantissa); fp64 kept for exact tests."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _inverse_hessian_cholesky(H: Tensor, dampening: float) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = dampening · mean(diag H); λ; and the retry count.

    Why U: eliminating input columns in order 0, 1, ..., row i of U holds, for the columns
    still present, ``[H_F⁻¹]_ii = U_ii²`` and the OBS compensation direction
    ``H_F⁻¹[i, i:] / [H_F⁻¹]_ii = U[i, i:] / U_ii`` — one factorisation replaces the
    sequence of shrinking inverses. A failed factorisation (H numerically not positive
    definite, e.g. few samples) retries with 10× the dampening.
    """
    mean_diag = H.diagonal().mean()
    for attempt in range(_CHOLESKY_RETRIES + 1):
        damp = dampening * 10**attempt
        # One in×in buffer besides H (for a 7B down_proj each is 0.5 GB in fp32): λ goes onto
        # H's own diagonal for the factorisation and the diagonal is restored exactly after
        # (the values of H + λI without a copy or I); then (LLᵀ)⁻¹ and U overwrite L in place.
        # L comes back column-major (LAPACK's layout) and the in-place steps keep it, so U has
        # the values and layout of the out-of-place calls: a row-major U changes the sweep's
        # rounding, and with it the masks.
        diagonal = H.diagonal().clone()
        H.diagonal().add_(damp * mean_diag)
        try:
            factor, info = torch.linalg.cholesky_ex(H)
        finally:
            H.diagonal().copy_(diagonal)
        if info == 0:
            torch.cholesky_inverse(factor, out=factor)
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if info == 0:
                return factor, float(damp * mean_diag), attempt
        if attempt < _CHOLESKY_RETRIES:
            log.warning("Cholesky failed with dampening %.3g; retrying with %.3g", damp, damp * 10)
    raise RuntimeError(
        f"the Hessian is not positive definite even with dampening {dampening * 10**_CHOLESKY_RETRIES:.3g}: "
        "check the calibration activations"
    )


class _Prepared(NamedTuple):
    work: Tensor  # W in the compute dtype, dead input columns zeroed: the sweep's start (updated in place)
    upper: Tensor  # U, upper Cholesky factor of (H + λI)⁻¹
    damping: float  # λ
    retries: int  # Cholesky retries (more dampening)
    dead: Tensor  # bool [in]: inputs that are always zero


def _checked_hessian(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """H in W's compute dtype and device after checking it, with dead inputs' H_jj set to 1; and the dead mask.

    A dead input (H_jj = 0) carries no signal: its weights cannot affect the outputs, and
    H_jj = 1 keeps H invertible. No copy unless H must change (callers that modify it,
    as the factorisation does with its diagonal, restore it or copy first).
    """
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be [{W.shape[1]}, {W.shape[1]}] for weight {tuple(W.shape)}, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H has nan/inf entries (non-finite calibration activations?)")
    H = H.detach().to(device=W.device, dtype=_compute_dtype(W))
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H = H.clone()
        H.diagonal()[dead] = 1
    return H, dead


def _prepare(W: Tensor, H: Tensor, dampening: float) -> _Prepared:
    """Working copy of W (compute dtype) and U; inputs that are always zero are handled as published.

    A dead input's weights are set to zero (see :func:`_checked_hessian`).
    """
    dtype = _compute_dtype(W)
    H, dead = _checked_hessian(W, H)
    upper, damping, retries = _inverse_hessian_cholesky(H, dampening)
    # The work copy after the factorisation, whose buffers are the peak of a wide layer's pruning.
    work = W.detach().to(dtype=dtype, copy=True)
    work[:, dead] = 0
    return _Prepared(work, upper, damping, retries, dead)


# select(scores, start, stop) -> keep-mask of columns [start, stop); scores = w² / U_jj² of those columns
Selector = Callable[[Tensor, int, int], Tensor]
# round(block, j, start) -> the value column start + j is fixed to, for every row (pruned rows are zeroed
# afterwards); ``block`` holds the current, OBS-updated columns [start, start + block width)
Rounder = Callable[[Tensor, int, int], Tensor]


class _Sweep(NamedTuple):
    weight: Tensor
    mask: Tensor
    loss: Tensor  # Σ over fixed weights of ((w − q) / U_jj)²: tr(ΔW (H + λI) ΔWᵀ), see _sweep_relative_error


def _obs_sweep(
    W: Tensor,
    U: Tensor,
    block_size: int,
    select: Selector,
    select_every: int | None,
    rounder: Rounder | None = None,
) -> _Sweep:
    """SparseGPT's column sweep (Frantar & Alistarh 2023, Alg. 1), in place on ``W``.

    Columns are eliminated left to right. Fixing weight w_rj to a value q_rj with the
    columns > j still free, the OBS update that best compensates for it in ‖(W − Ŵ)X‖²
    changes the row's later weights by ``−((w_rj − q_rj) / U_jj) · U[j, j:]``. Pruning
    is q = 0; with a ``rounder`` (GPTQ, Frantar et al. 2022) the kept weights are fixed
    to their quantized values and pruned ones to 0 — SparseGPT's joint sparsification
    and quantization, in one sweep. Inside a block of ``block_size`` columns the updates
    are applied column by column (each column's mask and rounding depend on them); their
    effect on the columns after the block is accumulated in ``err`` and applied in one
    matrix product at the block's end ("lazy batched updates") — the same arithmetic,
    grouped for speed.

    The mask is chosen adaptively: ``select`` is called for the next ``select_every``
    columns (for N:M: every M columns; None: once per block) with the current scores
    w² / U_jj², the OBS saliency of pruning each weight given the updates so far.
    """
    cols = W.shape[1]
    mask = torch.ones_like(W, dtype=torch.bool)
    loss = W.new_zeros(())
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        width = b1 - b0
        block = W[:, b0:b1].clone()
        U_block = U[b0:b1, b0:b1]
        d = U_block.diagonal()
        err = torch.zeros_like(block)
        step = select_every or width
        for j in range(width):
            if j % step == 0:
                g1 = min(j + step, width)
                scores = block[:, j:g1] ** 2 / d[j:g1] ** 2
                mask[:, b0 + j : b0 + g1] = select(scores, b0 + j, b0 + g1)
            w = block[:, j]
            q = w if rounder is None else rounder(block, j, b0)
            q = q.masked_fill(~mask[:, b0 + j], 0)  # kept weights stay (or are rounded), pruned ones become 0
            err[:, j] = (w - q) / d[j]
            block[:, j + 1 :].addr_(err[:, j], U_block[j, j + 1 :], alpha=-1)  # OBS update within the block
            block[:, j] = q
        W[:, b0:b1] = block
        W[:, b1:].addmm_(err, U[b0:b1, b1:], alpha=-1)  # lazy batched update of all later columns
        loss += err.square().sum()
    return _Sweep(W, mask, loss)


# :func:`reconstruction_error` of a sweep's result without its two out×in×in products.
# With H_λ = H + λI: each OBS step raises the quadratic loss tr(ΔW H_λ ΔWᵀ) by exactly its
# err² (the free columns are at their optimum given the fixed ones), so the sweep's summed
# err² is that loss at the end; and H_λ = U⁻¹U⁻ᵀ (as H_λ⁻¹ = UᵀU) makes tr(W H_λ Wᵀ) =
# ‖W U⁻¹‖², one triangular solve (¼ of the products' flops). Subtracting λ‖·‖² from both
# gives them under H. Dead inputs change nothing (H is zero on their rows and columns).
# Equal to reconstruction_error up to rounding (tested).


def _output_energy(prepared: _Prepared) -> Tensor:
    """tr(W H Wᵀ) of the sweep's starting weights; call before the sweep updates them."""
    start, U = prepared.work, prepared.upper
    energy = torch.linalg.solve_triangular(U, start, upper=True, left=False).square().sum()
    return energy - prepared.damping * start.square().sum()


def _sweep_relative_error(W: Tensor, prepared: _Prepared, sweep: _Sweep, energy: Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for the sweep's result; ``W`` is the unchanged original weight."""
    delta = sweep.weight - W.detach().to(sweep.weight.dtype)
    delta[:, prepared.dead] = 0  # the start had them zeroed: ΔW counted from there
    num, den = float(sweep.loss - prepared.damping * delta.square().sum()), float(energy)
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return max(num, 0.0) / den


def _sparsegpt(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    nm: NM | None,
    block_size: int,
    dampening: float,
    keep_mask: Tensor | None,
) -> LinearPruneResult:
    """:func:`sparsegpt_prune` plus the relative error and the Cholesky retries (reported by the driver)."""
    _check_args(W, sparsity, nm, keep_mask)
    if block_size <= 0 or (nm is not None and block_size % nm[1]):
        raise ValueError(f"block_size must be positive (and a multiple of M for N:M), got {block_size}")
    if dampening < 0:
        raise ValueError(f"dampening must be >= 0, got {dampening}")
    prepared = _prepare(W, H, dampening)
    work, U = prepared.work, prepared.upper
    energy = _output_energy(prepared)
    keep = None if keep_mask is None else keep_mask.to(work.device)
    rows, cols = work.shape

    if nm is not None:

        def select(scores: Tensor, start: int, stop: int) -> Tensor:
            return _nm_mask(scores, nm, None if keep is None else keep[:, start:stop])

        sweep = _obs_sweep(work, U, block_size, select, select_every=nm[1])
    else:
        # Each block prunes its quota over all its rows × columns (as the reference code's
        # per-block threshold); quotas come from one allocation so the layer total is exact.
        starts = range(0, cols, block_size)
        sizes = torch.tensor([rows * (min(s + block_size, cols) - s) for s in starts])
        forced = (
            torch.zeros_like(sizes)
            if keep is None
            else torch.stack([(~keep[:, s : s + block_size]).sum() for s in starts]).cpu()
        )
        quotas = _allocate_prune_counts(sizes, forced, sparsity)

        def select(scores: Tensor, start: int, stop: int) -> Tensor:
            block_keep = None if keep is None else keep[:, start:stop].reshape(1, -1)
            quota = quotas[start // block_size].reshape(1)
            return _prune_lowest(scores.reshape(1, -1), quota, block_keep).reshape(scores.shape)

        sweep = _obs_sweep(work, U, block_size, select, select_every=None)
    error = _sweep_relative_error(W, prepared, sweep, energy)
    return LinearPruneResult(sweep.weight.to(W.dtype), sweep.mask, prepared.retries, error)


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    nm: NM | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    keep_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune with OBS weight updates, mask chosen on the fly.

    ``H = 2XXᵀ/n`` of the layer's calibration inputs. Unstructured: each block of
    ``block_size`` columns prunes its share of weights with the lowest w²/[H⁻¹]_jj over
    the whole block; N:M: the M−N lowest of every group of M, chosen when the sweep
    reaches the group. Computes in fp32 (fp64 for fp64 input); returns W's dtype.
    """
    result = _sparsegpt(W, H, sparsity, nm=nm, block_size=block_size, dampening=dampening, keep_mask=keep_mask)
    return result.weight, result.mask


def _sparsegpt_fixed_mask(W: Tensor, H: Tensor, mask: Tensor, *, block_size: int, dampening: float) -> Tensor:
    """SparseGPT's weight update for a mask given in advance (the same sweep, no selection).

    For tests: when, in every row, all pruned columns precede the kept ones and there is no
    dampening, the sweep must reproduce the exact least-squares reconstruction.
    """
    work, U, *_ = _prepare(W, H, dampening)
    mask = mask.to(work.device)
    sweep = _obs_sweep(work, U, block_size, lambda scores, a, b: mask[:, a:b], select_every=None)
    return sweep.weight.to(W.dtype)


# --------------------------------------------------------------------------- ADMM and mask refinement
#
# Both minimise SparseGPT's damped layer loss tr((W − Ŵ)(H + λI)(W − Ŵ)ᵀ) (the same H and λ)
# over Ŵ with a given sparsity pattern. They work in unit-diagonal coordinates: with
# S = diag(H + λI)^½, Ŵ' = ŴS and H' = S⁻¹(H + λI)S⁻¹ the loss is tr((W' − Ŵ')H'(W' − Ŵ')ᵀ)
# and the pattern is unchanged (S is diagonal). There one penalty ρ means the same for every
# input, a projection that keeps the largest |ŵ'_ij| = |ŵ_ij|·‖X_j‖ (Wanda's score of the
# current weights) is the natural one, and CG needs no preconditioner (H' has Jacobi's).

_ADMM_ITERS_PER_RHO = 3  # ADMM steps per penalty value: each value's Cholesky factor serves that many solves
# ADMM stops early once this many steps in a row (two penalty values) left the mask unchanged: only
# the mask is kept from ADMM (CG re-fits the weights), and with ρ growing a settled mask rarely moves.
_ADMM_STABLE_STEPS = 2 * _ADMM_ITERS_PER_RHO
_REFINE_CANDIDATES = 8  # refinement: pruned weights per row tried each round (each costs one pass over the layer)


class _Quadratic(NamedTuple):
    hessian: Tensor  # H' = S⁻¹ (H + λI) S⁻¹, unit diagonal
    scale: Tensor  # S = diag(H + λI)^½ [in]
    dense: Tensor  # W' = W S, the original weights (dead inputs zeroed)
    target: Tensor  # W' H': the right-hand side of the normal equations Ŵ' H' = W' H' (masked)


def _quadratic(W: Tensor, H: Tensor, dampening: float) -> _Quadratic:
    """The layer's damped loss in unit-diagonal coordinates; λ = dampening · mean(diag H), as SparseGPT."""
    H, dead = _checked_hessian(W, H)
    H = H.clone()  # scaled in place below: never the caller's tensor
    H.diagonal().add_(dampening * H.diagonal().mean())
    scale = H.diagonal().sqrt()
    H.div_(scale[:, None]).div_(scale[None, :])
    dense = W.detach().to(dtype=H.dtype, copy=True).mul_(scale)
    dense[:, dead] = 0
    return _Quadratic(H, scale, dense, dense @ H)


def _masked_cg(q: _Quadratic, start: Tensor, mask: Tensor, iterations: int) -> Tensor:
    """Kept weights re-fitted: batched conjugate gradients on each row's masked normal equations.

    Row i solves [H']_KK ŵ_K = [W'H']_K on its kept set K; masking the residual and the
    search direction keeps every iterate on the pattern (the pruned entries stay exactly 0)
    and makes the product with H' act as [H']_KK. Rows run together, each with its own
    step sizes; a converged row (zero residual) stops moving. CG lowers the loss at every
    step and solves a row exactly after |K| steps (in exact arithmetic).
    """
    x = start.clone()
    residual = (q.target - x @ q.hessian).mul_(mask)
    direction = residual.clone()
    rr = residual.square().sum(1, keepdim=True)
    for _ in range(iterations):
        product = (direction @ q.hessian).mul_(mask)
        curvature = (direction * product).sum(1, keepdim=True)
        step = torch.where(curvature > 0, rr / curvature.clamp_min(torch.finfo(x.dtype).tiny), 0)
        x.addcmul_(step, direction)
        residual.addcmul_(step, product, value=-1)
        rr_next = residual.square().sum(1, keepdim=True)
        direction.mul_(torch.where(rr > 0, rr_next / rr.clamp_min(torch.finfo(x.dtype).tiny), 0)).add_(residual)
        rr = rr_next
    return x


def _admm_search(
    q: _Quadratic,
    start: Tensor,
    start_mask: Tensor,
    sparsity: float,
    nm: NM | None,
    keep: Tensor | None,
    *,
    iterations: int,
    rho: float,
    rho_growth: float,
) -> tuple[Tensor, Tensor]:
    """ADMM on min ‖W' − Ŵ'‖²_H' s.t. Ŵ' on the pattern, from ``start`` on ``start_mask``; returns D and its mask.

    Splitting Ŵ' = D (D on the pattern), with the scaled dual V, each step is
      Ŵ' = (W'H' + ρ(D − V)) (H' + ρI)⁻¹   closed form: one Cholesky solve,
      D  = P(Ŵ' + V)                       keep the largest |·| (exact count, N:M groups, old zeros),
      V  = V + Ŵ' − D.
    ρ grows by ``rho_growth`` every few steps: small ρ lets the support move toward what
    the loss wants, large ρ forces Ŵ' and D together (convergence). V starts where
    ``start`` would be a fixed point of the first two updates (V = (W' − D)H'/ρ), so the
    first projection is that of D plus the loss's gradient step: ADMM leaves SparseGPT's
    solution only where the loss asks for it. When ρ changes V is rescaled (the unscaled
    dual ρV is what carries over). Stops early once the mask has held for two penalty values.
    """
    eye_rho = torch.zeros_like(q.hessian)
    D, mask = start.clone(), start_mask.to(start.device)
    V = (q.target - D @ q.hessian).div_(rho)
    factor = None
    unchanged = 0  # consecutive steps whose projection kept the mask as it was
    for step in range(iterations):
        if unchanged >= _ADMM_STABLE_STEPS:
            break
        if step % _ADMM_ITERS_PER_RHO == 0:
            if step:
                V.div_(rho_growth)
                rho *= rho_growth
            eye_rho.copy_(q.hessian).diagonal().add_(rho)
            factor, info = torch.linalg.cholesky_ex(eye_rho)
            if info != 0:
                raise RuntimeError(f"admm: H' + {rho:g}·I is not positive definite; check the calibration activations")
        # Row form of (H' + ρI) Ŵ'ᵀ = (W'H' + ρ(D − V))ᵀ; the transpose of a row-major matrix is LAPACK's layout.
        rhs = (D - V).mul_(rho).add_(q.target)
        weights = torch.cholesky_solve(rhs.T, factor).T
        Z = weights.add_(V)
        new_mask = _select_mask(Z.abs(), sparsity, nm, keep, per_row=False)
        unchanged = unchanged + 1 if torch.equal(new_mask, mask) else 0
        mask = new_mask
        D = Z * mask
        V = Z.sub_(D)  # Ŵ' + V − D
    return D, mask


def _refine_swaps(
    q: _Quadratic, start: Tensor, mask: Tensor, nm: NM | None, keep: Tensor | None, rounds: int
) -> tuple[Tensor, Tensor]:
    """DSnoT-style mask refinement: swap a kept and a pruned weight of a row where that lowers the loss.

    With the row's residual δ = W' − Ŵ' and g = δH', pruning kept weight p (ŵ_p → 0) and
    reviving pruned weight q at its best value t = g_q + ŵ_p H'_pq changes the loss by exactly
      Δ(p, q) = 2 ŵ_p g_p + ŵ_p² − (g_q + ŵ_p H'_pq)²      (H'_pp = H'_qq = 1).
    Each round, every row takes the few pruned q with the largest revival gains g_q² (never
    an old zero that ``keep`` forbids), evaluates Δ(p, q) for every kept p (in q's N:M group)
    and makes the best swap if Δ < 0; g follows by two rank-one updates (rows p and q of H').
    Row counts (and N:M groups) are unchanged by construction. Stops after ``rounds`` rounds
    or when no row improves. Greedy and local: one swap at a time, other weights held.
    """
    x, mask = start.clone(), mask.clone()
    grad = q.target - x @ q.hessian  # g = (W' − Ŵ')H'
    rows = torch.arange(x.shape[0], device=x.device)
    cols = torch.arange(x.shape[1], device=x.device)
    revivable = ~mask if keep is None else ~mask & keep
    loss = ((q.dense - x) * grad).sum(1)
    candidates = min(_REFINE_CANDIDATES, x.shape[1])
    for _ in range(rounds):
        gains = grad.square().masked_fill(~revivable, -1.0)
        top_gain, top_q = gains.topk(candidates, dim=1)
        best_delta = torch.full_like(loss, math.inf)
        best_p = torch.zeros_like(rows)
        best_q = torch.zeros_like(rows)
        prune_cost = (2 * grad).add_(x).mul_(x)  # 2 ŵ_p g_p + ŵ_p², the same for every candidate q
        for k in range(candidates):
            q_k = top_q[:, k]
            h_q = q.hessian[q_k]  # [rows, in]: row q of H' for each row's candidate
            delta = prune_cost - h_q.mul_(x).add_(grad[rows, q_k][:, None]).square_()
            allowed = mask if nm is None else mask & (cols[None, :] // nm[1] == (q_k // nm[1])[:, None])
            delta.masked_fill_(~allowed | (top_gain[:, k] <= 0)[:, None], math.inf)
            value, p_k = delta.min(1)
            better = value < best_delta
            best_delta = torch.where(better, value, best_delta)
            best_p, best_q = torch.where(better, p_k, best_p), torch.where(better, q_k, best_q)
        # A swap must gain more than the rounding of the loss itself, or rows could cycle.
        improves = best_delta < -1e-6 * loss.abs()
        if not bool(improves.any()):
            break
        r, p, qq = rows[improves], best_p[improves], best_q[improves]
        w_p = x[r, p]
        t = grad[r, qq] + w_p * q.hessian[p, qq]
        grad[r] += w_p[:, None] * q.hessian[p] - t[:, None] * q.hessian[qq]
        x[r, p], x[r, qq] = 0, t
        mask[r, p], mask[r, qq] = False, True
        revivable[r, p], revivable[r, qq] = True, False
        loss[r] += best_delta[improves]
    return x, mask


def _with_error(W: Tensor, H: Tensor, q: _Quadratic, x: Tensor, mask: Tensor, retries: int) -> LinearPruneResult:
    """A result from unit-diagonal weights: back to W's scale and dtype, scored by :func:`reconstruction_error`."""
    weight = (x / q.scale).masked_fill_(~mask, 0).to(W.dtype)
    return LinearPruneResult(weight, mask, retries, reconstruction_error(W, weight, H))


def _best(*results: LinearPruneResult) -> LinearPruneResult:
    """The result with the lowest reconstruction error (the first among equals)."""
    return min(results, key=lambda r: r.error)


def _admm(
    W: Tensor, H: Tensor, sparsity: float, *, nm: NM | None, cfg: PruneConfig, keep_mask: Tensor | None
) -> tuple[LinearPruneResult, _Quadratic]:
    """Method ``admm``: SparseGPT, then ADMM from its mask and weights, then CG on the kept weights.

    The layer gets the better of SparseGPT's and ADMM's results by reconstruction error, so
    it is never worse than SparseGPT on any layer. Returns the quadratic too (refinement reuses it).
    """
    start = _sparsegpt(W, H, sparsity, nm=nm, block_size=cfg.block_size, dampening=cfg.dampening, keep_mask=keep_mask)
    # The dampening SparseGPT ended with (retries raise it 10x each): one loss for both.
    q = _quadratic(W, H, cfg.dampening * 10**start.cholesky_retries)
    keep = None if keep_mask is None else keep_mask.to(q.dense.device)
    x, mask = _admm_search(
        q,
        start.weight.to(q.dense.dtype) * q.scale,
        start.mask,
        sparsity,
        nm,
        keep,
        iterations=cfg.admm_iterations,
        rho=cfg.admm_rho,
        rho_growth=cfg.admm_rho_growth,
    )
    x = _masked_cg(q, x, mask, cfg.cg_iterations)
    return _best(start, _with_error(W, H, q, x, mask, start.cholesky_retries)), q


def _refine(
    W: Tensor,
    H: Tensor,
    result: LinearPruneResult,
    cfg: PruneConfig,
    nm: NM | None,
    keep_mask: Tensor | None,
    q: _Quadratic | None = None,
) -> LinearPruneResult:
    """The optional refinement pass (``refine``) on any method's result: swaps, then CG on the kept weights.

    Returns the better of ``result`` and the refined one, so it never raises a layer's error.
    """
    if q is None:
        q = _quadratic(W, H, cfg.dampening * 10**result.cholesky_retries)
    keep = None if keep_mask is None else keep_mask.to(q.dense.device)
    mask = result.mask.to(q.dense.device)
    x, mask = _refine_swaps(q, result.weight.to(q.dense.dtype) * q.scale, mask, nm, keep, cfg.refine_iterations)
    x = _masked_cg(q, x, mask, cfg.cg_iterations)
    return _best(result, _with_error(W, H, q, x, mask, result.cholesky_retries))


# --------------------------------------------------------------------------- dispatch and metrics


def prune_linear(
    W: Tensor, H: Tensor, cfg: PruneConfig, *, sparsity: float | None = None, keep_mask: Tensor | None = None
) -> LinearPruneResult:
    """Prune one Linear weight with ``cfg.method``, given its inputs' ``H = 2XXᵀ/n``.

    ``sparsity`` overrides ``cfg.sparsity`` (OWL's per-layer targets). Wanda uses diag(H),
    which is ‖X_j‖² up to the factor 2/n that does not change its ranking. ``admm`` starts
    from SparseGPT's result and keeps it where it is better; ``cfg.refine`` then swaps
    weights of that (or any method's) result and keeps the better of before and after.
    """
    target = cfg.sparsity if sparsity is None else sparsity
    quadratic = None
    if cfg.method == "admm":
        result, quadratic = _admm(W, H, target, nm=cfg.nm, cfg=cfg, keep_mask=keep_mask)
    elif cfg.method == "sparsegpt":
        result = _sparsegpt(
            W, H, target, nm=cfg.nm, block_size=cfg.block_size, dampening=cfg.dampening, keep_mask=keep_mask
        )
    else:
        if cfg.method == "wanda":
            new_W, mask = wanda_prune(W, H.diagonal(), target, nm=cfg.nm, keep_mask=keep_mask)
        else:
            new_W, mask = magnitude_prune(W, target, nm=cfg.nm, keep_mask=keep_mask)
        result = LinearPruneResult(new_W, mask, 0, reconstruction_error(W, new_W, H))
    if cfg.refine:
        result = _refine(W, H, result, cfg, cfg.nm, keep_mask, quadratic)
    return result


def reconstruction_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """Relative output error ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs, from H alone.

    ‖ΔW X‖²_F = tr(ΔW XXᵀ ΔWᵀ) = (n/2) Σ (ΔW H) ⊙ ΔW, and the n/2 cancels in the ratio.
    """
    H = H.to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    W = W.detach().to(H.dtype)
    delta = W - W_new.detach().to(device=W.device, dtype=H.dtype)
    num = float(((delta @ H) * delta).sum())
    den = float(((W @ H) * W).sum())
    if den <= 0:
        return 0.0 if num == 0 else math.inf
    return num / den


# --------------------------------------------------------------------------- OWL


def outlier_ratio(scores: Sequence[Tensor], threshold: float) -> float:
    """OWL's layer outlier ratio: fraction of Wanda scores above ``threshold`` × their mean.

    ``scores`` are all sublayers of one decoder layer, pooled (as in Yin et al. 2024).
    """
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def owl_sparsities(outlier_ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsities from outlier ratios: more outliers → lower sparsity.

    ``s_l = target − lam · (D_l − mean D) / max_k |D_k − mean D|``: a linear map of the
    outlier ratios D, so the mean is the target (the model's global sparsity is kept) and
    every s_l lies in [target − lam, target + lam], the most extreme layer at the edge.
    OWL's reference code instead rescales D to [0, 2·lam] before centring, which can step
    outside that band when the ratios are skewed; this keeps the documented band.
    """
    if not outlier_ratios:
        raise ValueError("owl_sparsities needs at least one layer")
    if lam < 0 or target - lam < 0 or target + lam >= 1:
        raise ValueError(f"owl: target ± lambda = [{target - lam:g}, {target + lam:g}] must lie within [0, 1)")
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    deviation = ratios - ratios.mean()
    spread = float(deviation.abs().max())
    if spread == 0.0 or lam == 0.0:
        return [target] * len(outlier_ratios)
    sparsities = target - lam * deviation / spread
    sparsities -= sparsities.mean() - target  # remove the floating-point residue of the mean
    return sparsities.clamp(target - lam, target + lam).tolist()
