"""Sparse CPU kernel benchmark (the harness lives in `sparsify.bench.cpu`; see its docstring).

Usage:

    python benchmarks/sparse_kernels.py OUT_DIR [--quick] [--threads 2] [--checkpoint DIR]
"""

from sparsify.bench.cpu import main

if __name__ == "__main__":
    main()
