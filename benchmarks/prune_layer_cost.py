"""Cost of the one-layer pruning methods on one Linear: SparseGPT, ADMM, and the refinement pass.

Times :func:`sparsify.sparsity.pruning.prune_linear` on a random ``OUT x IN`` weight with the Hessian of
correlated calibration inputs (``IN/8`` latent factors plus noise: SparseGPT's and ADMM's work
does not depend on the values, only the errors do), at one sparsity, each variant ``--repeats``
times alternated (medians), and writes ``OUT_DIR/prune_layer_cost.{json,md}`` with the CPU model,
its ISA and the fp32 GEMM rate measured alongside (the unit the methods' flop counts convert with).

    python benchmarks/prune_layer_cost.py OUT_DIR [--shape 4096x11008] [--sparsity 0.7] [--repeats 1]
        [--variants sparsegpt admm sparsegpt+refine admm+refine]

Run it alone: wall times are only comparable when nothing else uses the cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from sparsify.bench.cpu import cpu_isa, cpu_model
from sparsify.io import atomic_write_json, atomic_write_text
from sparsify.sparsity.pruning import PruneConfig, prune_linear

log = logging.getLogger("prune_layer_cost")

VARIANTS = {
    "sparsegpt": {"method": "sparsegpt"},
    "admm": {"method": "admm"},
    "sparsegpt+refine": {"method": "sparsegpt", "refine": True},
    "admm+refine": {"method": "admm", "refine": True},
}


def gemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    """fp32 n×n×n matmul rate (median of ``repeats``): what an out·in² flop term costs here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, MKL dispatch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def problem(out: int, inp: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = 4096
    X = torch.randn(inp, max(inp // 8, 1), generator=g) @ torch.randn(max(inp // 8, 1), tokens, generator=g)
    X += 0.3 * torch.randn(inp, tokens, generator=g)
    return torch.randn(out, inp, generator=g) * 0.02, 2 * X @ X.T / tokens


def run(out: int, inp: int, sparsity: float, repeats: int, variants: list[str]) -> dict:
    W, H = problem(out, inp)
    rate = gemm_gflops()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    errors: dict[str, float] = {}
    for _ in range(repeats):
        for name in variants:
            fields = VARIANTS[name]
            start = time.perf_counter()
            result = prune_linear(W, H, PruneConfig(sparsity=sparsity, **fields))
            seconds[name].append(time.perf_counter() - start)
            errors[name] = result.error
            log.info("%-17s %.2f s, relative error %.5f", name, seconds[name][-1], result.error)
    base = statistics.median(seconds["sparsegpt"])
    rows = [
        {
            "variant": name,
            "seconds": statistics.median(s),
            "vs_sparsegpt": statistics.median(s) / base,
            "error": errors[name],
        }
        for name, s in seconds.items()
    ]
    return {
        "shape": [out, inp],
        "sparsity": sparsity,
        "repeats": repeats,
        "rows": rows,
        "config": PruneConfig(method="admm").model_dump(
            include={"admm_iterations", "admm_rho", "admm_rho_growth", "cg_iterations", "refine_iterations"}
        ),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_isa": cpu_isa(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gemm_fp32_gflops": rate,
        },
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    out, inp = result["shape"]
    head = (
        f"One {out}×{inp} Linear at {result['sparsity']:.0%}, {m['threads']} threads on {m['cpu_model']} "
        f"({m['cpu_isa']}), fp32 GEMM {m['gemm_fp32_gflops']:.0f} GFLOP/s, median of {result['repeats']}."
    )
    lines = [head, "", "| variant | seconds | × SparseGPT | relative error |", "|---|---:|---:|---:|"]
    lines += [
        f"| {r['variant']} | {r['seconds']:.2f} | {r['vs_sparsegpt']:.1f} | {r['error']:.5f} |" for r in result["rows"]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", default="4096x11008", help="OUTxIN of the Linear (default: Llama-2-7B down_proj)")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="sparsegpt comes first whatever the order: the others are timed against it",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out, inp = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        parser.error(f"--shape must be OUTxIN, e.g. 4096x11008, got {args.shape!r}")
    result = run(out, inp, args.sparsity, args.repeats, ["sparsegpt", *(v for v in args.variants if v != "sparsegpt")])
    name = f"prune_layer_cost_{out}x{inp}"
    atomic_write_json(args.out_dir / f"{name}.json", result)
    atomic_write_text(args.out_dir / f"{name}.md", markdown(result))
    print(markdown(result))  # noqa: T201  (a script's report on stdout)
    print(json.dumps({"written": [str(args.out_dir / f"{name}.json"), str(args.out_dir / f"{name}.md")]}))  # noqa: T201


if __name__ == "__main__":
    main()
