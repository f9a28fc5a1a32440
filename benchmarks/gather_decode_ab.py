"""Decode with and without the AVX2 gather index, alternated in one run.

    python benchmarks/gather_decode_ab.py OUT_DIR [--layers 2] [--rounds 6] [--steps 10] [--threads 2]

The AVX2 W8A8 and W4A8 kernels gather x by a column index below 8 rows of x (``ops.for_isa`` adds it
where the kernels run AVX2, from ``ops.GATHER_MIN_SPARSITY`` on). This measures what that does to a decode
step: the Llama-2-7B-shaped model of the decode benchmark (``sparsify.bench.cpu.build_decode_model``,
70% per-row pruning, random weights) made 70% INT8 and 70% INT4 (W4A8, groups of 128), both with an
INT8 lm_head, each once with the index and once with it dropped (the bitmask kernels). Rounds of ``steps``
greedy decode steps alternate over the four models, order reversed every round; reported: median
ms/token (decoder + lm_head) with its standard error, the ratio, and whether both builds of a model
produce the same tokens. Must run on the AVX2 path (an AVX2-only CPU, or ``SPARSELLAMA_ISA=avx2``
with torch capped too: see sparsify/bench/cpu.py). Writes ``OUT_DIR/gather_decode_ab.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsify.bench.cpu import _decode_steps, build_decode_model, machine_info, median_se  # noqa: E402
from sparsify.inference.kernels import ops  # noqa: E402
from sparsify.inference.runtime import SparseLinear, sparsify_model  # noqa: E402

logger = logging.getLogger("gather_decode_ab")
PROMPT = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975]])


def build_models(base: torch.nn.Module, group_size: int | None) -> dict[str, torch.nn.Module]:
    """``{"int8/expand", "int8/gather", "int4/expand", "int4/gather"}``: bf16 copies of ``base`` on the sparse
    kernels, with an INT8 lm_head; the "expand" ones are the "gather" ones with the index dropped."""
    models = {}
    for kind in ("int8", "int4"):
        gather = copy.deepcopy(base).to(torch.bfloat16)
        sparsify_model(gather, int8=kind == "int8", int4=kind == "int4", group_size=group_size, lm_head=True)
        expand = copy.deepcopy(gather)
        indexed = 0
        for layer in expand.modules():
            if isinstance(layer, SparseLinear) and layer.packed.columns is not None:
                layer.packed = dataclasses.replace(layer.packed, columns=None)  # back to the bitmask kernels
                indexed += 1
        if not indexed:
            raise RuntimeError(f"{kind}: no layer holds the gather index (is the AVX2 path selected?)")
        models[f"{kind}/expand"], models[f"{kind}/gather"] = expand, gather
    return models


def run(layers: int = 2, rounds: int = 6, steps: int = 10, prompt: torch.Tensor = PROMPT, **dims) -> dict:
    if ops.kernel_isa() != "avx2":
        raise SystemExit(f"the kernels run {ops.kernel_isa()!r} here; the gather index is AVX2's (see the docstring)")
    base = build_decode_model(layers=layers, **dims)
    width = (base.config.hidden_size, base.config.intermediate_size)
    models = build_models(base, 128 if all(w % 128 == 0 for w in width) else None)
    for m in models.values():
        _decode_steps(m, prompt, 2)  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in models}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        for k in list(models) if r % 2 == 0 else list(reversed(models)):
            body, head, tokens[k] = _decode_steps(models[k], prompt, steps)
            samples[k] += [(b + h) * 1e3 for b, h in zip(body, head, strict=True)]
    rows = {}
    for kind in ("int8", "int4"):
        e, g = samples[f"{kind}/expand"], samples[f"{kind}/gather"]
        rows[kind] = {
            "expand_ms": statistics.median(e),
            "expand_ms_se": median_se(e),
            "gather_ms": statistics.median(g),
            "gather_ms_se": median_se(g),
            "speedup": statistics.median(e) / statistics.median(g),
            "same_tokens": tokens[f"{kind}/expand"] == tokens[f"{kind}/gather"],
        }
        logger.info(
            "%s + INT8 lm_head: bitmask %.2f ± %.2f, gather index %.2f ± %.2f ms/token, x%.2f, same tokens: %s",
            kind, rows[kind]["expand_ms"], rows[kind]["expand_ms_se"], rows[kind]["gather_ms"],
            rows[kind]["gather_ms_se"], rows[kind]["speedup"], rows[kind]["same_tokens"],
        )  # fmt: skip
    return {"machine": machine_info(), "layers": layers, "rounds": rounds, "steps": steps, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.layers, args.rounds, args.steps)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gather_decode_ab.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
