"""Decode attention: torch's SDPA against the kernels' ``decode_attention``, alone and inside a decode step.

    python benchmarks/decode_attention.py OUT_DIR [--lengths 128 512 2048 4096] [--heads 32]
                                          [--kv-heads 32 8] [--head-dim 128] [--repeats 15]
                                          [--engine-layers 2] [--no-engine] [--threads 2]

At decode, one token's queries meet every cached key and value once: ~2 flops per byte, so the
time is the cache's bytes, and it grows with the context. Two measurements, variants alternated
within every repeat (this machine's speed drifts by tens of percent over minutes):

* **kernel** — one layer's attention over a bf16 cache of each length, for Llama-2-7B's heads
  (32 query = 32 kv heads) and Llama-3-8B's (32 query, 8 kv heads): ``torch_sdpa`` (what the engine
  ran before: ``F.scaled_dot_product_attention`` on the cache slices) and ``kernel@<isa>`` for every
  path this CPU has. Each result is checked against a float64 softmax first. Calls cycle through
  copies of the cache totalling more than the L3 (a real cache is read from DRAM); GB/s counts
  the K and V bytes, against ``torch.sum``'s read bandwidth sampled in the same repeats.
* **engine** — ms per decoded token of ``BatchedLlama`` (the runtime behind ``sparsellama generate``,
  ``chat`` and ``serve``) on a Llama-2-7B-shaped model with ``--engine-layers`` layers, 70% sparse
  INT8 with an INT8 lm_head, its KV cache filled to each length, attention through SDPA or the
  kernel (lengths past the model's 4,096 positions are cut to fit the decoded tokens).

Writes ``OUT_DIR/decode_attention.json`` with the machine record (CPU model, ISA, caps). Run it alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsify.bench.cpu import (  # noqa: E402
    ROTATE_BYTES,
    _stream_buffer,
    _timeit,
    build_decode_model,
    machine_info,
    median_se,
)
from sparsify.inference.engine import BatchedLlama  # noqa: E402
from sparsify.inference.kernels.loader import ISA_NAMES  # noqa: E402
from sparsify.inference.kernels.ops import decode_attention, kernel_isa  # noqa: E402
from sparsify.inference.runtime import sparsify_model  # noqa: E402

logger = logging.getLogger("decode_attention")


def _summary(samples: Sequence[float]) -> dict:
    return {"ms": statistics.median(samples) * 1e3, "ms_se": median_se(samples) * 1e3}


Attention = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (k cache, v cache) → [heads, head_dim]


def _variants(q: torch.Tensor, length: int, group: int, isas: Sequence[str]) -> dict[str, Attention]:
    """torch_sdpa (the engine's attention before the kernel) and kernel@<isa> for query ``q``."""

    def sdpa(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q[None, :, None], k[None], v[None], enable_gqa=group > 1)[0, :, 0]

    variants: dict[str, Attention] = {"torch_sdpa": sdpa}
    for isa in isas:
        variants[f"kernel@{isa}"] = lambda k, v, isa=isa: decode_attention(q, k, v, length, isa=isa)
    return variants


def _rotating(fn: Attention, copies: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], torch.Tensor]:
    """``fn`` on the next (k, v) copy at every call."""
    cycle = itertools.cycle(copies)
    return lambda: fn(*next(cycle))


def kernel_rows(
    lengths: Sequence[int], heads: int, kv_heads: int, head_dim: int, repeats: int, target_s: float = 0.02
) -> list[dict]:
    """One row per (length, variant): torch_sdpa and kernel@<isa>, alternated, on rotating bf16 caches."""
    best = kernel_isa()
    isas = [] if best == "torch" else list(ISA_NAMES[: ISA_NAMES.index(best) + 1])
    stream = _stream_buffer(0.5)
    rows = []
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        q = torch.randn(heads, head_dim, generator=g).bfloat16()
        cache_bytes = 2 * kv_heads * length * head_dim * 2
        copies = [
            tuple(torch.randn(kv_heads, length, head_dim, generator=g).bfloat16() for _ in range(2))
            for _ in range(min(64, max(1, -(-ROTATE_BYTES // cache_bytes))))
        ]
        k0, v0 = copies[0]
        group = heads // kv_heads
        kk, vv = (t.double().repeat_interleave(group, 0) for t in (k0, v0))  # query head i reads kv head i // group
        p = F.softmax(torch.einsum("hd,hld->hl", q.double(), kk) * head_dim**-0.5, -1)
        ref = torch.einsum("hl,hld->hd", p, vv)

        variants = _variants(q, length, group, isas)
        errors = {}
        for name, fn in variants.items():
            err = float((fn(k0, v0).double() - ref).abs().max())
            if err > 2e-2:  # bf16 output rounding is ~4e-3 here; anything larger is a wrong result
                raise AssertionError(f"{name} at length {length}: max |error| {err:.3g} against float64")
            errors[name] = err
        calls = {name: _rotating(fn, copies) for name, fn in variants.items()}
        # Calls per sample: enough to last ~target_s, fixed per variant (as run_layer_benchmark does).
        inner = {name: max(1, int(target_s / max(_timeit(fn, 1), 1e-6))) for name, fn in calls.items()}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        stream_gbps = []
        for rep in range(repeats):
            stream_gbps.append(stream.numel() * 4 / _timeit(stream.sum, 1) / 1e9)
            for name in variants if rep % 2 else reversed(list(variants)):
                samples[name].append(_timeit(calls[name], inner[name]))
        block_stream = statistics.median(stream_gbps)
        base = statistics.median(samples["torch_sdpa"])
        for name in variants:
            med = statistics.median(samples[name])
            row = {
                "heads": heads,
                "kv_heads": kv_heads,
                "head_dim": head_dim,
                "length": length,
                "variant": name,
                **_summary(samples[name]),
                "cache_mb": cache_bytes / 1e6,
                "gbps": cache_bytes / med / 1e9,
                "stream_gbps": block_stream,
                "speedup_vs_sdpa": base / med,
                "max_abs_error": errors[name],
            }
            row["pct_stream"] = 100 * row["gbps"] / block_stream
            rows.append(row)
            logger.info(
                "heads %d/%d L=%-5d %-16s %8.3f ms  x%5.2f sdpa  %5.1f GB/s (%3.0f%% of %4.1f)",
                heads,
                kv_heads,
                length,
                name,
                row["ms"],
                row["speedup_vs_sdpa"],
                row["gbps"],
                row["pct_stream"],
                block_stream,
            )
    return rows


def engine_rows(lengths: Sequence[int], layers: int, repeats: int, steps: int = 4, **dims: int) -> list[dict]:
    """ms per decoded token of BatchedLlama at each cache length, attention through SDPA or the kernel."""
    model = build_decode_model(layers=layers, **dims).to(torch.bfloat16)
    sparsify_model(model, min_sparsity=0.3, int8=True, lm_head=True)
    runner = BatchedLlama(model)
    rows = []
    for asked in lengths:
        length = min(asked, runner.max_positions - steps)  # room for the decoded tokens
        cache = runner.new_cache(length + steps)
        g = torch.Generator().manual_seed(length)
        for t in cache.k + cache.v:  # a filled cache: its contents do not change the time
            t[:, :length] = torch.randn(t.shape[0], length, t.shape[2], generator=g).to(t.dtype)
        samples: dict[str, list[float]] = {"torch_sdpa": [], "kernel": []}
        tokens: dict[str, list[int]] = {}
        for rep in range(repeats):
            for name in samples if rep % 2 else reversed(list(samples)):
                runner.decode_kernel = name == "kernel"
                cache.length = length
                tok, seen = 1, []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    tok = int(runner.forward([[tok]], [cache]).argmax(-1))
                    samples[name].append(time.perf_counter() - t0)
                    seen.append(tok)
                tokens[name] = seen
        runner.decode_kernel = True
        base = statistics.median(samples["torch_sdpa"])
        for name, s in samples.items():
            row = {"layers": layers, "length": length, "variant": name, **_summary(s)}
            row["speedup_vs_sdpa"] = base / statistics.median(s)
            row["greedy_tokens"] = tokens[name]
            rows.append(row)
            logger.info(
                "engine %d layers L=%-5d %-10s %8.2f ms/token  x%5.2f sdpa",
                layers,
                length,
                name,
                row["ms"],
                row["speedup_vs_sdpa"],
            )
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 4096])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--engine-layers", type=int, default=2)
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    # Engine model dimensions (Llama-2-7B's by default); tests pass tiny ones.
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"machine": machine_info(), "kernel": []}
    logger.info(
        "CPU %s (%s); caps %s",
        result["machine"]["cpu_model"],
        result["machine"]["cpu_isa"],
        result["machine"]["isa_caps"] or "none",
    )
    t0 = time.perf_counter()
    for kv in args.kv_heads:
        result["kernel"] += kernel_rows(args.lengths, args.heads, kv, args.head_dim, args.repeats)
    if not args.no_engine:
        dims = {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads, "vocab": args.vocab}
        result["engine"] = engine_rows(args.lengths, args.engine_layers, max(3, args.repeats // 3), **dims)
    result["seconds"] = time.perf_counter() - t0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "decode_attention.json"
    path.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s (%.0f s)", path, result["seconds"])
    return result


if __name__ == "__main__":
    main()
