"""Stage `benchmark`: the sparse CPU kernels against dense and torch-quantized baselines.

Per-layer timings at Llama-2-7B shapes (quick: 11008x4096 batch 1 only) and, in the full
mode, end-to-end decode on a 7B-shaped model and on the pipeline's most sparse model.
Medians of interleaved repeats; the numbers are only meaningful when nothing else runs.
"""

from __future__ import annotations

import logging

from sparsify.bench.cpu import plot, run_decode_benchmark
from sparsify.bench.cpu import run as run_benchmark
from sparsify.io import atomic_dir, atomic_write_json
from tasks.common import Layout, StageResult
from tasks.config import Config

log = logging.getLogger(__name__)


def run(cfg: Config, *, model: str) -> StageResult:
    b = cfg.benchmark
    if b.threads:
        import torch

        torch.set_num_threads(b.threads)
    result = run_benchmark(quick=b.quick, decode=b.decode, decode_layers=b.decode_layers)
    if b.decode and not b.quick:
        # The pipeline's own most sparse model, as it is (its masks' zeros), dense vs sparse variants.
        result["decode_pipeline_model"] = run_decode_benchmark(Layout.of(cfg).model(model))
    out = Layout.of(cfg).reports / "benchmark"
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "sparse_kernels.json", result)
        plot(result, tmp / "sparse_kernels.png")
    metrics = dict(result["metrics"])
    stream = result["layers"]["stream"]["gbps"]
    metrics["bench/cpu/stream_gbps"] = stream
    log.info("benchmark: %s", {k: round(v, 3) for k, v in metrics.items() if "speedup" in k})
    # Every figure is only meaningful with the machine and kernel path it ran on.
    machine = result["machine"]
    keys = ("kernels", "cpu_model", "cpu_isa", "isa_caps", "capability", "threads")
    params = {f"bench.{k}": str(machine[k]) for k in keys}
    return StageResult(
        metrics=metrics,
        outputs=[out],
        variant="all",
        params=params,
        artifacts=[out / "sparse_kernels.json", out / "sparse_kernels.png"],
    )
