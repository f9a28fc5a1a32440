"""Sparse (+ INT8) CPU kernels for ``y = x · Wᵀ`` with W stored as per-row bitmask + packed values.

* :mod:`~sparsify.inference.kernels.format` — :func:`pack` / :func:`unpack` and :class:`PackedWeight`.
* :mod:`~sparsify.inference.kernels.ops` — :func:`sparse_linear` (kernels with a pure-torch fallback).
* :mod:`~sparsify.inference.kernels.loader` — builds the C++/OpenMP extension once (JIT, cached).

:mod:`sparsify.inference.runtime` wraps these in ``SparseLinear`` and swaps them into a model.
"""

from sparsify.inference.kernels.format import PackedWeight, dequantize, pack, quantize_rows, unpack
from sparsify.inference.kernels.loader import build_directory, load_extension
from sparsify.inference.kernels.ops import kernel_isa, quantize_activations, sparse_linear, torch_sparse_linear

__all__ = [
    "PackedWeight",
    "build_directory",
    "dequantize",
    "kernel_isa",
    "load_extension",
    "pack",
    "quantize_activations",
    "quantize_rows",
    "sparse_linear",
    "torch_sparse_linear",
    "unpack",
]
