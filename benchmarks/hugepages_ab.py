"""A/B of a packed weight in 4 KB pages against the same weight in transparent huge pages, same kernels.

    python benchmarks/hugepages_ab.py OUT_DIR [--isa avx2] [--layers 32000x4096:0 11008x4096:0.7]
                                      [--formats int8 int4 bf16] [--batches 1] [--repeats 15]

The runtime (``ops.for_isa``) moves every weight's streamed tensors into huge pages where the OS
offers them (sparsify/inference/kernels/hugepages.py). Here each layer is prepared as the runtime
prepares it, and its 4 KB twin is a clone of those tensors through torch's allocator; copies
totalling more than the L3 are cycled, and the two arms alternate call by call
(``kernel_ab.compare``, one build on both sides). Reported: medians, standard errors and the ratio
4 KB / huge (> 1: huge pages are faster), with ``AnonHugePages`` from /proc/meminfo before and after
the huge arm was built (0 growth: the OS gave none, and the A/B compares 4 KB with 4 KB).

Writes ``OUT_DIR/hugepages_ab.json`` with the machine record (CPU model, ISA, caps). Run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from kernel_ab import FORMATS, compare  # noqa: E402

from sparsify.bench.cpu import ROTATE_BYTES, machine_info, prune_rows  # noqa: E402
from sparsify.inference.kernels import loader  # noqa: E402
from sparsify.inference.kernels.format import PackedWeight, pack  # noqa: E402
from sparsify.inference.kernels.hugepages import STREAMED  # noqa: E402
from sparsify.inference.kernels.ops import for_isa  # noqa: E402

logger = logging.getLogger("hugepages_ab")


def anon_huge_kb() -> int | None:
    """AnonHugePages from /proc/meminfo (kB), or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def four_k_twin(packed: PackedWeight) -> PackedWeight:
    """``packed`` with its streamed tensors cloned through torch's allocator (4 KB pages unless THP is
    ``always``)."""
    fields = {n: t.clone() for n in STREAMED if (t := getattr(packed, n)) is not None}
    return dataclasses.replace(packed, **fields)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--isa", choices=loader.ISA_NAMES, default=None, help="kernel path (default: the best)")
    parser.add_argument("--layers", nargs="+", default=["32000x4096:0", "11008x4096:0.7"], help="OUTxIN:SPARSITY")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=["int8", "int4", "bf16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ext = loader.load_extension()
    if ext is None:
        raise SystemExit("the kernels could not be built here")
    isa = args.isa or loader.ISA_NAMES[loader.available_isa()]
    rows = []
    for spec in args.layers:
        shape, _, fraction = spec.partition(":")
        out, inn = (int(d) for d in shape.split("x"))
        sparsity = float(fraction or 0)
        torch.manual_seed(0)
        weight = torch.randn(out, inn) / inn**0.5
        weight = prune_rows(weight, sparsity) if sparsity else weight
        for fmt in args.formats:
            arms = huge = None  # the previous arms' pages go back before the count below
            first = pack(weight, **FORMATS[fmt])
            n = max(2, -(-ROTATE_BYTES // first.nbytes))
            before = anon_huge_kb()
            huge = [for_isa(p, isa) for p in [first] + [pack(weight, **FORMATS[fmt]) for _ in range(n - 1)]]
            after = anon_huge_kb()
            arms = {"4k": [four_k_twin(p) for p in huge], "huge": huge}
            for batch in args.batches:
                row = {"shape": [out, inn], "sparsity": sparsity, "format": fmt, "batch": batch}
                row |= compare({"4k": ext, "huge": ext}, arms, torch.randn(batch, inn), isa, args.repeats)
                row["anon_huge_kb_gained"] = None if before is None else after - before
                logger.info(
                    "%-10s %3.0f%% %-5s b=%-2d 4k %7.3f ms  huge %7.3f ms  x%.2f  (+%s kB huge pages)",
                    shape, 100 * row["sparsity"], fmt, batch, row["4k_ms"], row["huge_ms"], row["speedup"],
                    row["anon_huge_kb_gained"],
                )  # fmt: skip
                rows.append(row)
    result = {"machine": machine_info(), "isa": isa, "repeats": args.repeats, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "hugepages_ab.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
