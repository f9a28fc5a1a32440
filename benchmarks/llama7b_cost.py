"""The recipe's cost at Llama-2-7B layer sizes, measured on this machine (issue #13, item 7).

Builds a Llama-2-7B-shaped checkpoint with random weights and few decoder layers in a
temp dir (hidden 4096, MLP 11008, 32 heads; 2 layers and vocab 4096 by default: the
per-layer cost is what scales to 32 layers), then measures, each in its own subprocess
so that peak memory (``ru_maxrss``) belongs to one measurement only:

* ``prune``: SparseGPT 50% (:func:`sparsify.sparsity.layerwise.prune_model`),
* ``gptq-w8`` / ``gptq-w4g128``: GPTQ W8 per channel and W4 group 128, no SmoothQuant
  (:func:`sparsify.sparsity.layerwise.quantize_model`),
* ``train`` / ``train-ckpt``: one optimizer step of :func:`sparsify.training.trainer.train`
  (AdamW, batch 1 × ``--train-seq`` tokens) without / with gradient checkpointing.

Writes ``OUT/llama7b_cost.json`` (machine, ISA, threads, torch version, calibration size,
and per measurement: total and per-decoder-layer seconds, peak RSS, RSS after loading the
model) and ``OUT/llama7b_cost.md``. A 2-layer 7B shape takes minutes per measurement: run
it alone (``flock -x /tmp/sparsellama-cpu.lock ...`` on a shared machine).

    python benchmarks/llama7b_cost.py OUT [--calib 32x512] [--measure prune,gptq-w8] [--dtype bfloat16]
    python benchmarks/llama7b_cost.py OUT --hidden 64 --intermediate 128 --heads 4 --vocab 128 --calib 4x16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MEASUREMENTS = ("prune", "gptq-w8", "gptq-w4g128", "train", "train-ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def cpu_info() -> dict:
    """CPU model and the ISA extensions that decide which kernels torch uses."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "cpu": model,
        "isa": [f for f in wanted if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def gemm_tflops(threads: int, d: int, f: int) -> dict[str, float]:
    """Measured matmul throughput, fp32 and bf16, at the model's MLP shape (4096 tokens × d → f):
    the rate the time formulas divide their FLOPs by (median of 3 after a warm-up)."""
    torch.set_num_threads(threads)
    rates = {}
    for name, dtype in DTYPES.items():
        a, b = torch.randn(4096, d, dtype=dtype), torch.randn(d, f, dtype=dtype)
        a @ b
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        rates[name] = 2 * 4096 * d * f / sorted(times)[1] / 1e12
    return rates


# --------------------------------------------------------------------------- the formulas (README "Cost at 7B")


def prune_flops(d: int, f: int, tokens: int, seq_len: int, passes: int) -> dict[str, float]:
    """FLOPs of pruning one decoder layer with SparseGPT (the terms of the README's formula).

    forward: ``passes`` runs of the layer (2: record inputs, then pass on the pruned outputs;
    1 for the last layer), 2 FLOPs per weight per token plus attention's QKᵀ and AV;
    hessian: one XᵀX per distinct input (q/k/v share d², gate/up share d², o d², down f²);
    sweep: SparseGPT's lazy block updates, Σ out·in² over the 7 Linears, plus the
    Cholesky/inverse/Cholesky of each H (≈ 4/3·in³) and the error's triangular solve (Σ out·in²).
    """
    linears = [(d, d)] * 4 + [(f, d)] * 2 + [(d, f)]  # (out, in): q k v o, gate up, down
    weights = sum(o * i for o, i in linears)
    sweep = sum(o * i * i for o, i in linears)
    return {
        "forward": passes * (2 * tokens * weights + 4 * tokens * seq_len * d),
        "hessian": 2 * tokens * (3 * d * d + f * f),
        "sweep": 2 * sweep + sum(4 / 3 * i**3 for _, i in linears),
    }


def _linear_shapes(d: int, f: int) -> list[tuple[int, int]]:
    return [(d, d)] * 4 + [(f, d)] * 2 + [(d, f)]  # (out, in): q k v o, gate up, down


def predict(result: dict) -> dict[str, dict]:
    """Seconds and peak RSS of each measurement from the README's formulas and the measured GEMM rate.

    Calibration (prune, GPTQ), per decoder layer: the FLOPs of :func:`prune_flops` (GPTQ adds
    reconstruction_error's two products for GPTQ and for the RTN baseline, less the solve: 7·Σ out·in²);
    forward at the weights' dtype rate, the rest at the fp32 rate. Peak: what is resident
    after the imports, + the model, + the masks (1 byte per weight of the decoder layers),
    + the activation buffer N·L·d·b, + the larger of: the forward phase (the layer's
    Hessians, 4·(3d² + f²), and one mini-batch's MLP activations with the hooks' fp32
    copies) and down_proj's sweep (H and U, 8f², two fp32 copies of W, 8df; its
    factorisation needs H and one buffer, 8f²). GPTQ's codes (1 byte per weight) are counted as masks.
    Training step (AdamW, fp32): (6 + 2 with checkpointing)·P_matmul·T + attention
    (3 + 1)·4·T²·d per layer at the fp32 rate; peak: max(weights + gradients + activations,
    weights + gradients + Adam's two moments) = max(8P + A, 16P), activations A = 4·T·(12d + 4f)
    bytes per layer (per layer only its input, 4·T·d, with checkpointing, plus one layer's
    full set while it is recomputed) + the logits' 12·T·V.
    """
    sh, (n, length) = result["shape"], result["calibration"]
    d, f, layers, vocab = sh["hidden"], sh["intermediate"], sh["layers"], sh["vocab"]
    fp32 = result["gemm_tflops"]["float32"] * 1e12  # Hessians, sweeps and the training step are fp32
    b = 2 if result["dtype"] == "bfloat16" else 4
    params = layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * vocab * d + d
    predictions: dict[str, dict] = {}
    for kind, row in result["measurements"].items():
        base = row["rss_after_imports_gb"] * 2**30
        if kind == "prune" or kind.startswith("gptq"):
            rate = result["gemm_tflops"][result["dtype"]] * 1e12
            # GPTQ: no triangular solve, but two reconstruction_error calls of two products each
            extra = 0 if kind == "prune" else 7 * sum(o * i * i for o, i in _linear_shapes(d, f))
            seconds = []
            for index in range(layers):
                flops = prune_flops(d, f, n * length, length, 1 if index == layers - 1 else 2)
                seconds.append(flops["forward"] / rate + (flops["hessian"] + flops["sweep"] + extra) / fp32)
            # the MLP's gate, act, up and their product in the model's dtype, the hook's fp32 copies
            mini_batch = result["calib_batch"] * length * (4 * f * b + 4 * f * (2 if b == 2 else 1))
            forward_phase = 4 * (3 * d * d + f * f) + mini_batch
            sweep_phase = 4 * 2 * f * f + 4 * 2 * d * f  # down_proj's H, U; W's work copy, the error's delta
            masks = layers * (4 * d * d + 3 * d * f)  # bool, 1 byte per pruned weight, kept for the result
            peak = base + params * b + masks + n * length * d * b + max(forward_phase, sweep_phase)
        else:
            t, checkpointing = result["train_seq"], kind == "train-ckpt"
            matmul_params = layers * (4 * d * d + 3 * d * f) + vocab * d
            flops = (6 + 2 * checkpointing) * matmul_params * t + (3 + checkpointing) * 4 * t * t * d * layers
            seconds = [flops / fp32 / layers] * layers
            full_layer = 4 * t * (12 * d + 4 * f)
            acts = (layers * 4 * t * d + full_layer if checkpointing else layers * full_layer) + 12 * t * vocab
            peak = base + max(8 * params + acts, 16 * params)
        predictions[kind] = {"seconds_per_layer": seconds, "seconds": sum(seconds), "peak_rss_gb": peak / 2**30}
    return predictions


# An H100 SXM 80 GB: dense bf16 989 TFLOP/s, fp32 (no TF32: the Hessians need the mantissa) 67 TFLOP/s.
# Assumed fractions of peak (not measured here: this session had no GPU): calibration forwards 50%,
# fp32 Hessians and factorisations 60%, training 40% (MFU); SparseGPT's column loop is bound by
# kernel launches, ~10 small kernels of ~5 µs per input column.
GPU = {
    "name": "H100 SXM 80 GB",
    "memory_gb": 80,
    "bf16": 989e12 * 0.5,
    "fp32": 67e12 * 0.6,
    "train": 989e12 * 0.4,
    "column_s": 10 * 5e-6,
}


def gpu_extrapolation(
    d: int = 4096,
    f: int = 11008,
    layers: int = 32,
    vocab: int = 32000,
    calib: tuple[int, int] = (128, 2048),
    seq: int = 4096,
) -> list[dict]:
    """Llama-2-7B (32 layers) on :data:`GPU`s from the same formulas: per stage, memory per GPU,
    GPUs needed, hours. Calibration in bf16 weights, one GPU, batch 8 sequences; training with
    FSDP (fp32 master weights, gradients and AdamW moments sharded: 16P/G), bf16 autocast,
    gradient checkpointing, a bf16 KD teacher replicated per GPU, micro-batch 1 × ``seq``."""
    n, length = calib
    layer_params = 4 * d * d + 3 * d * f
    params = layers * (layer_params + 2 * d) + 2 * vocab * d + d
    columns = 6 * d + f
    per_layer = 0.0
    for index in range(layers):
        flops = prune_flops(d, f, n * length, length, 1 if index == layers - 1 else 2)
        per_layer += flops["forward"] / GPU["bf16"] + (flops["hessian"] + flops["sweep"]) / GPU["fp32"]
    calib_time = per_layer + layers * columns * GPU["column_s"]
    gptq_time = calib_time + layers * 7 * sum(o * i * i for o, i in _linear_shapes(d, f)) / GPU["fp32"]
    forward_phase = 4 * (3 * d * d + f * f) + 8 * length * 16 * f  # Hessians + a mini-batch of 8 (bf16)
    calib_device = (layer_params * 2 + max(forward_phase, 8 * f * f + 8 * d * f)) / 2**30
    calib_host = (params * 2 + layers * layer_params + n * length * d * 2) / 2**30
    rows = [
        {
            "stage": "prune (SparseGPT, 128×2048 tokens)",
            "gpu_gb": calib_device,
            "host_gb": calib_host,
            "gpus": 1,
            "hours": calib_time / 3600,
        },
        {
            "stage": "quantize (GPTQ, per scheme)",
            "gpu_gb": calib_device + layer_params / 2**30,
            "host_gb": calib_host,
            "gpus": 1,
            "hours": gptq_time / 3600,
        },
    ]
    matmul_params = layers * layer_params + vocab * d
    per_token = (6 + 2 + 2) * matmul_params + (3 + 1 + 1) * 4 * seq * d * layers  # + recompute + teacher
    gpu_hours_per_billion = per_token * 1e9 / GPU["train"] / 3600
    activations = (layers * seq * d * 2 + seq * (12 * d + 4 * f) * 2 + 12 * seq * vocab) / 2**30
    for gpus in (2, 4, 8):
        memory = 16 * params / gpus / 2**30 + 2 * params / 2**30 + activations
        rows.append(
            {
                "stage": f"sparse pretraining / KD fine-tuning, FSDP over {gpus}",
                "gpu_gb": memory,
                "host_gb": None,
                "gpus": gpus,
                "hours": gpu_hours_per_billion / gpus,
                "per": "1B tokens",
                "fits": memory < GPU["memory_gb"] * 0.9,
            }
        )
    return rows


def gpu_markdown(rows: list[dict]) -> str:
    lines = ["| stage | memory per GPU (GB) | host (GB) | GPUs | hours |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        host = f"{r['host_gb']:.1f}" if r["host_gb"] is not None else "-"
        hours = f"{r['hours']:.2f}" + (f" per {r['per']}" if "per" in r else "")
        fits = "" if r.get("fits", True) else " (does not fit)"
        lines.append(f"| {r['stage']} | {r['gpu_gb']:.1f}{fits} | {host} | {r['gpus']} | {hours} |")
    return "\n".join(lines) + "\n"


def build_checkpoint(args: argparse.Namespace, path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(4096, args.train_seq, args.calib[1]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------- one measurement (a subprocess)


def _measure(kind: str, args: argparse.Namespace) -> dict:
    from sparsify.checkpoint import load_model
    from sparsify.quant.quantization import QuantConfig
    from sparsify.sparsity.layerwise import prune_model, quantize_model
    from sparsify.sparsity.pruning import PruneConfig
    from sparsify.training.trainer import TrainConfig, train

    torch.set_num_threads(args.threads)
    rss_imports = current_rss_gb()
    model = load_model(args.checkpoint, dtype=DTYPES[args.dtype])
    rss_loaded = current_rss_gb()
    n, length = args.calib
    calib = torch.randint(0, args.vocab, (n, length), generator=torch.Generator().manual_seed(1))
    row: dict = {"rss_after_imports_gb": rss_imports, "rss_after_load_gb": rss_loaded}
    start = time.perf_counter()
    if kind == "prune":
        cfg = PruneConfig(method="sparsegpt", sparsity=0.5, num_samples=n, seq_len=length)
        result = prune_model(model, calib, cfg, progress=False, batch_size=args.batch)
        row["seconds_per_layer"] = result.seconds_per_decoder_layer
    elif kind.startswith("gptq"):
        bits, group = (8, None) if kind == "gptq-w8" else (4, 128)
        cfg = QuantConfig(
            method="gptq",
            weight_bits=bits,
            group_size=group,
            activation_bits=None,
            smoothquant=False,
            num_samples=n,
            seq_len=length,
        )
        result = quantize_model(model, calib, cfg, progress=False, batch_size=args.batch)
        row["seconds_per_layer"] = result.seconds_per_decoder_layer
    else:
        cfg = TrainConfig(
            steps=1,
            batch_size=1,
            warmup_steps=0,
            eval_every=1,
            log_every=1,
            gradient_checkpointing=kind == "train-ckpt",
        )
        blocks = torch.randint(0, args.vocab, (1, args.train_seq + 1)).numpy()
        result = train(model, blocks, None, cfg, seed=0, progress=False)
        row["seconds_per_layer"] = [result.seconds / args.layers] * args.layers  # one step, spread evenly
        row["train_tokens"] = args.train_seq
    row["seconds"] = time.perf_counter() - start
    row["peak_rss_gb"] = peak_rss_gb()
    return row


def run_isolated(kind: str, args: argparse.Namespace, checkpoint: Path) -> dict:
    """``kind`` measured in a fresh interpreter: its peak RSS is its own."""
    argv = [sys.executable, __file__, "--worker", kind, "--checkpoint", str(checkpoint), *args.passthrough]
    # The worker imports `sparsify` from this script's tree (a git worktree would otherwise get
    # whichever checkout the venv's editable install points at).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    m, s = result["machine"], result["shape"]
    head = (
        f"Llama-2-7B-shaped, {s['layers']} decoder layers (hidden {s['hidden']}, MLP {s['intermediate']}, "
        f"{s['heads']} heads, vocab {s['vocab']}), random weights in {result['dtype']}; "
        f"{m['cpu']} ({', '.join(m['isa'])}), {result['threads']} threads, torch {result['torch']}; "
        f"calibration {result['calibration'][0]}×{result['calibration'][1]} tokens (mini-batch "
        f"{result['calib_batch']}); training step batch 1 × {result['train_seq']} tokens, AdamW.\n\n"
    )
    lines = [
        "| measurement | total s | s per decoder layer | peak RSS GB | RSS after load GB |",
        "|---|---:|---|---:|---:|",
    ]
    for kind, r in result["measurements"].items():
        per_layer = ", ".join(f"{t:.1f}" for t in r["seconds_per_layer"])
        lines.append(
            f"| {kind} | {r['seconds']:.1f} | {per_layer} | {r['peak_rss_gb']:.2f} | {r['rss_after_load_gb']:.2f} |"
        )
    rates = ", ".join(f"{k} {v:.2f}" for k, v in result["gemm_tflops"].items())
    text = head + "\n".join(lines) + f"\n\nMeasured GEMM rate (TFLOP/s): {rates}.\n\n"
    text += (
        "| formula vs measurement | predicted s | measured s | error | predicted peak GB | "
        "measured peak GB | error |\n|---|---:|---:|---:|---:|---:|---:|\n"
    )
    for kind, p in predict(result).items():
        m = result["measurements"][kind]
        text += (
            f"| {kind} | {p['seconds']:.1f} | {m['seconds']:.1f} | {p['seconds'] / m['seconds'] - 1:+.0%} | "
            f"{p['peak_rss_gb']:.2f} | {m['peak_rss_gb']:.2f} | "
            f"{p['peak_rss_gb'] / m['peak_rss_gb'] - 1:+.0%} |\n"
        )
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=Path("reports"))
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument(
        "--calib",
        type=lambda s: tuple(int(v) for v in s.lower().split("x")),
        default=(32, 512),
        help="calibration sequences x tokens, e.g. 32x512",
    )
    parser.add_argument("--batch", type=int, default=8, help="calibration sequences per forward")
    parser.add_argument("--train-seq", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--measure", default=",".join(MEASUREMENTS))
    parser.add_argument("--gpu-table", action="store_true", help="print the 32-layer GPU extrapolation and exit")
    parser.add_argument("--render", type=Path, help="rewrite OUT/llama7b_cost.md (and formulas) from this JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.measure.split(",")) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"--measure: unknown {sorted(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    # What a worker needs to rebuild the same run (everything but out/measure/worker/checkpoint).
    args.passthrough = [
        f"--hidden={args.hidden}",
        f"--intermediate={args.intermediate}",
        f"--heads={args.heads}",
        f"--layers={args.layers}",
        f"--vocab={args.vocab}",
        f"--calib={args.calib[0]}x{args.calib[1]}",
        f"--batch={args.batch}",
        f"--train-seq={args.train_seq}",
        f"--threads={args.threads}",
        f"--dtype={args.dtype}",
    ]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.worker:
        print(json.dumps(_measure(args.worker, args)))  # noqa: T201  (the parent reads the last line)
        return
    from sparsify.io import atomic_write_json, atomic_write_text

    if args.gpu_table:
        print(gpu_markdown(gpu_extrapolation()))  # noqa: T201
        return
    if args.render:  # re-derive the formulas' columns of an earlier run
        result = json.loads(args.render.read_text())
        result["formulas"] = predict(result)
        atomic_write_json(args.out / "llama7b_cost.json", result)
        atomic_write_text(args.out / "llama7b_cost.md", markdown(result))
        print(markdown(result))  # noqa: T201
        return
    result = {
        "machine": cpu_info(),
        "threads": args.threads,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "shape": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "layers": args.layers,
            "vocab": args.vocab,
        },
        "calibration": list(args.calib),
        "calib_batch": args.batch,
        "train_seq": args.train_seq,
        "measurements": {},
        "gemm_tflops": gemm_tflops(args.threads, args.hidden, args.intermediate),
    }
    with tempfile.TemporaryDirectory(prefix="llama7b-") as tmp:
        checkpoint = Path(tmp) / "model"
        build_checkpoint(args, checkpoint)
        for kind in args.measure.split(","):
            result["measurements"][kind] = run_isolated(kind, args, checkpoint)
            logging.warning("%s: %s", kind, result["measurements"][kind])
    result["formulas"] = predict(result)
    atomic_write_json(args.out / "llama7b_cost.json", result)
    atomic_write_text(args.out / "llama7b_cost.md", markdown(result))
    print(markdown(result))  # noqa: T201  (a script's report on stdout)


if __name__ == "__main__":
    main()
