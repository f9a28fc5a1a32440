"""Pruning-method comparison: magnitude vs Wanda vs SparseGPT at 50%, 70% and 2:4.

Prunes the pipeline's dense base model (from `models/base` under the project root)
with each method and pattern, on the data stage's calibration set, and reports
validation perplexity and wall time. Writes `reports/prune_methods.{json,md}`.

    python benchmarks/prune_methods.py [--root .] [--profile smoke] [--set KEY=VALUE ...]

Run it alone: wall times are only comparable when nothing else uses the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch

from sparsify.config import load_config
from sparsify.data import Corpus
from sparsify.io import atomic_write_json, atomic_write_text
from sparsify.layerwise import prune_model
from sparsify.masks import sparsity_report
from sparsify.metrics import mean_nll
from sparsify.model import load_model
from sparsify.pruning import PruneConfig

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ((0.5, "unstructured"), (0.7, "unstructured"), (0.5, "2:4"))


def run(root: Path, base_cfg: PruneConfig, eval_blocks: int) -> dict:
    corpus = Corpus.open(root / "data" / "corpus")
    calib, val = corpus.calibration(), corpus.blocks("val")
    dense = load_model(root / "models" / "base")
    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "seconds": 0.0,
             "ppl": math.exp(mean_nll(dense, val, max_blocks=eval_blocks))}]
    for sparsity, structure in PATTERNS:
        for method in METHODS:
            cfg = PruneConfig.model_validate({**base_cfg.model_dump(), "method": method, "sparsity": sparsity,
                                              "structure": structure, "owl": False})
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            prune_model(model, calib, cfg, progress=False)
            seconds = time.perf_counter() - t0
            ppl = math.exp(mean_nll(model, val, max_blocks=eval_blocks))
            pattern = structure if structure != "unstructured" else f"{sparsity:.0%}"
            rows.append({"method": method, "pattern": pattern, "sparsity": sparsity_report(model)["global"],
                         "seconds": seconds, "ppl": ppl})
            logging.info("%-9s %-4s ppl %8.2f  %.2f s", method, pattern, ppl, seconds)
    return {"rows": rows, "machine": {"cpu": platform.processor() or platform.machine(),
                                      "threads": torch.get_num_threads()},
            "calibration": list(calib.shape), "eval_blocks": eval_blocks,
            "model_params_m": sum(p.numel() for p in dense.parameters()) / 1e6}


def markdown(result: dict) -> str:
    lines = ["| method | pattern | sparsity | val ppl | wall time (s) |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | {r['seconds']:.2f} |")
    head = (f"Pruning the base model ({result['model_params_m']:.1f}M params), calibration "
            f"{result['calibration'][0]}×{result['calibration'][1]} tokens, perplexity on "
            f"{result['eval_blocks']} validation blocks, {result['machine']['threads']} threads.\n\n")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.profile, overrides=args.overrides)
    result = run(cfg.root, cfg.prune, cfg.base.train.eval_blocks)
    out = cfg.root / "reports"
    atomic_write_json(out / "prune_methods.json", result)
    atomic_write_text(out / "prune_methods.md", markdown(result))
    print(markdown(result))  # noqa: T201  (a script's report on stdout)
    print(json.dumps({"written": [str(out / "prune_methods.json"), str(out / "prune_methods.md")]}))  # noqa: T201


if __name__ == "__main__":
    main()
