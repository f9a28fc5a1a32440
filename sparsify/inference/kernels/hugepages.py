"""Packed weights in transparent huge pages (Linux), so the kernels stream them with fewer TLB misses.

A decode step streams every weight once, row after row; with 4 KB pages each 4 KB of a weight is a
new page, and the hardware prefetchers stop at page boundaries. Measured on Zen 4 with the copies
alternated in one process (``benchmarks/hugepages_ab.py``, docs/results.md): a 70% 11008x4096 W8A8
layer 1.07-1.10x faster from 2 MB pages on the AVX2 path and 1.32x on AVX-512, the dense 32000x4096
W8A8 lm_head 1.3x on both; nothing measured slower beyond noise.

Huge pages come at first touch, in memory advised ``MADV_HUGEPAGE`` (THP ``madvise`` or ``always``)
before anything was written to it. Memory from the allocator may already be touched (glibc serves
requests below its dynamic mmap threshold, up to 32 MB, from the heap), so a tensor is copied into a
fresh anonymous mapping instead, and only the whole 2 MB pages inside it are advised: a tensor never
holds more resident memory than its bytes. Elsewhere (not Linux, THP absent, tensors under 2 MB) the
tensors are returned as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import mmap
import sys

import torch
from torch import Tensor

from sparsify.inference.kernels.format import PackedWeight

HUGE_PAGE = 2 << 20
STREAMED = ("values", "bitmask", "columns")  # the PackedWeight tensors a kernel call reads through
_MADV_HUGEPAGE = 14  # linux/mman.h


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def in_huge_pages(t: Tensor) -> Tensor:
    """``t`` (contiguous, CPU) copied into fresh memory whose whole 2 MB pages are advised ``MADV_HUGEPAGE``;
    ``t`` itself where that does not apply (see the module docstring). Same dtype, shape and values."""
    n = t.numel() * t.element_size()
    if _madvise is None or n < HUGE_PAGE or t.device.type != "cpu" or not t.is_contiguous():
        return t
    # Private and anonymous (Python's default, MAP_SHARED, is shmem: no THP there), untouched; the tensor
    # below keeps it alive.
    buffer = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    start = -address % HUGE_PAGE  # the first 2 MB boundary: the tensor starts there
    if _madvise(address + start, n // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE) != 0:
        return t  # THP not built into this kernel: 4 KB pages it is
    out = torch.frombuffer(buffer, dtype=torch.uint8, count=n, offset=start)
    out.copy_(t.reshape(-1).view(torch.uint8))
    return out.view(t.dtype).view(t.shape)


def packed_in_huge_pages(packed: PackedWeight) -> PackedWeight:
    """``packed`` with the tensors a kernel call streams (values, mask, gather index) in huge pages;
    ``packed`` itself if none qualifies."""
    moved = {name: in_huge_pages(t) for name in STREAMED if (t := getattr(packed, name)) is not None}
    moved = {name: t for name, t in moved.items() if t is not getattr(packed, name)}
    return dataclasses.replace(packed, **moved) if moved else packed
