"""Pruning-method comparison: magnitude, Wanda, SparseGPT (± OWL), ADMM (± OWL), refinement at 50%, 70% and 2:4.

Prunes the pipeline's dense base model (from `models/base` under the project root)
with each method and pattern, on the data stage's calibration set, and reports
validation perplexity and wall time. Writes `reports/prune_methods.{json,md}` (or `--out
NAME.{json,md}`; and, as the `prune-sweep` flow whose step it runs, each point to
`reports/sweep/`). Methods are the sweep's: a `prune.method` with optional "+owl" / "+refine"
(OWL rows are unstructured only).

    python benchmarks/prune_methods.py [--profile smoke] [--set KEY=VALUE ...] [--methods admm admm+owl ...]
        [--patterns 70% 2:4] [--out reports/owl_grid/l0.04_m5]

Run it alone: wall times are only comparable when nothing else uses the cores.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from sparsify.bench.cpu import machine_info
from sparsify.checkpoint import load_model
from sparsify.data.corpus import Corpus
from sparsify.io import atomic_write_json, atomic_write_text
from sparsify.model import pick_device
from tasks.common import val_perplexity
from tasks.config import Config, load_config
from tasks.stages import BASE
from tasks.sweep import points, prune_point

METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt+owl", "admm", "admm+owl", "sparsegpt+refine", "admm+refine")
PATTERNS = {"50%": (0.5, "unstructured"), "70%": (0.7, "unstructured"), "2:4": (0.5, "2:4")}


def run(cfg: Config, methods: tuple[str, ...] = METHODS, patterns: tuple[str, ...] = tuple(PATTERNS)) -> dict:
    """Every method at every pattern, each point pruned and scored by the `prune-sweep` flow's
    own step (tasks.sweep.prune_point: validation perplexity on evaluate.val_blocks)."""
    corpus = Corpus.open(cfg.root / "data" / "corpus")
    dense = load_model(cfg.root / BASE, dtype=torch.float32)
    rows = [
        {
            "method": "dense",
            "pattern": "-",
            "sparsity": 0.0,
            "seconds": 0.0,
            "ppl": val_perplexity(cfg, dense, corpus, pick_device(cfg.project.device)),
        }
    ]
    for pattern in patterns:
        sparsity, structure = PATTERNS[pattern]
        for point in points(list(methods), [sparsity], [structure]):
            m = prune_point(cfg, point=point, source=BASE).metrics
            rows.append(
                {
                    "method": point.method,
                    "pattern": pattern,
                    "sparsity": m["sparsity/global"],
                    "seconds": m["time/prune_s"],
                    "ppl": m["ppl/val"],
                }
            )
            logging.info("%-16s %-4s ppl %8.2f  %.2f s", point.method, pattern, m["ppl/val"], m["time/prune_s"])
    return {
        "rows": rows,
        "machine": machine_info(),
        "calibration": list(corpus.calibration().shape),
        "eval_blocks": cfg.evaluate.val_blocks,
        "model_params_m": sum(p.numel() for p in dense.parameters()) / 1e6,
    }


def markdown(result: dict) -> str:
    lines = ["| method | pattern | sparsity | val ppl | wall time (s) |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | {r['seconds']:.2f} |")
    head = (
        f"Pruning the base model ({result['model_params_m']:.1f}M params), calibration "
        f"{result['calibration'][0]}×{result['calibration'][1]} tokens, perplexity on "
        f"{result['eval_blocks']} validation blocks, {result['machine']['threads']} threads on "
        f"{result['machine']['cpu_model']} ({result['machine']['cpu_isa']}).\n\n"
    )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="sweep methods, e.g. admm admm+owl")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--out", default=None, help="output path without suffix (default: reports/prune_methods)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # OWL only where a method asks for it ("+owl"): the others prune every layer to the same sparsity.
    cfg = load_config(args.config, args.profile, overrides=[*args.overrides, "prune.owl=false"])
    result = run(cfg, tuple(args.methods), tuple(args.patterns))
    result["settings"] = {"overrides": args.overrides, "methods": args.methods, "patterns": args.patterns}
    out = Path(args.out) if args.out else cfg.root / "reports" / "prune_methods"
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, markdown(result))
    print(markdown(result))  # noqa: T201  (a script's report on stdout)
    print(json.dumps({"written": [str(json_path), str(md_path)]}))  # noqa: T201


if __name__ == "__main__":
    main()
