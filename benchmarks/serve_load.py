"""Load test of `sparsellama serve-model` with the official OpenAI client: throughput, latency, TTFT.

For each concurrency level (default 1, 4, 16 clients) every client sends N streaming completions
one after another (greedy, ``ignore_eos`` so each produces exactly ``--max-tokens`` tokens) and the
run records: failed requests, wall time, generated tokens/s over all clients, requests/s, p50/p95
latency (request sent → last chunk) and p50/p95 time to first token (request sent → first text
chunk). The run stops by itself: N requests per client, a timeout per request.

    python benchmarks/serve_load.py MODEL_DIR [MODEL_DIR ...] [--clients 1 4 16] [--requests 8]
                                    [--max-tokens 64] [--out serve_load.json]   # starts each server itself
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000/v1 --model NAME ...
    python benchmarks/serve_load.py --make-synthetic /tmp/7b --kinds dense_bf16 sparse_int8 \
        --shape hidden=4096,intermediate=11008,layers=32,heads=32,kv_heads=32,vocab=32000   # Llama-2-7B shape

With started servers, the models are served one after another in one run (the first is the
baseline of the ratios), and each also gets: load time, the server's resident memory, the weight
bytes a decode step reads, batch-1 decode tokens/s (per request: tokens after the first over the
time after the first) and its share of the bandwidth limit (stream bandwidth ÷ weight bytes, with
the stream bandwidth measured first, on the idle machine); and, for reference, the engine alone in
the benchmark's process at the same batch sizes (no HTTP, no load client sharing the cores).

The tests (tests/test_serve.py) run it with small bounds; run it by hand with bigger ones. Speed
figures depend on the machine: the JSON records the CPU and the kernels' ISA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str | os.PathLike, *extra: str, port: int | None = None, timeout_s: float = 120.0
) -> tuple[subprocess.Popen, str]:
    """Start `sparsellama serve-model` (this checkout's CLI) on 127.0.0.1; return (process, base URL) once healthy."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "serve-model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, base + "/v1"
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    raise TimeoutError(f"the server did not become healthy within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> str:
    """Stop the server (SIGTERM, then SIGKILL); return what it printed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def _one_level(
    base_url: str, model: str, clients: int, requests: int, max_tokens: int, prompt: str, timeout_s: float
) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout_s)
    records: list[dict] = []

    async def worker(index: int) -> None:
        for _ in range(requests):
            start = time.perf_counter()
            first = None
            tokens = 0
            try:
                stream = await client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - start
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                records.append(
                    {
                        "ok": tokens == max_tokens,
                        "latency_s": time.perf_counter() - start,
                        "ttft_s": first,
                        "tokens": tokens,
                    }
                )
            except Exception as err:  # recorded as a failure; the run goes on
                records.append(
                    {
                        "ok": False,
                        "error": f"{type(err).__name__}: {err}",
                        "latency_s": time.perf_counter() - start,
                        "ttft_s": None,
                        "tokens": tokens,
                    }
                )

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    finally:
        await client.close()
    wall = time.perf_counter() - start
    ok = [r for r in records if r["ok"]]
    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    return {
        "clients": clients,
        "requests": len(records),
        "failures": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if "error" in r})[:5],
        "wall_s": wall,
        "generated_tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "latency_p50_s": _pct(latencies, 0.5),
        "latency_p95_s": _pct(latencies, 0.95),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "ttft_p50_s": _pct(ttfts, 0.5),
        "ttft_p95_s": _pct(ttfts, 0.95),
        # Per request, the tokens after the first over the time after the first: decode speed without prefill.
        "decode_tokens_per_s_p50": _pct(
            [
                (r["tokens"] - 1) / (r["latency_s"] - r["ttft_s"])
                for r in ok
                if r["ttft_s"] is not None and r["tokens"] > 1 and r["latency_s"] > r["ttft_s"]
            ],
            0.5,
        ),
    }


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from sparsify.inference.kernels import kernel_isa

        info["kernels_isa"] = kernel_isa()
    except Exception as err:  # the client side may lack the kernels; the figure still stands
        info["kernels_isa"] = f"unknown ({type(err).__name__})"
    return info


def run_load(
    base_url: str,
    model: str,
    *,
    clients: tuple[int, ...] = (1, 4, 16),
    requests: int = 4,
    max_tokens: int = 32,
    prompt: str = "def main():",
    timeout_s: float = 300.0,
) -> dict:
    """Run every concurrency level in turn against a live server; the results as a dict (see the module doc)."""
    levels = [asyncio.run(_one_level(base_url, model, c, requests, max_tokens, prompt, timeout_s)) for c in clients]
    return {
        "model": model,
        "base_url": base_url,
        "requests_per_client": requests,
        "max_tokens": max_tokens,
        "prompt": prompt,
        "machine": machine(),
        "levels": levels,
    }


def byte_tokenizer(vocab_size: int = 258):
    """A byte-level tokenizer with no merges and a simple chat template: the 256 bytes, filler tokens
    ``<unused_i>`` up to ``vocab_size - 2`` (so a random model's every id decodes to text), then BOS and EOS
    at ``vocab_size - 2`` and ``vocab_size - 1``. Any text round-trips; nothing is trained or downloaded."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + BOS + EOS), got {vocab_size}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {f"<unused_{i}>": i for i in range(256, vocab_size - 2)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab_size - 2)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    return hf


SYNTHETIC_KINDS = ("sparse_int8", "sparse", "dense_bf16")


def _random_llama(config, seed: int):
    """(name, fp32 tensor) of a random Llama of ``config``'s shape, one tensor at a time (Llama's init:
    N(0, initializer_range), norms 1), and the names of its decoder Linears. Nothing but the current
    tensor is ever in memory: a 7B model's 27 GB of fp32 never exist at once."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from sparsify.sparsity.masks import prunable_linear_names

    with init_empty_weights(include_buffers=False):
        meta = LlamaForCausalLM(config)

    def tensors():
        for index, (name, param) in enumerate(meta.named_parameters()):
            if name.endswith("norm.weight"):
                yield name, torch.ones(param.shape)
            else:  # one seeded generator per tensor: the same weights whatever the kind written
                generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
                yield name, torch.randn(param.shape, generator=generator) * config.initializer_range

    return tensors(), set(prunable_linear_names(meta))


def make_synthetic_model(
    out: str | os.PathLike,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    context: int = 4096,
    sparsity: float = 0.7,
    kind: str = "sparse_int8",
    seed: int = 0,
) -> Path:
    """A random Llama of the given shape with a byte-level tokenizer, for load tests of real model shapes.

    ``kind``:
    * ``sparse_int8``: decoder Linears pruned to ``sparsity`` per row (magnitude), INT8 W8A8
      (round-to-nearest, per channel) for them and for ``lm_head``, in the project's sparse format;
    * ``sparse``: the same pruned decoder Linears with fp32 values (no quantization);
    * ``dense_bf16``: the unpruned weights in bf16, as a Hugging Face folder (torch's dense kernels).

    Every kind holds the same random weights (seeded per tensor). The model is generated and written one
    tensor at a time (:func:`sparsify.inference.export.sparse_model_writer`, :class:`SafetensorsWriter`), so a 7B
    shape needs memory for one weight, not for the model.
    """
    import torch
    from transformers import LlamaConfig

    from sparsify.bench.cpu import prune_rows
    from sparsify.inference.export import encode_sparse, sparse_model_writer
    from sparsify.io import atomic_dir
    from sparsify.quant.quantization import QuantScheme, rtn_quantize
    from sparsify.safetensors_io import SafetensorsWriter

    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        tie_word_embeddings=False,
    )
    tensors, decoder_linears = _random_llama(config, seed)
    out = Path(out)
    if kind == "dense_bf16":
        config.dtype = torch.bfloat16
        with atomic_dir(out) as tmp, SafetensorsWriter(tmp / "model.safetensors") as writer:
            for name, tensor in tensors:
                writer.add(name, tensor.to(torch.bfloat16))
            writer.finish({"format": "pt"})
            config.save_pretrained(tmp)
            byte_tokenizer(vocab).save_pretrained(tmp)
        return out
    scheme = QuantScheme(weight_bits=8, group_size=None, activation_bits=8)
    with sparse_model_writer(out, config) as writer:
        for name, tensor in tensors:
            if name in decoder_linears:
                tensor = prune_rows(tensor, sparsity)
            if kind == "sparse_int8" and (name in decoder_linears or name == "lm_head.weight"):
                q = rtn_quantize(tensor, scheme, mask=tensor != 0 if name in decoder_linears else None)
                writer.add_layer(name, encode_sparse(q.weight, (scheme, q.codes, q.scales)))
            elif name in decoder_linears:
                writer.add_layer(name, encode_sparse(tensor))
            else:
                writer.add_tensor(name, tensor)
        byte_tokenizer(vocab).save_pretrained(writer.folder)
    return out


def weight_bytes_per_token(model_dir: str | os.PathLike) -> int:
    """Bytes a decode step reads from memory at batch 1: every stored tensor of the model but the embedding
    table (one row of it per token). Read from the safetensors headers, touching no weight."""
    from sparsify.inference.loading import find_sparse_file
    from sparsify.safetensors_io import read_safetensors_mmap

    folder = Path(model_dir)
    sparse = find_sparse_file(folder)
    files = [sparse] if sparse else sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors file in {folder}")
    total = 0
    for file in files:
        tensors, _ = read_safetensors_mmap(file)
        total += sum(t.numel() * t.element_size() for name, t in tensors.items() if "embed_tokens" not in name)
    return total


def process_memory_mb(pid: int) -> dict:
    """Resident memory of a process now and at its peak (VmRSS, VmHWM), in MB; memory-mapped weights count
    once touched."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return {"rss_mb": fields.get("VmRSS"), "peak_rss_mb": fields.get("VmHWM")}


def engine_decode(
    model_dir: str | os.PathLike, *, batches: tuple[int, ...], steps: int = 8, prompt_len: int = 8
) -> dict:
    """The engine alone, in this process (no HTTP, no load client on the cores): median ms per decode step of
    ``batch`` sequences at once, after an 8-token prompt each. What the server's figures are read against."""
    import gc

    from sparsify.inference.engine import BatchedLlama
    from sparsify.inference.loading import load_runtime_model

    engine = BatchedLlama(load_runtime_model(model_dir).model)
    rows = {}
    for batch in batches:
        caches = [engine.new_cache(prompt_len + steps + 1) for _ in range(batch)]
        logits = engine.forward([list(range(1, prompt_len + 1))] * batch, caches)
        times = []
        for _ in range(steps):
            nxt = logits.argmax(-1).tolist()
            start = time.perf_counter()
            logits = engine.forward([[token] for token in nxt], caches)
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        rows[batch] = {"ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms}
    del engine
    gc.collect()  # a 7B model's memory must be free before the next model loads
    return rows


def serve_and_load(
    model_dir: str | os.PathLike,
    *,
    clients: tuple[int, ...],
    requests: int,
    max_tokens: int,
    prompt: str,
    threads: int | None,
    start_timeout_s: float,
    stream_gbps: float,
) -> dict:
    """Start a server on ``model_dir``, run every concurrency level against it, stop it; the figures of
    :func:`run_load` plus load time, the server's memory, and decode speed against the bandwidth limit."""
    extra = ["--max-batch", str(max(clients)), "--max-queue", str(max(clients))]
    if threads:
        extra += ["--threads", str(threads)]
    start = time.perf_counter()
    proc, base = start_server(model_dir, *extra, timeout_s=start_timeout_s)
    try:
        load_s = time.perf_counter() - start
        memory_loaded = process_memory_mb(proc.pid)
        with urllib.request.urlopen(base + "/models") as r:
            model = json.load(r)["data"][0]["id"]
        result = run_load(base, model, clients=clients, requests=requests, max_tokens=max_tokens, prompt=prompt)
        memory_end = process_memory_mb(proc.pid)
    finally:
        stop_server(proc)
    nbytes = weight_bytes_per_token(model_dir)
    limit = stream_gbps * 1e9 / nbytes  # tokens/s if every step only streamed the weights once
    engine = engine_decode(model_dir, batches=clients)
    for row in engine.values():  # steps/s against the rate at which the weights can be streamed once per step
        row["pct_bandwidth_limit"] = 100 * (1e3 / row["ms_per_step"]) / limit
    single = next((lv for lv in result["levels"] if lv["clients"] == 1), None)
    decode = single["decode_tokens_per_s_p50"] if single else None
    return result | {
        "model_dir": str(model_dir),
        "load_s": load_s,
        "memory_after_load": memory_loaded,
        "memory_end": memory_end,
        "weight_bytes_per_token": nbytes,
        "bandwidth_limit_tokens_per_s": limit,
        "decode_tokens_per_s_batch1": decode,
        "engine_in_process": engine,
        "pct_bandwidth_limit": None if decode is None else 100 * decode / limit,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "model_dirs",
        nargs="*",
        help="start `sparsellama serve-model` on each folder in turn; ratios are against the first",
    )
    p.add_argument("--base-url", help="use a running server instead (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--model", help="the served model name (with --base-url)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default="def main():")
    p.add_argument("--threads", type=int, default=None, help="the started server's torch threads")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds a started server may take to load")
    p.add_argument("--out", default="serve_load.json")
    p.add_argument(
        "--make-synthetic",
        metavar="DIR",
        default=None,
        help="write random models to DIR/<kind> first (shape from --shape, kinds from --kinds) and "
        "serve them, before any MODEL_DIRS",
    )
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["sparse_int8"],
        choices=SYNTHETIC_KINDS,
        help="synthetic models to write, e.g. dense_bf16 sparse_int8 (same random weights)",
    )
    p.add_argument(
        "--shape",
        default="hidden=1024,intermediate=2816,layers=8,heads=16,kv_heads=16,vocab=32000",
        help="the synthetic model's shape (key=value,...)",
    )
    p.add_argument("--sparsity", type=float, default=0.7)
    args = p.parse_args(argv)
    model_dirs = list(args.model_dirs)
    if args.make_synthetic:
        shape = {k: int(v) for k, v in (kv.split("=") for kv in args.shape.split(","))}
        for kind in args.kinds:
            folder = Path(args.make_synthetic) / kind
            if not (folder / "config.json").is_file():  # reuse an earlier run's model: writing 7B takes minutes
                start = time.perf_counter()
                make_synthetic_model(folder, sparsity=args.sparsity, kind=kind, **shape)
                print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
            model_dirs.insert(args.kinds.index(kind), str(folder))
    if bool(model_dirs) == bool(args.base_url):
        p.error("give MODEL_DIRS (or --make-synthetic) or --base-url (with --model)")
    clients = tuple(args.clients)
    if args.base_url:
        result = run_load(
            args.base_url,
            args.model,
            clients=clients,
            requests=args.requests,
            max_tokens=args.max_tokens,
            prompt=args.prompt,
        )
    else:
        from sparsify.bench.cpu import stream_bandwidth

        stream = stream_bandwidth()  # before any server: the machine is otherwise idle
        runs = [
            serve_and_load(
                d,
                clients=clients,
                requests=args.requests,
                max_tokens=args.max_tokens,
                prompt=args.prompt,
                threads=args.threads,
                start_timeout_s=args.start_timeout,
                stream_gbps=stream["gbps"],
            )
            for d in model_dirs
        ]
        for run in runs[1:]:
            run["tokens_per_s_vs_first"] = {
                lv["clients"]: lv["tokens_per_s"] / first["tokens_per_s"]
                for lv, first in zip(run["levels"], runs[0]["levels"], strict=True)
                if first["tokens_per_s"]
            }
        result = {"machine": machine(), "stream": stream, "models": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    def sec(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f} s"

    for run in result.get("models", [result]):
        print(run.get("model_dir", run["model"]))
        if "weight_bytes_per_token" in run:
            mem = run["memory_end"]
            print(
                f"  {run['weight_bytes_per_token'] / 1e9:.2f} GB of weights per token; loaded in "
                f"{run['load_s']:.0f} s; RSS {mem['rss_mb']:.0f} MB (peak {mem['peak_rss_mb']:.0f}); batch-1 decode "
                f"{run['decode_tokens_per_s_batch1'] or 0:.2f} tokens/s = {run['pct_bandwidth_limit'] or 0:.0f}% of "
                f"the bandwidth limit ({run['bandwidth_limit_tokens_per_s']:.2f})"
            )
            for batch, row in run["engine_in_process"].items():
                print(
                    f"  engine alone, batch {batch}: {row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:.2f} "
                    f"tokens/s, steps at {row['pct_bandwidth_limit']:.0f}% of the bandwidth limit"
                )
        for level in run["levels"]:
            print(
                f"  {level['clients']:>3} clients: {level['requests']} requests, {level['failures']} failed, "
                f"{level['tokens_per_s']:.2f} tokens/s, latency p50 {sec(level['latency_p50_s'])} "
                f"p95 {sec(level['latency_p95_s'])}, TTFT p50 {sec(level['ttft_p50_s'])} "
                f"p95 {sec(level['ttft_p95_s'])}"
            )
    print(f"wrote {args.out}")
    runs = result.get("models", [result])
    return 1 if any(level["failures"] for run in runs for level in run["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
