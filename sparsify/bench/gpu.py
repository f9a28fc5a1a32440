"""GPU layer benchmark: 2:4 semi-structured sparsity against dense and torch's quantized paths.

At Llama-2-7B shapes, in one run, CUDA-event medians of interleaved repeats:

* ``dense_fp16`` / ``dense_bf16`` — ``F.linear`` (cuBLAS);
* ``sparse24_fp16`` — the same weight pruned 2:4 (the 2 largest |w| of every 4 consecutive inputs)
  and compressed with ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS), the
  pattern NVIDIA's sparse tensor cores run (the paper's GPU figure: 1.7x);
* ``torch_int8`` — ``torch._int_mm`` (INT8 tensor cores, W8A8 with per-token/per-channel scales;
  it needs more than 16 rows, so smaller batches are padded to 32 and reported as such);
* ``torch_int4`` — ``torch._weight_int4pack_mm`` (weight-only INT4, group 128, bf16 activations).

Every variant's output is checked against an fp32 matmul with the weight it actually holds
(pruned and/or dequantized). A variant this torch build cannot run is reported with its error
instead of a time. Without CUDA, ``run_gpu_layer_benchmark`` returns None: the CPU benchmark
(:mod:`sparsify.bench.cpu`) is the one that runs everywhere.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify.quant.grids import activation_codes, quantize_codes, weight_scales

logger = logging.getLogger(__name__)

GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in), as in sparsify.bench.cpu
GPU_BATCHES = (1, 16, 64, 512)
GPU_VARIANTS = ("dense_fp16", "dense_bf16", "sparse24_fp16", "torch_int8", "torch_int4")
INT4_GROUP = 128
INT8_MIN_ROWS = 32  # torch._int_mm needs M > 16 (and multiples of 8)


def prune_2of4(weight: Tensor) -> Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive inputs of each row (ties: lower index)."""
    out, inn = weight.shape
    if inn % 4:
        raise ValueError(f"2:4 sparsity needs the input size to be a multiple of 4, got {inn}")
    groups = weight.reshape(out, inn // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.abs().topk(2, dim=-1, sorted=False).indices, True)
    return (groups * keep).reshape(out, inn)


def int4_groups(weight: Tensor, group: int = INT4_GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit group quantization as torch's int4mm kernels (CPU and CUDA) read it:
    (codes q in [0, 15] int32 [out, in], scales_and_zeros bf16 [groups, out, 2], dequantized fp32),
    dequantized as ``(q - 8) * scale + zero`` with the bf16-rounded scales and zeros the kernels use."""
    out, inn = weight.shape
    w = weight.float().reshape(out, inn // group, group)
    wmin, wmax = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((wmax - wmin) / 15).clamp_min(1e-6)
    q = torch.round((w - wmin) / scale).clamp(0, 15).to(torch.int32).reshape(out, inn)
    zero = wmin + 8 * scale
    sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [groups, out, 2]
    szf = sz.float().transpose(0, 1)
    deq = (q.reshape(out, -1, group) - 8) * szf[..., :1] + szf[..., 1:]
    return q, sz, deq.reshape(out, inn)


def _int4_pack_cuda(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, scales_and_zeros, dequantized fp32) for ``torch._weight_int4pack_mm``: the CUDA
    layout takes two codes per byte, high nibble first."""
    q, sz, deq = int4_groups(weight)
    q8 = q.to(torch.uint8)
    return torch._convert_weight_to_int4pack((q8[:, ::2] << 4) | q8[:, 1::2], 8), sz, deq


def _variant(name: str, w32: Tensor, x32: Tensor) -> tuple[Callable[[], Tensor], Tensor, int, int]:
    """(call, fp32 reference output, weight bytes, rows actually multiplied) for one variant."""
    rows = x32.shape[0]
    if name in ("dense_fp16", "dense_bf16"):
        dt = torch.float16 if name == "dense_fp16" else torch.bfloat16
        w, x = w32.to(dt), x32.to(dt)
        return (lambda: F.linear(x, w)), x.float() @ w.float().t(), w.numel() * w.element_size(), rows
    if name == "sparse24_fp16":
        from torch.sparse import to_sparse_semi_structured

        w24 = prune_2of4(w32).half()
        ws, x = to_sparse_semi_structured(w24), x32.half()
        # 2 of 4 fp16 values + 2-bit indices per kept value: 0.5 * 2 B + 0.5 * 0.25 B per weight
        return (lambda: F.linear(x, ws)), x.float() @ w24.float().t(), int(w24.numel() * 1.125), rows
    if name == "torch_int8":
        # The project's INT8 grids (sparsify.quant.grids): the CPU kernels' and the quantize stage's.
        ws = weight_scales(w32, 8, None)  # [out, 1]
        wq = quantize_codes(w32, ws, 8, None)
        padded = max(rows, INT8_MIN_ROWS)
        xp = torch.zeros(padded, x32.shape[1], device=x32.device)
        xp[:rows] = x32
        codes, xs = activation_codes(xp)
        xq = codes.to(torch.int8)
        wt = wq.t()  # [in, out], column-major view: the layout _int_mm wants for its second operand
        scale = xs * ws.reshape(1, -1)

        def call() -> Tensor:
            return torch._int_mm(xq, wt).float() * scale

        ref = (xq.float() * xs) @ (wq.float() * ws).t()
        return call, ref[:rows], wq.numel(), padded
    if name == "torch_int4":
        packed, sz, deq = _int4_pack_cuda(w32)
        x = x32.to(torch.bfloat16)
        return (
            (lambda: torch._weight_int4pack_mm(x, packed, INT4_GROUP, sz)),
            x.float() @ deq.t(),
            w32.numel() // 2 + sz.numel() * 2,
            rows,
        )
    raise ValueError(f"unknown GPU variant {name!r}; known: {GPU_VARIANTS}")


def _time_ms(fn: Callable[[], Tensor], inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


@torch.no_grad()
def run_gpu_layer_benchmark(
    shapes: Sequence[tuple[int, int]] = GPU_SHAPES,
    batches: Sequence[int] = GPU_BATCHES,
    variants: Sequence[str] = GPU_VARIANTS,
    repeats: int = 15,
    inner: int = 50,
    seed: int = 0,
) -> dict | None:
    """Rows of ``{shape, batch, variant, ms, speedup_vs_fp16, gbps, max_rel_err}`` (or ``error``); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for out, inn in shapes:
        w32 = torch.randn(out, inn, device=device, generator=gen) / inn**0.5
        for batch in batches:
            x32 = torch.randn(batch, inn, device=device, generator=gen)
            calls: dict[str, tuple[Callable[[], Tensor], int, int]] = {}
            for name in variants:
                try:
                    call, ref, nbytes, used_rows = _variant(name, w32, x32)
                    got = call()[:batch].float()
                    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                    for _ in range(5):  # warm-up: kernel selection, workspace allocation
                        call()
                    calls[name] = (call, nbytes, used_rows)
                    rows.append(
                        {
                            "shape": f"{out}x{inn}",
                            "batch": batch,
                            "variant": name,
                            "rows": used_rows,
                            "weight_mb": nbytes / 1e6,
                            "max_rel_err": err,
                            "times": [],
                        }
                    )
                except (RuntimeError, NotImplementedError, ImportError, AttributeError) as exc:
                    logger.warning("GPU %s %dx%d b%d: not run (%s)", name, out, inn, batch, exc)
                    rows.append(
                        {
                            "shape": f"{out}x{inn}",
                            "batch": batch,
                            "variant": name,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
            timed = {
                r["variant"]: r for r in rows if r["shape"] == f"{out}x{inn}" and r["batch"] == batch and "times" in r
            }
            for _ in range(repeats):  # interleaved: clocks and thermals drift alike for every variant
                for name, (call, _, _) in calls.items():
                    timed[name]["times"].append(_time_ms(call, inner))
            for name, r in timed.items():
                r["ms"] = statistics.median(r.pop("times"))
                r["gbps"] = calls[name][1] / (r["ms"] * 1e-3) / 1e9
                r["tflops"] = 2 * r["rows"] * out * inn / (r["ms"] * 1e-3) / 1e12
            for r in timed.values():
                for short, base in (("fp16", "dense_fp16"), ("bf16", "dense_bf16")):
                    if base in timed:
                        r[f"speedup_vs_{short}"] = timed[base]["ms"] / r["ms"]
    for r in rows:
        if "ms" in r:
            logger.info(
                "GPU %-9s b%-4d %-14s %8.4f ms  x%5.2f fp16  %7.1f GB/s  err %.1e",
                r["shape"],
                r["batch"],
                r["variant"],
                r["ms"],
                r.get("speedup_vs_fp16", float("nan")),
                r["gbps"],
                r["max_rel_err"],
            )
    props = torch.cuda.get_device_properties(device)
    return {
        "device": props.name,
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "rows": rows,
    }


def flat_gpu_metrics(result: dict | None) -> dict[str, float]:
    """``bench/gpu/<shape>_b<batch>/<variant>/{ms,speedup_vs_fp16}``."""
    metrics: dict[str, float] = {}
    for r in (result or {}).get("rows", []):
        if "ms" in r:
            key = f"bench/gpu/{r['shape']}_b{r['batch']}/{r['variant']}"
            metrics[f"{key}/ms"] = r["ms"]
            if "speedup_vs_fp16" in r:
                metrics[f"{key}/speedup_vs_fp16"] = r["speedup_vs_fp16"]
    return metrics
