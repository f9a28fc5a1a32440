"""Benchmarks: sparse CPU kernels and decode (cpu), 2:4 semi-structured sparsity on a GPU (gpu)."""
