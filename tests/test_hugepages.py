"""Packed weights in transparent huge pages (sparsify/inference/kernels/hugepages.py) and its A/B benchmark."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sparsify.inference.kernels import load_extension, pack, sparse_linear
from sparsify.inference.kernels.hugepages import HUGE_PAGE, in_huge_pages, packed_in_huge_pages
from sparsify.inference.kernels.ops import for_isa, kernel_isa
from tests.conftest import REPO

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_ON = THP.exists() and ("[always]" in THP.read_text() or "[madvise]" in THP.read_text())


def _smaps_field(address: int, field: str) -> str | None:
    """``field`` of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.bfloat16, torch.int64])
def test_in_huge_pages_copies_exactly_and_leaves_small_tensors(dtype):
    size = torch.empty(0, dtype=dtype).element_size()
    big = torch.randint(-100, 100, (3 * HUGE_PAGE // size + 5,)).to(dtype)  # not a whole number of huge pages
    moved = in_huge_pages(big)
    assert moved.dtype == dtype and moved.shape == big.shape and torch.equal(moved, big)
    small = torch.arange(1000).to(dtype)
    assert in_huge_pages(small) is small
    strided = big[::2]
    assert in_huge_pages(strided) is strided  # only contiguous tensors move
    if sys.platform.startswith("linux"):
        assert moved.data_ptr() != big.data_ptr() and moved.data_ptr() % HUGE_PAGE == 0
        if THP_ON:  # the advice took: the mapping is eligible for huge pages, whether or not the OS had any free
            assert _smaps_field(moved.data_ptr(), "THPeligible") == "1"
        del big
        moved += 0  # still valid memory after the source is gone (the tensor keeps its mapping alive)


@pytest.mark.skipif(load_extension() is None, reason="no compiled kernels here")
def test_moved_weights_give_the_same_results():
    """for_isa moves a big weight's streamed tensors and the kernels compute the same outputs, bit for bit;
    a tiny weight comes back as the same object."""
    w = torch.randn(512, 4096)
    w[torch.rand_like(w) < 0.5] = 0  # values ~1 M int8 codes + a 256 KB mask: the values move
    for kwargs in ({"dtype": torch.int8}, {"dtype": torch.bfloat16}, {"dtype": torch.int4, "group_size": 128}):
        p = pack(w, **kwargs)
        moved = packed_in_huge_pages(pack(w, **kwargs))
        if sys.platform.startswith("linux") and p.values.numel() * p.values.element_size() >= HUGE_PAGE:
            assert moved.values.data_ptr() % HUGE_PAGE == 0
        x = torch.randn(3, 4096)
        assert torch.equal(sparse_linear(x, moved), sparse_linear(x, p))
        assert torch.equal(sparse_linear(x, for_isa(p, kernel_isa())), sparse_linear(x, p))
    tiny = pack(torch.randn(8, 64), dtype=torch.int8)
    assert packed_in_huge_pages(tiny) is tiny


@pytest.mark.skipif(load_extension() is None, reason="no compiled kernels here")
def test_hugepages_ab_bookkeeping(tmp_path):
    spec = importlib.util.spec_from_file_location("hugepages_ab", REPO / "benchmarks" / "hugepages_ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    result = ab.main([str(tmp_path), "--layers", "64x128:0.5", "--formats", "int8", "bf16", "--repeats", "2"])
    saved = json.loads((tmp_path / "hugepages_ab.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 2
    for row in saved["rows"]:
        assert row["4k_ms"] > 0 and row["huge_ms"] > 0
        assert row["speedup"] == pytest.approx(row["4k_ms"] / row["huge_ms"])
    assert saved["machine"]["cpu_isa"]
