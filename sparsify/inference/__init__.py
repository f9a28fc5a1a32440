"""Inference: sparse CPU kernels and runtime, export and loading, the decode engine and server."""
