"""Paired perplexity: several checkpoints on the same validation blocks, each against a reference.

Every stage logs ``ppl/val`` on the first ``evaluate.val_blocks`` blocks, enough to follow a run
but not to tell two close models apart. This scores every model on all of a corpus's validation
blocks and reports, for each model against the reference, the mean per-token NLL difference and
its standard error over blocks (the blocks are the paired unit: the same text for both models).
The SE is evaluation noise only; another training seed can move a model further.

Usage:

    python benchmarks/paired_ppl.py OUT.json --corpus ROOT/data/corpus --reference DIR NAME=DIR ...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from sparsify.bench.cpu import machine_info
from sparsify.checkpoint import load_model
from sparsify.data.corpus import Corpus
from sparsify.evaluation.metrics import token_nll
from sparsify.io import atomic_write_json


def block_nll(path: Path, blocks: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean next-token NLL of each validation block under the checkpoint at `path`."""
    model = load_model(path, torch.float32)
    return token_nll(model, blocks, batch_size=batch_size).mean(axis=1)


def paired(models: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, dict[str, float]]:
    """Per model: its perplexity and its NLL difference to the reference with the SE over blocks."""
    out = {}
    for name, nll in models.items():
        diff = nll - reference
        out[name] = {
            "ppl": math.exp(nll.mean()),
            "nll_minus_reference": float(diff.mean()),
            "se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--corpus", type=Path, required=True, help="the data stage's corpus folder")
    parser.add_argument("--reference", type=Path, required=True, help="the checkpoint every model is compared to")
    parser.add_argument("models", nargs="+", help="NAME=CHECKPOINT_DIR")
    parser.add_argument("--blocks", type=int, default=None, help="the first N validation blocks (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    named = dict(m.split("=", 1) for m in args.models)
    blocks = Corpus.open(args.corpus).blocks("val")[: args.blocks]
    reference = block_nll(args.reference, blocks, args.batch_size)
    result = {
        "machine": machine_info(),
        "blocks": int(len(blocks)),
        "block_size": int(blocks.shape[1]),
        "reference": {"path": str(args.reference), "ppl": math.exp(reference.mean())},
        "models": paired({n: block_nll(Path(p), blocks, args.batch_size) for n, p in named.items()}, reference),
        "paths": named,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
