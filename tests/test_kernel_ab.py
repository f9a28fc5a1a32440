"""benchmarks/kernel_ab.py's bookkeeping on a tiny weight, with the current build on both sides
(compiling a second revision takes ~30 s: that path runs by hand, see the script's docstring)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from sparsify.inference.kernels import load_extension, pack
from sparsify.inference.kernels.loader import ISA_NAMES, available_isa
from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("kernel_ab", REPO / "benchmarks" / "kernel_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(load_extension() is None, reason="no compiled kernels here")
def test_compare_times_both_builds_and_refuses_disagreeing_ones():
    ab = _script()
    w = torch.randn(24, 128)
    w[w.abs() < 0.8] = 0
    packed = [pack(w, dtype=torch.int8, act_int8=True) for _ in range(2)]
    x = torch.randn(3, 128)
    ext = load_extension()
    both = {"baseline": packed, "tree": packed}
    row = ab.compare({"baseline": ext, "tree": ext}, both, x, ISA_NAMES[available_isa()], repeats=4)
    assert row["baseline_ms"] > 0 and row["tree_ms"] > 0
    assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["tree_ms"])
    # A build that computes something else is an error, not a timing.
    wrong = SimpleNamespace(sparse_linear=lambda *a: ext.sparse_linear(*a) + 1.0)
    with pytest.raises(AssertionError, match="disagree"):
        ab.compare({"baseline": ext, "tree": wrong}, both, x, ISA_NAMES[available_isa()], repeats=2)


@pytest.mark.skipif(load_extension() is None or available_isa() < ISA_NAMES.index("avx2"), reason="no AVX2 kernels")
def test_baseline_gets_the_gather_index_only_if_its_binding_takes_it():
    """Both builds must read the same prepared weight where they can: an A/B of a gather-path build against
    a bitmask-path one measures the index, not the change (1.5x at 4096x4096, 70%, with identical code)."""
    ab = _script()
    w = torch.randn(24, 128)
    w[w.abs() < 1.2] = 0  # ~77% sparse: for_isa adds the index on AVX2
    prepared = ab.for_isa(pack(w, dtype=torch.int8, act_int8=True), "avx2")
    assert prepared.columns is not None
    ext = load_extension()
    assert ab.takes_prepared(ext, prepared, "avx2")

    def without_columns(x, bitmask, offsets, values, scales, row_sums, bias, act_int8, isa, group_size):
        return ext.sparse_linear(x, bitmask, offsets, values, scales, row_sums, bias, act_int8, isa, group_size)

    old = SimpleNamespace(sparse_linear=without_columns)  # a revision from before the index
    assert not ab.takes_prepared(old, prepared, "avx2")
    assert ab.takes_prepared(old, pack(w, dtype=torch.int8, act_int8=True), "avx2")  # nothing to refuse
