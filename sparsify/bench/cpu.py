"""Sparse CPU kernel benchmark: per-layer GEMV/GEMM timings at Llama-2-7B shapes and decode tokens/s.

Layers (W [out, in], x [batch, in]), variants timed in the same run, interleaved, medians:

* ``dense_fp32`` — ``F.linear`` fp32 (MKL); ``dense_bf16`` — ``F.linear`` bf16 (oneDNN);
* ``torch_int8`` — ``torch.ao.quantization.quantize_dynamic`` on an ``nn.Linear`` (W8A8, x86 engine);
* ``torch_int4`` — ``torch._weight_int4pack_mm_for_cpu``, group 128, bf16 activations;
* ``sparse50_bf16`` / ``sparse70_bf16`` / ``sparse70_int8`` (W8A8) / ``sparse70_w8a16`` /
  ``sparse70_int4`` (W4A8) / ``sparse70_w4a16`` (INT4: groups of 128) — ours (:mod:`sparsify.inference.kernels`),
  weights pruned per row by magnitude. ``name@isa`` forces a kernel path
  (``generic``, ``avx2``, ``avx512``); the full run times every sparse variant on every path this
  CPU has, side by side. Each row records the path it ran on (``isa``), the JSON the CPU model.

For each: ms per call, speedups against every dense/torch baseline, effective bandwidth (bytes of
the stored weight read per call / time) and its share of the stream bandwidth (``torch.sum`` over a
1 GB buffer, same thread count, sampled between the variants in every repeat), and the weight's
memory footprint. Every call reads its weight from DRAM (copies rotated past the L3, see
ROTATE_BYTES), as decode does.

Decode and prefill: a Llama-2-7B-shaped model with a few decoder layers (hidden 4096, intermediate 11008,
32 heads, vocab 32000, random weights, decoder Linears pruned per row by magnitude to 70%), or a
checkpoint directory, as dense fp32, dense bf16, sparse bf16 and sparse INT8 (W8A8); tokens/s of
single-token decode steps with a KV cache, and of a 64-token prefill chunk, interleaved across
variants.

    python benchmarks/sparse_kernels.py OUT_DIR [--quick] [--threads 2] [--checkpoint DIR]
    (the `benchmark` pipeline stage calls `run` below)

With CUDA, the same run adds the GPU layer benchmark (:mod:`sparsify.bench.gpu`: 2:4
semi-structured sparsity, torch's INT8 and INT4 GPU paths) under ``gpu``.

An AVX-512 machine measures as an AVX2-only CPU (Zen 1-3, Intel before Ice Lake) would when every
library is capped at AVX2, torch's baselines included (the JSON's ``machine.isa_caps`` lists them):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/sparse_kernels.py OUT_DIR --isas avx2

(ATen's cap alone already confines our kernels to AVX2; ``SPARSELLAMA_ISA=avx2`` confines only ours,
leaving torch's baselines on AVX-512.)

``--quick``: only the 11008x4096 batch-1 layer benchmark (a few seconds; the smoke profile's).
Writes ``OUT_DIR/sparse_kernels.json`` and ``OUT_DIR/sparse_kernels.png``. Run it alone: two torch
jobs on the same cores slow each other by up to 10x.

From code: ``run_layer_benchmark(shapes, batches, variants, repeats)`` and ``run_decode_benchmark(...)``
return dicts; ``flat_metrics(result)`` gives MLflow-style ``bench/cpu/<shape>/<variant>/ms`` keys.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify.bench.gpu import GPU_BATCHES, GPU_SHAPES, flat_gpu_metrics, int4_groups, run_gpu_layer_benchmark
from sparsify.inference.kernels import PackedWeight, kernel_isa, load_extension, pack, sparse_linear
from sparsify.inference.kernels.loader import ISA_NAMES
from sparsify.inference.kernels.ops import GATHER_MAX_BATCH, for_isa
from sparsify.inference.runtime import sparsify_model, use_decode_attention
from sparsify.sparsity.masks import prunable_linear_names

logger = logging.getLogger(__name__)

LLAMA2_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in): q/k/v/o, gate/up, down
DEFAULT_BATCHES = (1, 16)
LAYER_VARIANTS = (
    "dense_fp32",
    "dense_bf16",
    "torch_int8",
    "torch_int4",
    "sparse50_bf16",
    "sparse70_bf16",
    "sparse70_int8",
    "sparse70_w8a16",
    "sparse70_int4",
    "sparse70_w4a16",
)
BASELINES = {"fp32": "dense_fp32", "bf16": "dense_bf16", "int8": "torch_int8", "int4": "torch_int4"}
# sparse70_int8: the decoder layers sparse INT8, lm_head dense bf16; sparse70_int8_head: lm_head INT8 too.
# sparse70_int4_head: decoder layers sparse INT4 (W4A8, groups of 128), lm_head INT8.
DECODE_VARIANTS = (
    "dense_fp32",
    "dense_bf16",
    "sparse70_bf16",
    "sparse70_int8",
    "sparse70_int8_head",
    "sparse70_int4_head",
)
INT4_GROUP = 128
# Each timed call reads a different copy of the weight, cycling through copies that together
# exceed 4x this machine's 32 MB L3: every call streams its weight from DRAM, as in real decode
# (a 7B model's GBs of weights never stay cached). Without it a 7-19 MB packed weight stays in L3
# between calls and reports more than DRAM bandwidth.
ROTATE_BYTES = 128 << 20


# --------------------------------------------------------------------------- helpers


def prune_rows(weight: Tensor, sparsity: float) -> Tensor:
    """Zero the smallest-magnitude ``sparsity`` fraction of each row (SparseGPT's per-row pattern)."""
    keep = weight.shape[1] - int(round(weight.shape[1] * sparsity))
    kept = weight.abs().topk(keep, dim=1, sorted=False).indices
    mask = torch.zeros(weight.shape, dtype=torch.bool).scatter_(1, kept, True)
    return weight.masked_fill(~mask, 0)


def median_se(samples: Sequence[float]) -> float:
    """Standard error of a sample's median: 1.2533·sd/sqrt(n), the large-sample value for a normal spread
    (timings are skewed, so this is an approximation; it says how far apart two medians must be)."""
    if len(samples) < 2:
        return float("nan")
    return 1.2533 * statistics.stdev(samples) / math.sqrt(len(samples))


def _stream_buffer(gb: float) -> Tensor:
    """The buffer whose ``torch.sum`` measures memory read bandwidth (fp32, ``gb`` GiB, summed once to fault it in)."""
    buf = torch.empty(int(gb * 2**30) // 4).fill_(1.0)
    buf.sum()
    return buf


def stream_bandwidth(gb: float = 1.0, repeats: int = 9) -> dict:
    """Memory read bandwidth as this process sees it: ``torch.sum`` over a ``gb`` GB buffer, in GB/s
    (median, min and max of ``repeats``). The bound of every bandwidth-limited figure here."""
    buf = _stream_buffer(gb)
    rates = [buf.numel() * 4 / _timeit(buf.sum, 1) / 1e9 for _ in range(repeats)]
    return {
        "gbps": statistics.median(rates),
        "gbps_min": min(rates),
        "gbps_max": max(rates),
        "buffer_gb": buf.numel() * 4 / 1e9,
        "samples": repeats,
        "threads": torch.get_num_threads(),
    }


def _timeit(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _int4_pack(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, scales_and_zeros, dequantized fp32) for ``torch._weight_int4pack_mm_for_cpu``
    (:func:`sparsify.bench.gpu.int4_groups`'s codes in the CPU kernel's int32 layout)."""
    q, sz, deq = int4_groups(weight, INT4_GROUP)
    return torch._convert_weight_to_int4pack_for_cpu(q, 2), sz, deq


def split_isa(name: str) -> tuple[str, str | None]:
    """``"sparse70_bf16@avx2"`` → ``("sparse70_bf16", "avx2")``; no ``@``: the best path (None)."""
    base, _, isa = name.partition("@")
    return base, isa or None


def prepare_weight(name: str, dense: Tensor, cache: dict) -> object:
    """Variant ``name``'s stored weight for fp32 ``dense`` [out, in], memoized in ``cache`` (per shape)."""
    name = split_isa(name)[0]  # every path of a variant reads the same stored weight
    if name in cache:
        return cache[name]
    out, inn = dense.shape
    if name == "dense_fp32":
        state = dense
    elif name == "dense_bf16":
        state = dense.bfloat16()
    elif name == "torch_int8":
        lin = nn.Linear(inn, out, bias=False)
        lin.weight.data.copy_(dense)
        with warnings.catch_warnings():  # torch.ao's deprecation notices: the API still runs in 2.13
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
            state = (q, q[0].weight())  # the module and its quantized weight (unpacking costs ~0.3 s)
    elif name == "torch_int4":
        if inn % INT4_GROUP or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            raise NotImplementedError("torch int4pack needs in % 128 == 0 and torch >= 2.5")
        state = _int4_pack(dense)
    elif name.startswith("sparse") and name[6:8].isdigit():
        sparsity, kind = int(name[6:8]) / 100, name.split("_", 1)[1]
        key = f"pruned{name[6:8]}"
        if key not in cache:
            cache[key] = prune_rows(dense, sparsity)
        if kind == "bf16":
            state = pack(cache[key], dtype=torch.bfloat16)
        elif kind in ("int8", "w8a16"):
            state = pack(cache[key], dtype=torch.int8, act_int8=kind == "int8")
        elif kind in ("int4", "w4a16"):
            state = pack(cache[key], dtype=torch.int4, act_int8=kind == "int4", group_size=INT4_GROUP)
        else:
            raise ValueError(f"unknown sparse variant {name!r}")
    else:
        raise ValueError(f"unknown variant {name!r}; known: {LAYER_VARIANTS}")
    cache[name] = state
    return state


def variant_isa(name: str) -> str:
    """The instruction set a layer variant runs on: our kernel path, or torch's dispatch level."""
    if name.startswith("sparse"):
        return split_isa(name)[1] or kernel_isa()
    return f"torch {torch.backends.cpu.get_cpu_capability()}"


def with_isas(variants: Sequence[str], isas: Sequence[str]) -> list[str]:
    """Each sparse variant once per kernel path in ``isas`` (``name@isa``); baselines once."""
    out = []
    for v in variants:
        out += [f"{v}@{isa}" for isa in isas] if v.startswith("sparse") and "@" not in v else [v]
    return out


def _clone(state: object) -> object:
    """An independent copy of a variant's stored weight (new memory)."""
    if isinstance(state, Tensor):
        return state.clone()
    if isinstance(state, PackedWeight):
        fields = ("bitmask", "offsets", "values", "scales", "row_sums", "columns")
        copies = {f: getattr(state, f).clone() for f in fields if getattr(state, f) is not None}
        return dataclasses.replace(state, **copies)
    if isinstance(state, tuple) and isinstance(state[0], nn.Module):
        # torch's dynamic-quantized Linear: prepack its weight again (twice as fast as deepcopy)
        src, qweight = state[0][0], state[1]
        dst = torch.ao.nn.quantized.dynamic.Linear(src.in_features, src.out_features, bias_=False, dtype=torch.qint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dst.set_weight_bias(qweight, None)
        return (nn.Sequential(dst), qweight)
    if isinstance(state, tuple):
        return tuple(_clone(s) for s in state)
    raise TypeError(f"cannot copy {type(state).__name__}")


def _weight_bytes(name: str, state: object, shape: tuple[int, int], batch: int) -> int:
    """Bytes of the weight one call of variant ``name`` streams."""
    out, inn = shape
    if name == "dense_fp32":
        return out * inn * 4
    if name == "dense_bf16":
        return out * inn * 2
    if name == "torch_int8":
        return out * inn + out * 8  # int8 weight + per-channel scale/zero point (fbgemm packing)
    if name == "torch_int4":
        return out * inn // 2 + state[1].numel() * 2  # nibbles + bf16 scales/zeros
    if state.columns is not None and batch <= GATHER_MAX_BATCH:  # the AVX2 gather kernel reads its index
        return state.nbytes - state.bitmask.numel() + state.columns.numel()
    return state.nbytes


def _layer_call(name: str, state: object, x32: Tensor, xb: Tensor) -> Callable[[], Tensor]:
    if name == "dense_fp32":
        return lambda: F.linear(x32, state)
    if name == "dense_bf16":
        return lambda: F.linear(xb, state)
    if name == "torch_int8":
        return lambda: state[0](x32)
    if name == "torch_int4":
        packed, sz, _ = state
        return lambda: torch._weight_int4pack_mm_for_cpu(xb, packed, INT4_GROUP, sz)
    isa = split_isa(name)[1]
    return lambda: sparse_linear(xb, state, isa=isa)


CHECK_ROWS = 256  # output features each variant's result is checked on (the check costs setup time)


def _head_rows(packed: PackedWeight, rows: int) -> PackedWeight:
    """The first ``rows`` output rows of a packed weight (values start at offset 0)."""
    rows = min(rows, packed.shape[0])
    end = int(packed.offsets[rows]) + len(packed.values) - int(packed.offsets[-1])  # keep the padding
    return dataclasses.replace(
        packed,
        shape=(rows, packed.shape[1]),
        bitmask=packed.bitmask[:rows],
        offsets=packed.offsets[: rows + 1],
        values=packed.values[:end],
        scales=None if packed.scales is None else packed.scales[:rows],
        row_sums=None if packed.row_sums is None else packed.row_sums[:rows],
    )


def _layer_reference(name: str, state: object, x32: Tensor, xb: Tensor) -> Tensor:
    """fp32 product with the weights the variant holds, for the first CHECK_ROWS outputs."""
    from sparsify.inference.kernels import torch_sparse_linear

    r = CHECK_ROWS
    if name == "dense_fp32":
        return x32 @ state[:r].T
    if name == "dense_bf16":
        return xb.float() @ state[:r].float().T
    if name == "torch_int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return x32 @ state[1][:r].dequantize().T
    if name == "torch_int4":
        return xb.float() @ state[2][:r].T
    return torch_sparse_linear(xb.float(), _head_rows(state, r))


def make_layer_variant(
    name: str, dense: Tensor, batch: int, cache: dict | None = None, rotate_bytes: int = ROTATE_BYTES
) -> tuple[Callable[[], Tensor], int, Tensor, Tensor]:
    """(call, weight bytes, output, reference) for variant ``name`` of fp32 weight ``dense`` [out, in].

    ``call`` cycles through copies of the stored weight totalling ≥ ``rotate_bytes`` (see
    ROTATE_BYTES). Output and reference (the fp32 product with the weights the variant holds) cover
    the first CHECK_ROWS features, to check each variant computes what it should (a fast wrong
    kernel is not a result).
    """
    cache = {} if cache is None else cache
    state = prepare_weight(name, dense, cache)
    base, isa = split_isa(name)
    key = f"{base}/copies"  # the paths of one variant share its copies
    if key not in cache:
        n = min(64, max(1, -(-rotate_bytes // _weight_bytes(name, state, tuple(dense.shape), batch))))
        cache[key] = [state] + [_clone(state) for _ in range(n - 1)]
    copies = cache[key]
    if isinstance(state, PackedWeight):  # as the runtime holds it on this path (SparseLinear: ops.for_isa)
        path = isa or kernel_isa()
        if f"{key}@{path}" not in cache:
            cache[f"{key}@{path}"] = [for_isa(s, path) for s in copies]
        copies = cache[f"{key}@{path}"]
    nbytes = _weight_bytes(name, copies[0], tuple(dense.shape), batch)
    x32 = torch.randn(batch, dense.shape[1], generator=torch.Generator().manual_seed(1))
    xb = x32.bfloat16()
    calls = itertools.cycle([_layer_call(name, s, x32, xb) for s in copies])
    fn = lambda: next(calls)()  # noqa: E731
    return fn, nbytes, fn()[:, :CHECK_ROWS], _layer_reference(name, state, x32, xb)


# --------------------------------------------------------------------------- layer benchmark


def run_layer_benchmark(
    shapes: Sequence[tuple[int, int]] = LLAMA2_7B_SHAPES,
    batches: Sequence[int] = DEFAULT_BATCHES,
    variants: Sequence[str] = LAYER_VARIANTS,
    repeats: int = 9,
    *,
    target_s: float = 0.02,
    stream_gb: float = 1.0,
    seed: int = 0,
    rotate_bytes: int = ROTATE_BYTES,
) -> dict:
    """Time every variant on every (shape, batch); variants interleaved within each repeat.

    Each sample averages enough calls to last ~``target_s``; the result per variant is the
    median of ``repeats`` samples. Weights are read from DRAM (``rotate_bytes``, see ROTATE_BYTES;
    0 lets them stay in cache). The stream bandwidth (``torch.sum`` over ``stream_gb`` GB, same
    threads) is sampled in every repeat next to the variants — this VM's memory bandwidth drifts
    by up to ~1.5x over minutes — and each row's ``pct_stream`` uses its own block's median.
    Returns ``{"stream": ..., "rows": [...]}``.
    """
    load_extension()
    buf = _stream_buffer(stream_gb)
    all_stream: list[float] = []
    rows = []
    for out, inn in shapes:
        dense = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed)) * 0.02
        cache: dict = {}
        for batch in batches:
            calls, info = {}, {}
            for name in variants:
                try:
                    fn, nbytes, y, ref = make_layer_variant(name, dense, batch, cache, rotate_bytes)
                except NotImplementedError as err:
                    logger.warning("%s skipped: %s", name, err)
                    continue
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                fn()
                inner = max(1, int(target_s / max(_timeit(fn, 1), 1e-6)))
                calls[name] = (fn, inner)
                info[name] = {"weight_bytes": nbytes, "rel_err_vs_own_weights": err}
            samples = {name: [] for name in calls}
            stream_s: list[float] = []
            for _ in range(repeats):
                stream_s.append(_timeit(buf.sum, 1))
                for name, (fn, inner) in calls.items():
                    samples[name].append(_timeit(fn, inner))
            block_stream = buf.numel() * 4 / statistics.median(stream_s) / 1e9
            all_stream.extend(buf.numel() * 4 / t / 1e9 for t in stream_s)
            medians = {name: statistics.median(s) for name, s in samples.items()}
            for name in calls:
                ms = medians[name] * 1e3
                spread = (max(samples[name]) - min(samples[name])) / medians[name]
                row = {
                    "shape": f"{out}x{inn}",
                    "batch": batch,
                    "variant": name,
                    "isa": variant_isa(name),
                    "ms": ms,
                    "ms_min": min(samples[name]) * 1e3,
                    "spread": spread,
                    "gbps": info[name]["weight_bytes"] / medians[name] / 1e9,
                    "stream_gbps": block_stream,
                    "weight_mb": info[name]["weight_bytes"] / 1e6,
                    "rel_err_vs_own_weights": info[name]["rel_err_vs_own_weights"],
                }
                row["pct_stream"] = 100 * row["gbps"] / block_stream
                for short, base in BASELINES.items():
                    if base in medians:
                        row[f"speedup_vs_{short}"] = medians[base] / medians[name]
                rows.append(row)
                logger.info(
                    "%-10s b=%-3d %-22s %8.3f ms  x%5.2f fp32  %5.1f GB/s (%3.0f%% of %4.1f)  spread %.0f%%",
                    row["shape"],
                    batch,
                    name,
                    ms,
                    row.get("speedup_vs_fp32", float("nan")),
                    row["gbps"],
                    row["pct_stream"],
                    block_stream,
                    100 * spread,
                )
    stream = {
        "gbps": statistics.median(all_stream),
        "gbps_min": min(all_stream),
        "gbps_max": max(all_stream),
        "buffer_gb": stream_gb * 2**30 / 1e9,
        "samples": len(all_stream),
        "method": "torch.sum over an fp32 buffer, sampled in every repeat between the variants",
    }
    return {"stream": stream, "rows": rows, "rotate_bytes": rotate_bytes}


def project_decoder_linears(layer_rows: Sequence[dict], n_layers: int = 32) -> dict:
    """ms per token of the 7 Linears of ``n_layers`` Llama-2-7B decoder layers at batch 1, per variant.

    From the layer benchmark (q, k, v, o = 4096x4096; gate, up = 11008x4096; down = 4096x11008);
    excludes attention, norms, embeddings and lm_head.
    """
    count = {"4096x4096": 4, "11008x4096": 2, "4096x11008": 1}
    table: dict[str, dict[str, float]] = {}
    for r in layer_rows:
        if r["batch"] == 1 and r["shape"] in count:
            table.setdefault(r["variant"], {})[r["shape"]] = r["ms"]
    out = {}
    for variant, by_shape in table.items():
        if len(by_shape) == len(count):
            out[variant] = {"ms": n_layers * sum(count[s] * by_shape[s] for s in count)}
    for v in out.values():
        for short, base in BASELINES.items():
            if base in out:
                v[f"speedup_vs_{short}"] = out[base]["ms"] / v["ms"]
    return out


# --------------------------------------------------------------------------- decode benchmark


def build_decode_model(
    layers: int = 2,
    hidden: int = 4096,
    intermediate: int = 11008,
    heads: int = 32,
    vocab: int = 32000,
    sparsity: float = 0.7,
    seed: int = 0,
    kv_heads: int | None = None,
) -> nn.Module:
    """A random fp32 Llama with Llama-2-7B shapes and ``layers`` decoder layers, decoder Linears pruned per row
    (``kv_heads`` < ``heads``: grouped-query attention, as Llama 3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name in prunable_linear_names(model):
            p = model.get_parameter(name)
            p.copy_(prune_rows(p, sparsity))
    return model


def _decode_models(base: nn.Module, variants: Sequence[str], min_sparsity: float) -> dict[str, tuple[nn.Module, dict]]:
    # Every variant, dense ones included, attends through the same decode_attention kernel (sparsify_model
    # sets it for the sparse ones), so the variants differ in their Linears only.
    use_decode_attention(base)
    models = {}
    # INT4 groups of 128 where they tile every width (Llama shapes); one scale per row otherwise (toy shapes).
    widths = (base.config.hidden_size, base.config.intermediate_size)
    group = INT4_GROUP if all(w % INT4_GROUP == 0 for w in widths) else None
    for name in variants:
        if name == "dense_fp32":
            models[name] = (base, {})
            continue
        m = copy.deepcopy(base).to(torch.bfloat16)
        replaced = {}
        if name.startswith("sparse"):
            replaced = sparsify_model(
                m,
                min_sparsity=min_sparsity,
                int8="int8" in name,
                int4="int4" in name,
                group_size=group,
                lm_head=name.endswith("_head"),
            )
        elif name != "dense_bf16":
            raise ValueError(f"unknown decode variant {name!r}; known: {DECODE_VARIANTS}")
        models[name] = (m, replaced)
    return models


def _model_bytes(model: nn.Module) -> int:
    from sparsify.inference.runtime import SparseLinear

    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, SparseLinear):  # the stored format, and the gather index where the runtime built one
            n += m.packed.nbytes + (0 if m.packed.columns is None else m.packed.columns.numel())
    return n


@torch.no_grad()
def _decode_steps(model: nn.Module, prompt: Tensor, steps: int) -> tuple[list[float], list[float], list[int]]:
    """Prefill ``prompt``, then ``steps`` greedy single-token steps with the KV cache.

    Each step is the model's forward split in two timed parts: the decoder (embedding, layers,
    final norm) and the lm_head. Returns (decoder seconds, lm_head seconds, greedy tokens: the
    prefill's then each step's).
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    out = model(prompt, use_cache=True)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)  # transformers 5: `cache` (was past_key_values)
    body_s, head_s, tokens = [], [], [int(nxt)]
    for _ in range(steps):
        t0 = time.perf_counter()
        hidden = decoder(input_ids=nxt, cache=cache, use_cache=True).last_hidden_state
        t1 = time.perf_counter()
        nxt = head(hidden[:, -1:]).argmax(-1)
        t2 = time.perf_counter()
        body_s.append(t1 - t0)
        head_s.append(t2 - t1)
        tokens.append(int(nxt))
    return body_s, head_s, tokens


@torch.no_grad()
def _prefill_seconds(model: nn.Module, prompt: Tensor) -> float:
    t0 = time.perf_counter()
    model(prompt, use_cache=True, logits_to_keep=1)  # serving needs the last position's logits only
    return time.perf_counter() - t0


def run_decode_benchmark(
    checkpoint: str | os.PathLike | None = None,
    *,
    layers: int = 2,
    variants: Sequence[str] = DECODE_VARIANTS,
    sparsity: float = 0.7,
    repeats: int = 5,
    steps: int = 4,
    prompt_len: int = 8,
    prefill_len: int = 64,
    min_sparsity: float = 0.3,
    seed: int = 0,
    **model_dims: int,
) -> dict:
    """Decode tokens/s per variant; ``repeats`` rounds of ``steps`` tokens each, variants interleaved;
    and prefill tokens/s of one ``prefill_len``-token prompt (a prefill chunk) in each round.

    With ``checkpoint`` (an HF directory), its weights are used as they are (no pruning); else a
    random Llama-2-7B-shaped model (``model_dims`` overrides hidden/intermediate/heads/vocab).
    Also runs ``model.generate()`` once per variant (the path users take) and records its tokens.
    """
    load_extension()
    if checkpoint is not None:
        from sparsify.checkpoint import load_model

        base, source = load_model(checkpoint, dtype=torch.float32), str(checkpoint)
    else:
        base = build_decode_model(layers=layers, sparsity=sparsity, seed=seed, **model_dims)
        source = f"random Llama, {layers} layers, {sparsity:.0%} sparse" + (f", {model_dims}" if model_dims else "")
    models = _decode_models(base, variants, min_sparsity)
    vocab = base.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    chunk = torch.randint(0, vocab, (1, prefill_len), generator=torch.Generator().manual_seed(seed + 1))
    prefill: dict[str, list[float]] = {name: [] for name in models}
    body: dict[str, list[float]] = {name: [] for name in models}
    head: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {}
    for m, _ in models.values():  # warm-up (first-call allocations, lazy init)
        _decode_steps(m, prompt, 1)
    for _ in range(repeats):
        for name, (m, _) in models.items():
            prefill[name].append(_prefill_seconds(m, chunk))
            b, h, toks = _decode_steps(m, prompt, steps)
            body[name].extend(b)
            head[name].extend(h)
            tokens[name] = toks
    n_layers = base.config.num_hidden_layers
    result = {
        "source": source,
        "layers": n_layers,
        "hidden": base.config.hidden_size,
        "intermediate": base.config.intermediate_size,
        "vocab": vocab,
        "variants": {},
        "note": "ms_per_token = decoder + lm_head medians; projected_32l scales the decoder part to "
        "32 layers (Llama-2-7B) and keeps the measured lm_head; every variant's decode attention runs "
        "on the decode_attention kernel (where compiled)",
    }
    for name, (m, replaced) in models.items():
        gen = m.generate(prompt, max_new_tokens=steps, do_sample=False, pad_token_id=0)
        totals = [b + h for b, h in zip(body[name], head[name], strict=True)]
        med_body, med_head = statistics.median(body[name]), statistics.median(head[name])
        ms = (med_body + med_head) * 1e3
        projected_ms = (med_head + med_body * 32 / n_layers) * 1e3
        result["variants"][name] = {
            "ms_per_token": ms,
            "tok_s": 1e3 / ms,
            "decoder_ms": med_body * 1e3,
            "lm_head_ms": med_head * 1e3,
            "projected_32l_ms_per_token": projected_ms,
            "projected_32l_tok_s": 1e3 / projected_ms,
            "spread": (max(totals) - min(totals)) / statistics.median(totals),
            "prefill_len": prefill_len,
            "prefill_ms": statistics.median(prefill[name]) * 1e3,
            "prefill_tok_s": prefill_len / statistics.median(prefill[name]),
            "model_mb": _model_bytes(m) / 1e6,
            "sparse_layers": len(replaced),
            "greedy_tokens": tokens[name][:steps],
            "generate_tokens": gen[0, prompt_len:].tolist(),
        }
        result["variants"][name]["ms_per_token_se"] = median_se(totals) * 1e3
    variants = result["variants"]
    for v in variants.values():
        for short, base_name in (("fp32", "dense_fp32"), ("bf16", "dense_bf16")):
            if base_name in variants:
                base = variants[base_name]
                v[f"speedup_vs_{short}"] = v["tok_s"] / base["tok_s"]
                v[f"speedup_vs_{short}_se"] = v[f"speedup_vs_{short}"] * math.hypot(
                    v["ms_per_token_se"] / v["ms_per_token"], base["ms_per_token_se"] / base["ms_per_token"]
                )
                base_tok_s = variants[base_name]["projected_32l_tok_s"]
                v[f"projected_32l_speedup_vs_{short}"] = v["projected_32l_tok_s"] / base_tok_s
                v[f"prefill_speedup_vs_{short}"] = v["prefill_tok_s"] / variants[base_name]["prefill_tok_s"]
    for name, v in variants.items():
        logger.info(
            "decode %-18s %7.2f ms/token (decoder %6.2f + lm_head %6.2f) %6.2f tok/s x%5.2f fp32 x%5.2f bf16"
            " | 32 layers: %6.2f tok/s x%5.2f fp32 | prefill %d: %7.1f tok/s x%5.2f fp32 | %6.0f MB",
            name,
            v["ms_per_token"],
            v["decoder_ms"],
            v["lm_head_ms"],
            v["tok_s"],
            v.get("speedup_vs_fp32", float("nan")),
            v.get("speedup_vs_bf16", float("nan")),
            v["projected_32l_tok_s"],
            v.get("projected_32l_speedup_vs_fp32", float("nan")),
            prefill_len,
            v["prefill_tok_s"],
            v.get("prefill_speedup_vs_fp32", float("nan")),
            v["model_mb"],
        )
    return result


# --------------------------------------------------------------------------- output


def flat_metrics(result: dict, device: str = "cpu") -> dict[str, float]:
    """``bench/<device>/<shape or model>/<variant>/{ms,speedup_vs_fp32}`` (the DESIGN's metric names)."""
    metrics = {}
    for r in result.get("layers", {}).get("rows", []):
        key = f"bench/{device}/{r['shape']}_b{r['batch']}/{r['variant'].replace('@', '-')}"
        metrics[f"{key}/ms"] = r["ms"]
        if "speedup_vs_fp32" in r:
            metrics[f"{key}/speedup_vs_fp32"] = r["speedup_vs_fp32"]
    decode = result.get("decode")
    if decode:
        for name, v in decode["variants"].items():
            key = f"bench/{device}/decode_{decode['layers']}l/{name}"
            metrics[f"{key}/ms"] = v["ms_per_token"]
            metrics[f"{key}/tok_s"] = v["tok_s"]
            metrics[f"{key}/projected_32l_tok_s"] = v["projected_32l_tok_s"]
            metrics[f"{key}/prefill_tok_s"] = v["prefill_tok_s"]
            if "speedup_vs_fp32" in v:
                metrics[f"{key}/speedup_vs_fp32"] = v["speedup_vs_fp32"]
    return metrics


def plot(result: dict, path: Path) -> None:
    """Bar chart of speedup over dense fp32: one group per (shape, batch), plus decode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, dict[str, float]] = {}
    for r in result.get("layers", {}).get("rows", []):
        groups.setdefault(f"{r['shape']}\nb={r['batch']}", {})[r["variant"]] = r.get("speedup_vs_fp32", 0.0)
    if result.get("decode"):
        groups["decode\ntok/s"] = {k: v.get("speedup_vs_fp32", 0.0) for k, v in result["decode"]["variants"].items()}
    variants = list(dict.fromkeys(v for g in groups.values() for v in g))
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        xs = [g + (i - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [g.get(variant, 0.0) for g in groups.values()], width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel("speedup over dense fp32")
    ax.set_title(f"sparse CPU kernels ({result['machine']['threads']} threads, {result['machine']['kernels']})")
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(path, format="png", dpi=100)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux) with its family and model numbers, else what
    ``platform`` knows. The numbers tell generations apart where a VM names them all alike:
    "AMD EPYC" is Zen 3 at family 25 model 1, Zen 4 at 25/17, Zen 5 at 26/2."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
            return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The vector extensions this CPU reports that the kernels care about, e.g. 'avx2 fma avx512f ...'."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512_vbmi2")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512"


# Environment variables that cap the instruction set below what the CPU has: ours, ATen's dispatch,
# oneDNN's (torch's dense bf16/fp32 matmuls) and fbgemm's (torch's dynamic INT8). All four set to
# AVX2 make an AVX-512 machine run every variant, baselines included, as an AVX2-only CPU would.
ISA_CAP_VARIABLES = ("SPARSELLAMA_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")


def isa_caps() -> dict[str, str]:
    """The ISA caps set in this process's environment (empty: every library uses the CPU's best)."""
    return {k: os.environ[k] for k in ISA_CAP_VARIABLES if os.environ.get(k)}


def machine_info() -> dict:
    """Where the figures come from: CPU model and extensions, ISA caps, torch's dispatch level, our
    kernel path."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "isa_caps": isa_caps(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "kernels": kernel_isa(),
        "kernel_paths": available_paths(),
        "loadavg_1m": os.getloadavg()[0],
    }


def available_paths() -> list[str]:
    """Every kernel path this machine can run, portable first (empty without the compiled extension)."""
    best = kernel_isa()
    return [] if best == "torch" else list(ISA_NAMES[: ISA_NAMES.index(best) + 1])


def run(
    *,
    quick: bool,
    variants: Sequence[str] | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    repeats: int | None = None,
    decode: bool = True,
    decode_layers: int = 2,
    checkpoint: str | os.PathLike | None = None,
    isas: Sequence[str] | None = None,
    shapes: Sequence[tuple[int, int]] = LLAMA2_7B_SHAPES,
    layers: bool = True,
    rotate_bytes: int = ROTATE_BYTES,
) -> dict:
    """The whole benchmark as one dict (layers, projection, decode, flat ``metrics``).

    ``isas``: the kernel paths each sparse layer variant is timed on (default: the best one in the
    quick mode, every path this CPU has otherwise). Decode runs on the path the runtime picks
    (``SPARSELLAMA_ISA`` caps it). ``layers=False``: decode only. ``rotate_bytes=0`` times the layers
    with their weights in cache (see ROTATE_BYTES): what a kernel costs in instructions alone, its
    ceiling; a kernel that is no faster there than from DRAM is compute-bound.
    """
    load_extension()
    result: dict = {"machine": machine_info()}
    logger.info(
        "CPU %s (%s); ISA caps %s; torch dispatch %s; sparse kernels: %s",
        result["machine"]["cpu_model"],
        result["machine"]["cpu_isa"],
        result["machine"]["isa_caps"] or "none",
        result["machine"]["capability"],
        result["machine"]["kernels"],
    )
    t0 = time.perf_counter()
    if quick:  # the smoke profile's check: the required variants, fewer and shorter samples
        variants = variants or [v for v in LAYER_VARIANTS if v != "sparse70_w8a16"]
        variants = with_isas(variants, isas) if isas else variants
        result["layers"] = run_layer_benchmark(
            [(11008, 4096)], [1], variants, repeats or 5, target_s=0.015, rotate_bytes=rotate_bytes
        )
    elif layers:
        variants = with_isas(variants or list(LAYER_VARIANTS), isas or available_paths() or ["torch"])
        result["layers"] = run_layer_benchmark(shapes, batches, variants, repeats or 9, rotate_bytes=rotate_bytes)
        result["projected_7b_decoder_linears"] = project_decoder_linears(result["layers"]["rows"])
    if decode and not quick:
        result["decode"] = run_decode_benchmark(checkpoint, layers=decode_layers)
    gpu = run_gpu_layer_benchmark([(11008, 4096)] if quick else GPU_SHAPES, (1,) if quick else GPU_BATCHES)
    if gpu is not None:  # only with CUDA: 2:4 semi-structured and torch's int8/int4 GPU paths
        result["gpu"] = gpu
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - t0
    result["metrics"] = flat_metrics(result) | flat_gpu_metrics(gpu)
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="11008x4096 batch 1 layer benchmark only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help=f"layer variants (default: all; --quick: all but sparse70_w8a16) of {LAYER_VARIANTS}",
    )
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="the decode benchmark alone (no layers)")
    parser.add_argument("--decode-layers", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=None, help="decode benchmark on this HF checkpoint dir")
    parser.add_argument(
        "--isas",
        nargs="+",
        default=None,
        choices=ISA_NAMES,
        help="kernel paths to time each sparse layer variant on (default: all this CPU has)",
    )
    parser.add_argument("--shapes", nargs="+", default=None, help="layer shapes OUTxIN (default: Llama-2-7B's)")
    parser.add_argument(
        "--in-cache",
        action="store_true",
        help="time the layers with each weight left in cache (no copies rotated past the L3): the compute ceiling",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes] if args.shapes else LLAMA2_7B_SHAPES
    result = run(
        quick=args.quick,
        variants=args.variants,
        batches=args.batches,
        repeats=args.repeats,
        decode=not args.no_decode,
        decode_layers=args.decode_layers,
        checkpoint=args.checkpoint,
        isas=args.isas,
        shapes=shapes,
        layers=not args.decode_only,
        rotate_bytes=0 if args.in_cache else ROTATE_BYTES,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sparse_kernels.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out_dir / "sparse_kernels.png")
    logger.info(
        "stream %.1f GB/s; wrote %s (%.1f s)",
        result.get("layers", {}).get("stream", {}).get("gbps", 0.0),
        args.out_dir / "sparse_kernels.json",
        result["seconds"],
    )
    return result


if __name__ == "__main__":
    main()
