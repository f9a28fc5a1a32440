"""A/B of two builds of the sparse CPU kernels: a git revision's against the working tree's, same run.

    python benchmarks/kernel_ab.py OUT_DIR --baseline REV [--isa avx2] [--threads 2]
                                   [--formats int8 int4 bf16 w8a16] [--sparsities 0.7]
                                   [--batches 1 2 4] [--shape 11008x4096] [--repeats 15]
                                   [--tree-outer-from M]

A kernel change is judged against the code it replaces, on the same machine, in the same minutes:
this machine's speed drifts by tens of percent between runs. The baseline's kernel sources
(``git show REV:sparsify/inference/kernels/...``) are compiled into their own extension module next
to the working tree's; both are called through the same binding (``sparse_linear``; the two
revisions must agree on its signature) on the same packed weights, each with the runtime's preparation
for the ISA (the AVX2 gather index) where its binding takes it. Per format, sparsity and batch:
both results are checked against each other first (a fast wrong kernel is not a result), then the
two builds alternate call by call, order swapped every repeat, each call reading a different copy of
the weight (copies totalling more than the L3, as decode streams its weights from DRAM). Reported:
medians, their standard errors, and the ratio baseline / working tree (> 1: the change is faster).

``--tree-outer-from M`` makes the working tree's build send every batch of at least M rows of x to
the outer-product kernel (outer.h) whatever the format and ISA (the binding's benchmark override),
while the baseline keeps its built-in choice: with ``--baseline HEAD`` that measures where the
outer-product kernel overtakes the expanding one.

Writes ``OUT_DIR/kernel_ab.json`` with the machine record (CPU model, ISA, caps). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsify.bench.cpu import ROTATE_BYTES, machine_info, median_se, prune_rows  # noqa: E402
from sparsify.inference.kernels import loader  # noqa: E402
from sparsify.inference.kernels.format import PackedWeight, pack  # noqa: E402
from sparsify.inference.kernels.ops import call_extension, for_isa  # noqa: E402

logger = logging.getLogger("kernel_ab")

KERNEL_DIR = "sparsify/inference/kernels"
# format name → pack() arguments (INT4 in the quantize stage's groups of 128)
FORMATS = {
    "bf16": {"dtype": torch.bfloat16},
    "int8": {"dtype": torch.int8, "act_int8": True},
    "w8a16": {"dtype": torch.int8, "act_int8": False},
    "int4": {"dtype": torch.int4, "act_int8": True, "group_size": 128},
    "w4a16": {"dtype": torch.int4, "act_int8": False, "group_size": 128},
}


def build_revision(rev: str, root: Path) -> ModuleType:
    """The kernels as of git revision ``rev``, compiled into their own module under ``root``."""
    sha = subprocess.run(["git", "rev-parse", "--short=10", rev], cwd=REPO, check=True, capture_output=True, text=True)
    sha = sha.stdout.strip()
    src = root / f"src_{sha}"
    src.mkdir(parents=True, exist_ok=True)
    for name in loader.SOURCES + loader.HEADERS:
        shown = subprocess.run(["git", "show", f"{sha}:{KERNEL_DIR}/{name}"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode and name in loader.HEADERS:  # a header added after `rev`: its sources do not use it
            continue
        shown.check_returncode()
        (src / name).write_text(shown.stdout)
    return loader.compile_kernels(f"sparsellama_kernels_{sha}", src, root / f"build_{sha}")


def takes_prepared(module: ModuleType, prepared: PackedWeight, isa: str) -> bool:
    """Whether ``module``'s binding accepts what ops.for_isa added to ``prepared`` (the gather index)."""
    if prepared.columns is None:
        return True
    try:
        call_extension(module, torch.zeros(1, prepared.shape[1]), prepared, None, isa)
    except TypeError:  # pybind11: an older signature without ``columns``
        return False
    return True


def compare(
    modules: dict[str, ModuleType], packed: dict[str, list[PackedWeight]], x: torch.Tensor, isa: str, repeats: int
) -> dict:
    """Both builds on the same weights (``packed[name]``: each build's copies, which may differ only in what
    the build derives for its ISA): checked against each other, then timed alternately."""
    names = list(modules)
    ref, out = (call_extension(modules[n], x, packed[n][0], None, isa) for n in names)
    if not torch.allclose(ref, out, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-12):
        raise AssertionError(f"the builds disagree: max |diff| {float((ref - out).abs().max()):.3g}")
    times: dict[str, list[float]] = {n: [] for n in names}
    k = 0
    for rep in range(repeats):
        for n in names if rep % 2 else reversed(names):
            p = packed[n][k % len(packed[n])]
            k += 1
            t0 = time.perf_counter()
            call_extension(modules[n], x, p, None, isa)
            times[n].append((time.perf_counter() - t0) * 1e3)
    row = {f"{n}_ms": statistics.median(t) for n, t in times.items()}
    row |= {f"{n}_ms_se": median_se(t) for n, t in times.items()}
    row["speedup"] = row[f"{names[0]}_ms"] / row[f"{names[1]}_ms"]
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--baseline", required=True, help="git revision whose kernels are the baseline")
    parser.add_argument("--isa", choices=loader.ISA_NAMES, default=None, help="kernel path (default: the best)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=["int8", "int4", "bf16", "w8a16"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.7])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--shape", default="11008x4096", help="OUTxIN")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--tree-outer-from", type=int, default=0, help="the working tree's build: batches from M rows take outer.h"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    current = loader.load_extension()
    if current is None:
        raise SystemExit("the kernels could not be built here")
    isa_name = args.isa or loader.ISA_NAMES[loader.available_isa()]
    if loader.ISA_NAMES.index(isa_name) > loader.available_isa():
        raise SystemExit(f"--isa {isa_name} is not available on this CPU")
    modules = {
        "baseline": build_revision(args.baseline, loader.build_directory().parent / "kernel_ab"),
        "tree": current,
    }
    out, inn = (int(d) for d in args.shape.split("x"))
    torch.manual_seed(0)
    dense = torch.randn(out, inn) / inn**0.5
    rows = []
    current.set_outer_from(args.tree_outer_from)
    try:
        for sparsity in args.sparsities:
            weight = prune_rows(dense, sparsity) if sparsity else dense
            for fmt in args.formats:
                first = pack(weight, **FORMATS[fmt])
                n = max(2, -(-ROTATE_BYTES // first.nbytes))
                copies = [first] + [pack(weight, **FORMATS[fmt]) for _ in range(n - 1)]
                # Each build gets the runtime's preparation for this ISA (ops.for_isa: the AVX2 gather
                # index) if its binding takes it, else the plain format (revisions before the index).
                prepared = [for_isa(p, isa_name) for p in copies]
                baseline = prepared if takes_prepared(modules["baseline"], prepared[0], isa_name) else copies
                packed = {"baseline": baseline, "tree": prepared}
                for batch in args.batches:
                    row = {"format": fmt, "sparsity": sparsity, "batch": batch}
                    row |= compare(modules, packed, torch.randn(batch, inn), isa_name, args.repeats)
                    logger.info(
                        "%-6s %3.0f%% b=%-3d baseline %7.3f ms  tree %7.3f ms  x%.2f",
                        fmt, 100 * sparsity, batch, row["baseline_ms"], row["tree_ms"], row["speedup"],
                    )  # fmt: skip
                    rows.append(row)
    finally:
        current.set_outer_from(0)  # the module is shared by the whole process
    sha = subprocess.run(["git", "rev-parse", args.baseline], cwd=REPO, check=True, capture_output=True, text=True)
    result = {
        "machine": machine_info(),
        "isa": isa_name,
        "shape": [out, inn],
        "baseline": sha.stdout.strip(),
        "tree": subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "repeats": args.repeats,
        "tree_outer_from": args.tree_outer_from,
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "kernel_ab.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
