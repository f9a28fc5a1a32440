"""Per-layer pruning algorithms: SparseGPT against first-principles references, exact sparsity, options."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from pydantic import ValidationError

from sparsify.sparsity.pruning import (
    PruneConfig,
    _inverse_hessian_cholesky,
    _prune_lowest,
    _sparsegpt_fixed_mask,
    magnitude_prune,
    outlier_ratio,
    owl_sparsities,
    parse_structure,
    prune_linear,
    reconstruction_error,
    sparsegpt_prune,
    wanda_prune,
)

F64 = torch.float64


def correlated_inputs(features: int, tokens: int, *, seed: int, outliers: int = 3, dtype=F64) -> torch.Tensor:
    """X [features, tokens]: features mixed from few latent factors (strongly correlated), a few outlier features."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(features // 4, tokens, generator=g, dtype=dtype)
    mixing = torch.randn(features, features // 4, generator=g, dtype=dtype)
    X = mixing @ latent + 0.3 * torch.randn(features, tokens, generator=g, dtype=dtype)
    X[torch.randperm(features, generator=g)[:outliers]] *= 20.0
    return X


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X @ X.T / X.shape[1]


def random_weight(rows: int, cols: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- (a) naive reference


def naive_sparsegpt(W, H, sparsity, *, nm, block_size, dampening, keep_mask=None):
    """SparseGPT from first principles, in float64, one column at a time.

    At column j the free columns are F = {j, ..., n-1}; the OBS quantities come from a
    fresh inverse of H restricted to F (no Cholesky trick), and the update is applied to
    all later columns immediately (no lazy batching). The mask rule is the published one:
    per block, the quota of lowest w²/[H_F⁻¹]_jj over the block; for N:M, the M-N lowest
    per group, chosen when the sweep reaches the group.
    """
    W, H = W.clone().to(F64), H.clone().to(F64)
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    H = H + dampening * H.diagonal().mean() * torch.eye(cols, dtype=F64)
    inv_tail = [torch.linalg.inv(H[j:, j:]) for j in range(cols)]  # H_F⁻¹ for F = {j..}
    diag = torch.tensor([inv_tail[j][0, 0] for j in range(cols)], dtype=F64)
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % block_size == 0:
            stop = min(j + block_size, cols)
            quota = round(sparsity * rows * stop) - round(sparsity * rows * j)
            scores = W[:, j:stop] ** 2 / diag[j:stop]
            if keep_mask is not None:
                scores = scores.masked_fill(~keep_mask[:, j:stop], -math.inf)
            pruned = torch.zeros(scores.numel(), dtype=torch.bool)
            pruned[scores.flatten().argsort()[:quota]] = True
            mask[:, j:stop] = ~pruned.reshape(scores.shape)
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            scores = W[:, j : j + m] ** 2 / diag[j : j + m]
            lowest = scores.argsort(dim=1)[:, : m - n]
            mask[:, j : j + m] = torch.ones_like(scores, dtype=torch.bool).scatter(1, lowest, False)
        pruned_w = W[:, j] * ~mask[:, j]
        # OBS: remove w_j, compensate with the free columns: δ = −w_j / [H_F⁻¹]_jj · H_F⁻¹[j, :]
        W[:, j:] -= torch.outer(pruned_w / diag[j], inv_tail[j][0])
        W[:, j] = torch.where(mask[:, j], W[:, j], 0)
    return W, mask


@pytest.mark.parametrize("block_size", [16, 24, 64])
@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.7, None), (0.5, (2, 4)), (0.5, (4, 8))])
def test_blocked_sparsegpt_equals_naive_reference(block_size, sparsity, nm):
    X = correlated_inputs(64, 256, seed=1)
    H, W = hessian(X), random_weight(16, 64, seed=2)
    got_W, got_mask = sparsegpt_prune(W, H, sparsity, nm=nm, block_size=block_size, dampening=0.01)
    ref_W, ref_mask = naive_sparsegpt(W, H, sparsity, nm=nm, block_size=block_size, dampening=0.01)
    assert torch.equal(got_mask, ref_mask)
    torch.testing.assert_close(got_W, ref_W, rtol=0, atol=1e-9)


@pytest.mark.parametrize("block_size", [16, 64])
def test_blocked_sparsegpt_with_keep_mask_equals_naive_reference(block_size):
    X = correlated_inputs(64, 256, seed=3)
    H, W = hessian(X), random_weight(16, 64, seed=4)
    W50, mask50 = sparsegpt_prune(W, H, 0.5, block_size=block_size)
    got_W, got_mask = sparsegpt_prune(W50, H, 0.7, block_size=block_size, keep_mask=mask50)
    ref_W, ref_mask = naive_sparsegpt(W50, H, 0.7, nm=None, block_size=block_size, dampening=0.01, keep_mask=mask50)
    assert torch.equal(got_mask, ref_mask)
    torch.testing.assert_close(got_W, ref_W, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- (a2) exact least squares


def test_fixed_mask_update_is_exact_least_squares():
    """Pruned columns first in every row, no dampening: OBS sweeps = optimal reconstruction of the rest."""
    rows, cols = 6, 20
    X = correlated_inputs(cols, 200, seed=5, outliers=1)
    W = random_weight(rows, cols, seed=6)
    n_pruned = [3, 5, 8, 10, 12, 14]  # spans several blocks of 8: exercises the lazy updates
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for r, p in enumerate(n_pruned):
        mask[r, :p] = False
    got = _sparsegpt_fixed_mask(W, hessian(X), mask, block_size=8, dampening=0.0)
    for r, p in enumerate(n_pruned):
        target = W[r] @ X  # the dense row's outputs on the calibration tokens
        best = torch.linalg.lstsq(X[p:].T, target.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(got[r, p:], best, rtol=0, atol=1e-8)
        assert torch.all(got[r, :p] == 0)


# --------------------------------------------------------------------------- (b) quality ordering


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_beats_wanda_beats_magnitude_on_correlated_inputs(sparsity):
    X = correlated_inputs(128, 1024, seed=7, outliers=4, dtype=torch.float32)
    H, W = hessian(X), random_weight(64, 128, seed=8, dtype=torch.float32)
    errors = {
        "sparsegpt": reconstruction_error(W, sparsegpt_prune(W, H, sparsity, block_size=32)[0], H),
        "wanda": reconstruction_error(W, wanda_prune(W, (X**2).sum(1), sparsity)[0], H),
        "magnitude": reconstruction_error(W, magnitude_prune(W, sparsity)[0], H),
    }
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"], errors
    # Not by a hair: with outlier features, using the inputs is what matters (the papers' point).
    assert errors["wanda"] < 0.5 * errors["magnitude"] and errors["sparsegpt"] < 0.5 * errors["wanda"], errors


def test_reconstruction_error_matches_its_definition():
    X = correlated_inputs(32, 100, seed=9)
    W = random_weight(8, 32, seed=10)
    W_new, _ = magnitude_prune(W, 0.5)
    direct = ((W - W_new) @ X).square().sum() / (W @ X).square().sum()
    assert reconstruction_error(W, W_new, hessian(X)) == pytest.approx(float(direct), rel=1e-10)


# --------------------------------------------------------------------------- (c) exact sparsity


def prune_with(method, W, H, sparsity, nm=None, keep_mask=None):
    if method == "sparsegpt":
        return sparsegpt_prune(W, H, sparsity, nm=nm, block_size=16, keep_mask=keep_mask)
    if method == "wanda":
        return wanda_prune(W, H.diagonal(), sparsity, nm=nm, keep_mask=keep_mask)
    return magnitude_prune(W, sparsity, nm=nm, keep_mask=keep_mask)


METHODS = ["sparsegpt", "wanda", "magnitude"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_unstructured_sparsity_is_exact(method, sparsity):
    rows, cols = 7, 44  # 308 weights: 0.3 and 0.7 need rounding; 44 = 16 + 16 + 12 (a partial block)
    H = hessian(correlated_inputs(cols, 128, seed=11))
    W = random_weight(rows, cols, seed=12, dtype=torch.float32)
    W_new, mask = prune_with(method, W, H.float(), sparsity)
    assert int((~mask).sum()) == round(sparsity * rows * cols)
    assert torch.all(W_new[~mask] == 0) and W_new.dtype == W.dtype


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_sparsity_is_exact_in_every_group(method, nm):
    n, m = nm
    H = hessian(correlated_inputs(32, 128, seed=13))
    W = random_weight(8, 32, seed=14)
    W_new, mask = prune_with(method, W, H, 1 - n / m, nm=nm)
    assert torch.all(mask.reshape(-1, m).sum(1) == n)
    assert torch.all((W_new != 0).reshape(-1, m).sum(1) <= n)


def test_wanda_score_is_weight_times_input_norm():
    # |w|·‖x‖: 1·2 < 3·1, so the first weight goes (|w|·‖x‖² would drop the second: 4 > 3).
    _, mask = wanda_prune(torch.tensor([[1.0, 3.0]]), torch.tensor([4.0, 1.0]), 0.5)
    assert mask.tolist() == [[False, True]]


def test_wanda_compares_within_rows():
    W = random_weight(5, 40, seed=15)
    _, mask = wanda_prune(W, torch.rand(40, dtype=F64) + 0.1, 0.5)
    assert torch.all(mask.sum(1) == 20)


# --------------------------------------------------------------------------- (e) keep masks


@pytest.mark.parametrize("method", METHODS)
def test_iterative_pruning_keeps_old_zeros_and_hits_target(method):
    rows, cols = 8, 48
    H = hessian(correlated_inputs(cols, 128, seed=16))
    W = random_weight(rows, cols, seed=17)
    W50, mask50 = prune_with(method, W, H, 0.5)
    W70, mask70 = prune_with(method, W50, H, 0.7, keep_mask=mask50)
    assert not torch.any(mask70 & ~mask50)  # new mask ⊆ old mask
    assert int((~mask70).sum()) == round(0.7 * rows * cols)
    assert torch.all(W70[~mask70] == 0)


def test_keep_mask_concentrated_in_some_blocks_still_exact():
    """Old zeros crowded into the first block exceed its quota: other blocks give up theirs."""
    rows, cols = 8, 64
    H = hessian(correlated_inputs(cols, 128, seed=18))
    W = random_weight(rows, cols, seed=19)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    keep[:, :14] = False  # 112 old zeros in block 0 (its 50% quota is 64)
    W_new, mask = sparsegpt_prune(W, H, 0.5, block_size=16, keep_mask=keep)
    assert not torch.any(mask & ~keep)
    assert int((~mask).sum()) == rows * cols // 2


def test_keep_mask_sparser_than_target_keeps_old_zeros(caplog):
    W = random_weight(4, 16, seed=20)
    keep = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) > 0.8
    with caplog.at_level(logging.WARNING):
        _, mask = magnitude_prune(W, 0.5, keep_mask=keep)
    assert torch.equal(mask, keep)
    assert "more than the target" in caplog.text


def test_nm_with_unstructured_keep_mask_keeps_at_most_n():
    W = random_weight(8, 32, seed=21)
    _, mask50 = magnitude_prune(W, 0.5)
    _, mask = magnitude_prune(W, 0.5, nm=(2, 4), keep_mask=mask50)
    assert not torch.any(mask & ~mask50)
    assert torch.all(mask.reshape(-1, 4).sum(1) <= 2)


# --------------------------------------------------------------------------- SparseGPT numerics


def test_cholesky_failure_retries_with_more_dampening(caplog):
    H = torch.eye(16, dtype=F64)
    H[-1, -1] = -0.05  # indefinite: 0.01 dampening is not enough, 0.1 is
    cfg = PruneConfig(method="sparsegpt", block_size=16)
    with caplog.at_level(logging.WARNING):
        result = prune_linear(random_weight(4, 16, seed=22), H, cfg)
    assert result.cholesky_retries == 1
    assert "Cholesky failed" in caplog.text
    assert int((~result.mask).sum()) == 32


def test_dead_inputs_are_zeroed_without_nans():
    X = correlated_inputs(16, 64, seed=23)
    X[[3, 7]] = 0  # two inputs that never fire
    W_new, mask = sparsegpt_prune(random_weight(4, 16, seed=24), hessian(X), 0.25, block_size=8)
    assert torch.isfinite(W_new).all()
    assert torch.all(W_new[:, [3, 7]] == 0)


def test_bfloat16_weights_are_pruned_in_fp32_and_returned_in_bf16():
    H = hessian(correlated_inputs(32, 128, seed=25)).float()
    W = random_weight(8, 32, seed=26, dtype=torch.bfloat16)
    W_new, mask = sparsegpt_prune(W, H, 0.5, block_size=16)
    assert W_new.dtype == torch.bfloat16 and int((~mask).sum()) == 128 and torch.all(W_new[~mask] == 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"nm": (4, 4), "sparsity": 0.0}, "0 < N < M"),
        ({"nm": (2, 3), "sparsity": 1 / 3}, "multiple of M"),
        ({"nm": (2, 4), "sparsity": 0.7}, "sparsity 0.5"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    args = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(random_weight(4, 16, seed=27), torch.eye(16, dtype=F64), args.pop("sparsity"), **args)


# --------------------------------------------------------------------------- PruneConfig


def test_config_defaults_and_structure_parsing():
    cfg = PruneConfig()
    assert (cfg.method, cfg.sparsity, cfg.nm) == ("admm", 0.5, None)
    assert PruneConfig(structure="2:4").nm == (2, 4)
    assert parse_structure(" 4:8 ") == (4, 8)
    with pytest.raises(ValidationError):
        cfg.sparsity = 0.7  # frozen


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"structure": "4:2"}, "0 < N < M"),
        ({"structure": "2-4"}, "'unstructured' or 'N:M'"),
        ({"structure": "2:4", "sparsity": 0.7}, "sparsity 0.5"),
        ({"structure": "2:4", "block_size": 10}, "multiple of M=4"),
        ({"structure": "2:4", "owl": True}, "owl"),
        ({"owl": True, "sparsity": 0.95}, "owl_lambda"),
        ({"block_size": 0}, "block_size"),
        ({"dampening": 0}, "dampening"),
        ({"method": "obs"}, "method"),
        ({"ignore": ["re:("]}, "regular expression"),
        ({"sparsty": 0.5}, "sparsty"),
    ],
)
def test_config_errors_name_the_problem(fields, match):
    with pytest.raises(ValidationError, match=match):
        PruneConfig(**fields)


# --------------------------------------------------------------------------- OWL


def test_owl_sparsities_mean_band_and_order():
    ratios = [0.01, 0.05, 0.02, 0.2, 0.03]
    out = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(out) / len(out) == pytest.approx(0.7, abs=1e-12)
    assert all(0.62 - 1e-12 <= s <= 0.78 + 1e-12 for s in out)
    assert min(out) == pytest.approx(0.62)  # the most outlier-heavy layer sits at the band's edge
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [out[i] for i in order] == sorted(out, reverse=True)  # more outliers → lower sparsity


def test_owl_equal_ratios_and_bad_band():
    assert owl_sparsities([0.1, 0.1], 0.5, 0.1) == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"within \[0, 1\)"):
        owl_sparsities([0.1, 0.2], 0.95, 0.08)


def test_outlier_ratio_counts_scores_above_threshold_times_mean():
    scores = torch.ones(100)
    scores[:2] = 100.0  # mean 2.98, so the threshold is 14.9: exactly these two are outliers
    assert outlier_ratio([scores[:50], scores[50:]], 5.0) == pytest.approx(0.02)


# --------------------------------------------------------------------------- mask selection


def stable_sort_reference(scores, n_prune, keep):
    """The definition: per row, prune the n lowest in (score, position) order; keep's zeros first."""
    if keep is not None:
        scores = scores.masked_fill(~keep, -math.inf)
    order = torch.argsort(scores, dim=1, stable=True)
    kept_in_order = torch.arange(scores.shape[1])[None, :] >= n_prune[:, None]
    return torch.empty_like(scores, dtype=torch.bool).scatter_(1, order, kept_in_order)


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("with_keep", [True, False])
def test_prune_lowest_equals_a_stable_sort_with_ties(uniform, with_keep):
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        rows, cols = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
        scores = torch.randint(0, 5, (rows, cols), generator=gen).float()  # many ties
        keep = torch.rand(rows, cols, generator=gen) > 0.3 if with_keep else None
        forced = torch.zeros(rows, dtype=torch.long) if keep is None else (~keep).sum(1)
        if uniform:
            n = int(torch.randint(int(forced.max()), cols + 1, (1,), generator=gen))
            n_prune = torch.full((rows,), n)
        else:
            n_prune = torch.stack([torch.randint(int(f), cols + 1, (1,), generator=gen)[0] for f in forced])
        expected = stable_sort_reference(scores, n_prune, keep)
        assert torch.equal(_prune_lowest(scores, n_prune, keep), expected)


@pytest.mark.parametrize(("dtype", "rel"), [(F64, 1e-9), (torch.float32, 1e-3)])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_error_from_the_sweep_equals_reconstruction_error(dtype, rel, structure):
    """SparseGPT's reported error comes from the sweep's OBS losses; it must be the defined one."""
    X = correlated_inputs(64, 512, seed=5, dtype=dtype)
    X[3] = 0  # a dead input: zeroed weight, H_jj set to 1 inside
    H, W = hessian(X), random_weight(48, 64, seed=6, dtype=dtype)
    keep = torch.rand(48, 64, generator=torch.Generator().manual_seed(7)) > 0.2
    cfg = PruneConfig(method="sparsegpt", sparsity=0.5, structure=structure, block_size=16, dampening=0.05)
    result = prune_linear(W, H, cfg, keep_mask=keep)
    assert result.error == pytest.approx(reconstruction_error(W, result.weight, H), rel=rel)
    assert 0 < result.error < 1


def test_factorisation_in_place_equals_the_out_of_place_calls_and_leaves_h_unchanged():
    """Bitwise, layout included: the sweep's rounding (so the masks) depends on U's memory layout."""
    X = correlated_inputs(96, 400, seed=8, dtype=torch.float32)
    H = hessian(X)
    before = H.clone()
    U, damping, retries = _inverse_hessian_cholesky(H, 0.01)
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(96)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.equal(U, expected) and U.stride() == expected.stride()
    assert torch.equal(H, before) and retries == 0
    assert damping == pytest.approx(0.01 * float(H.diagonal().mean()))
