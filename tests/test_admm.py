"""Method `admm` and the refinement pass against exact optima of tiny layers, patterns, old zeros, options."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch
from pydantic import ValidationError

from sparsify.sparsity.pruning import (
    PruneConfig,
    _masked_cg,
    _quadratic,
    _refine_swaps,
    prune_linear,
    reconstruction_error,
)
from tests.test_pruning import correlated_inputs, hessian, random_weight

F64 = torch.float64
DAMPENING = 0.01  # the default: the exact optima below are of the damped loss the solvers minimise


def damped(H: torch.Tensor) -> torch.Tensor:
    Hd = H.clone()
    Hd.diagonal().add_(DAMPENING * H.diagonal().mean())
    return Hd


def loss(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    delta = W - W_new
    return float(((delta @ H) * delta).sum())


def row_optimum(w: torch.Tensor, H: torch.Tensor, kept: list[int]) -> float:
    """min over ŵ supported on ``kept`` of (w − ŵ) H (w − ŵ)ᵀ, in closed form: wHwᵀ − b_K H_KK⁻¹ b_Kᵀ, b = wH."""
    if not kept:
        return float(w @ H @ w)
    b = w @ H[:, kept]
    return float(w @ H @ w - b @ torch.linalg.solve(H[kept][:, kept], b))


def exact_optimum(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> float:
    """The best damped loss over every mask of the pattern, each mask's weights solved exactly.

    Unstructured: the layer keeps exactly numel − round(sparsity · numel) weights, anywhere
    (as admm's projection allows), so each row's best loss for every count k is enumerated
    and the counts are combined by dynamic programming. N:M: rows are independent; every
    choice of N in each group of M is enumerated.
    """
    rows, cols = W.shape
    if nm is not None:
        n, m = nm
        choices = [itertools.combinations(range(g * m, (g + 1) * m), n) for g in range(cols // m)]
        masks = [[j for group in combo for j in group] for combo in itertools.product(*choices)]
        return sum(min(row_optimum(W[i], H, kept) for kept in masks) for i in range(rows))
    keep_total = rows * cols - round(sparsity * rows * cols)
    best = {0: 0.0}  # kept so far -> least loss of the rows so far
    for i in range(rows):
        per_count = {
            k: min(row_optimum(W[i], H, list(kept)) for kept in itertools.combinations(range(cols), k))
            for k in range(cols + 1)
        }
        nxt: dict[int, float] = {}
        for total, value in best.items():
            for k, row_loss in per_count.items():
                if total + k <= keep_total:
                    nxt[total + k] = min(nxt.get(total + k, float("inf")), value + row_loss)
        best = nxt
    return best[keep_total]


def config(**fields) -> PruneConfig:
    return PruneConfig(**{"method": "sparsegpt", "block_size": 8, "dampening": DAMPENING, **fields})


PATTERNS = [(0.5, "unstructured"), (0.75, "unstructured"), (0.5, "2:4")]


@pytest.mark.parametrize(("sparsity", "structure"), PATTERNS)
def test_admm_is_near_the_exact_optimum_and_never_worse_than_sparsegpt(sparsity, structure):
    """2×8 layers, 12 seeded H = 2XXᵀ/n: what holds on every pattern (measured over 40 seeds at commit time:
    the optimum itself in 64% of the cases, 1.037× it on average, 1.55× at worst; SparseGPT: 11.7× at worst)."""
    ratios, sparsegpt_ratios = [], []
    for seed in range(12):
        H = hessian(correlated_inputs(8, 32, seed=seed, outliers=1))
        W = random_weight(2, 8, seed=seed + 1000)
        cfg = config(sparsity=sparsity, structure=structure)
        optimum = exact_optimum(W, damped(H), sparsity, cfg.nm)
        admm = prune_linear(W, H, cfg.model_copy(update={"method": "admm"}))
        sparsegpt = prune_linear(W, H, cfg)
        assert admm.error <= sparsegpt.error  # the layer's reported error: never worse, by construction
        assert int((~admm.mask).sum()) == round(sparsity * 16) and torch.all(admm.weight[~admm.mask] == 0)
        ratios.append(loss(W, admm.weight, damped(H)) / optimum)
        sparsegpt_ratios.append(loss(W, sparsegpt.weight, damped(H)) / optimum)
    assert min(ratios) >= 1 - 1e-9  # nothing beats the optimum: the enumeration is right
    assert max(ratios) <= 1.6
    assert statistics.fmean(ratios) <= 1.08
    assert sum(r <= 1 + 1e-6 for r in ratios) >= 6  # the exact optimum in at least half the cases
    assert statistics.fmean(ratios) < statistics.fmean(sparsegpt_ratios)


def test_exact_optimum_reference_agrees_with_brute_force_over_layer_masks():
    """The DP over rows equals enumerating every layer mask (the reference the solver is judged by)."""
    H = damped(hessian(correlated_inputs(8, 32, seed=3, outliers=1)))
    W = random_weight(2, 4, seed=4)
    H4 = H[:4, :4]
    brute = min(
        sum(row_optimum(W[i], H4, [j for j in range(4) if (i * 4 + j) in kept]) for i in range(2))
        for kept in itertools.combinations(range(8), 4)
    )
    assert exact_optimum(W, H4, 0.5, None) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("refine", [False, True])
def test_admm_nm_output_meets_the_pattern_exactly(nm, refine):
    n, m = nm
    H = hessian(correlated_inputs(32, 128, seed=5))
    W = random_weight(8, 32, seed=6, dtype=torch.float32)
    result = prune_linear(W, H.float(), config(method="admm", sparsity=1 - n / m, structure=f"{n}:{m}", refine=refine))
    assert torch.all(result.mask.reshape(-1, m).sum(1) == n)
    assert torch.all((result.weight != 0).reshape(-1, m).sum(1) <= n) and torch.all(result.weight[~result.mask] == 0)
    assert result.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize(("sparsity", "structure"), [(0.7, "unstructured"), (0.5, "2:4")])
def test_refinement_never_increases_the_error_and_keeps_row_counts(method, sparsity, structure):
    H = hessian(correlated_inputs(48, 192, seed=7))
    W = random_weight(16, 48, seed=8)
    cfg = config(method=method, sparsity=sparsity, structure=structure, block_size=16)
    plain = prune_linear(W, H, cfg)
    refined = prune_linear(W, H, cfg.model_copy(update={"refine": True}))
    assert refined.error <= plain.error
    assert torch.equal(refined.mask.sum(1), plain.mask.sum(1))
    if cfg.nm is not None:
        assert torch.equal(refined.mask.reshape(-1, 4).sum(1), plain.mask.reshape(-1, 4).sum(1))
    assert torch.all(refined.weight[~refined.mask] == 0)


def test_swaps_alone_lower_the_damped_loss_by_their_predicted_amounts():
    """The swap pass's exact Δ: loss after = loss before + Σ accepted Δ < loss before; counts unchanged."""
    H = hessian(correlated_inputs(24, 96, seed=9))
    W = random_weight(6, 24, seed=10)
    q = _quadratic(W, H, DAMPENING)
    start = prune_linear(W, H, config(method="magnitude", sparsity=0.6))
    x0 = start.weight * q.scale
    x, mask = _refine_swaps(q, x0, start.mask, None, None, rounds=20)
    before = loss(q.dense, x0, q.hessian)
    after = loss(q.dense, x, q.hessian)
    assert after < before and not torch.equal(mask, start.mask)
    assert torch.equal(mask.sum(1), start.mask.sum(1)) and torch.all(x[~mask] == 0)
    assert after == pytest.approx(loss(W, x / q.scale, damped(H)), rel=1e-9)  # the coordinates change nothing


def test_masked_cg_solves_each_rows_least_squares():
    H = hessian(correlated_inputs(12, 64, seed=11))
    W = random_weight(4, 12, seed=12)
    q = _quadratic(W, H, DAMPENING)
    mask = torch.rand(4, 12, generator=torch.Generator().manual_seed(13)) > 0.5
    x = _masked_cg(q, (q.dense * mask), mask, iterations=12)  # |K| ≤ 12 steps: exact up to rounding
    for i in range(4):
        kept = mask[i].nonzero().flatten().tolist()
        expected = row_optimum(q.dense[i], q.hessian, kept)
        assert loss(q.dense[i : i + 1], x[i : i + 1], q.hessian) == pytest.approx(expected, rel=1e-8, abs=1e-12)
    assert torch.all(x[~mask] == 0)


@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_existing_zeros_stay_zero(refine, structure):
    H = hessian(correlated_inputs(32, 128, seed=14))
    W = random_weight(8, 32, seed=15)
    keep = torch.rand(8, 32, generator=torch.Generator().manual_seed(16)) > 0.3
    result = prune_linear(W, H, config(method="admm", sparsity=0.5, structure=structure, refine=refine), keep_mask=keep)
    assert not torch.any(result.mask & ~keep) and torch.all(result.weight[~keep] == 0)
    if structure == "unstructured":
        assert int((~result.mask).sum()) == max(128, int((~keep).sum()))
    else:
        assert torch.all(result.mask.reshape(-1, 4).sum(1) <= 2)


def test_admm_with_no_iterations_is_sparsegpt_refitted():
    H = hessian(correlated_inputs(16, 64, seed=17))
    W = random_weight(4, 16, seed=18)
    sparsegpt = prune_linear(W, H, config(sparsity=0.5))
    admm = prune_linear(W, H, config(method="admm", sparsity=0.5, admm_iterations=0, cg_iterations=16))
    assert torch.equal(admm.mask, sparsegpt.mask) and admm.error <= sparsegpt.error
    assert admm.error == pytest.approx(reconstruction_error(W, admm.weight, H), rel=1e-12)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"method": "admm", "admm_rho": 0}, "admm_rho"),
        ({"admm_rho_growth": 0.5}, "admm_rho_growth"),
        ({"admm_iterations": -1}, "admm_iterations"),
        ({"cg_iterations": -1}, "cg_iterations"),
        ({"refine_iterations": -2}, "refine_iterations"),
        ({"method": "alps"}, "method"),
    ],
)
def test_config_errors_name_the_key(fields, match):
    with pytest.raises(ValidationError, match=match):
        PruneConfig(**fields)


# --------------------------------------------------------------------------- the prune-sweep's methods


def test_sweep_methods_with_options_configure_their_points(tmp_path):
    from tasks.sweep import point_config, points
    from tests.conftest import smoke_config

    cfg = smoke_config(tmp_path)
    pts = points(["sparsegpt", "admm+owl", "admm+refine"], [0.7], ["unstructured", "2:4"])
    assert [p.name for p in pts] == [
        "sweep-sparsegpt-70",
        "sweep-admm-owl-70",
        "sweep-admm-refine-70",
        "sweep-sparsegpt-2of4",
        "sweep-admm-refine-2of4",
    ]  # OWL: unstructured only
    owl, refine = point_config(cfg, pts[1]), point_config(cfg, pts[4])
    assert (owl.method, owl.owl, owl.refine, owl.sparsity) == ("admm", True, False, 0.7)
    assert (refine.method, refine.refine, refine.structure) == ("admm", True, "2:4")
    with pytest.raises(ValueError, match=r"'admm\+fast'.*unknown option"):
        point_config(cfg, points(["admm+fast"], [0.5], ["unstructured"])[0])
