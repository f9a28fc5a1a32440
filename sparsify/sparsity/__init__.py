"""Pruning: one-layer algorithms (SparseGPT, Wanda, ADMM, ...), the layer-wise driver, masks as data."""
