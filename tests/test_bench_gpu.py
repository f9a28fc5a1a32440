"""The GPU benchmark's 2:4 pruning (brute force on a tiny case) and its CUDA-only run."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsify.bench.gpu import _int4_pack_cuda, _variant, flat_gpu_metrics, prune_2of4, run_gpu_layer_benchmark
from sparsify.quant.grids import fake_quantize_per_token


def test_prune_2of4_keeps_the_two_largest_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    got = prune_2of4(w)
    for r, g in itertools.product(range(6), range(4)):
        group, kept = w[r, 4 * g : 4 * g + 4], got[r, 4 * g : 4 * g + 4]
        # brute force: the pair of positions with the largest total magnitude
        best = max(itertools.combinations(range(4), 2), key=lambda p: group[list(p)].abs().sum())
        expect = torch.zeros(4)
        expect[list(best)] = group[list(best)]
        assert torch.equal(kept, expect)
    assert (got != 0).sum() == w.numel() // 2
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_2of4(torch.randn(2, 6))


def test_int8_variant_uses_the_project_grids():
    """The GPU INT8 variant quantizes on sparsify.quant.grids' grids (per-row weights, compressed-tensors'
    per-token activations), like the CPU kernels and the quantize stage; torch._int_mm also runs on the CPU."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 64, generator=g), torch.randn(5, 64, generator=g)
    call, ref, weight_bytes, rows = _variant("torch_int8", w, x)
    ws = w.abs().amax(1, keepdim=True) / 127
    grid_ref = fake_quantize_per_token(x) @ (torch.round(w / ws) * ws).t()
    torch.testing.assert_close(ref, grid_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call()[:5], ref, rtol=1e-5, atol=1e-5)
    assert weight_bytes == w.numel() and rows >= 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_the_gpu_benchmark_is_skipped():
    assert run_gpu_layer_benchmark() is None and flat_gpu_metrics(None) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_benchmark_runs_and_every_variant_matches_its_reference():
    result = run_gpu_layer_benchmark([(1024, 1024)], [1, 64], repeats=3, inner=5)
    by = {(r["variant"], r["batch"]): r for r in result["rows"]}
    assert "error" not in by[("sparse24_fp16", 64)], by[("sparse24_fp16", 64)]
    for r in result["rows"]:
        if "ms" in r:
            assert r["max_rel_err"] < 2e-2, r  # fp16/bf16/int8 rounding, never a wrong layout
            assert r["ms"] > 0
    assert "bench/gpu/1024x1024_b64/sparse24_fp16/speedup_vs_fp16" in flat_gpu_metrics(result)
    _, _, deq = _int4_pack_cuda(torch.randn(64, 256, device="cuda"))
    assert deq.shape == (64, 256)
