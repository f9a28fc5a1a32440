"""Load test of `sparsellama serve-model` with the official OpenAI client: throughput, latency, TTFT.

For each concurrency level (default 1, 4, 16 clients) every client sends N streaming completions
one after another (greedy, ``ignore_eos`` so each produces exactly ``--max-tokens`` tokens) and the
run records: failed requests, wall time, generated tokens/s over all clients, requests/s, p50/p95
latency (request sent → last chunk) and p50/p95 time to first token (request sent → first text
chunk). The run stops by itself: N requests per client, a timeout per request.

    python benchmarks/serve_load.py MODEL_DIR [--clients 1 4 16] [--requests 8] [--max-tokens 64]
                                    [--out serve_load.json]        # starts the server itself
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000/v1 --model NAME ...
    python benchmarks/serve_load.py --make-synthetic /tmp/mid --shape hidden=1024,intermediate=2816,layers=8,\
        heads=16,kv_heads=16,vocab=32000 --sparsity 0.7 ...      # a random 70% INT8 model of that shape

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


def start_server(model: str | os.PathLike, *extra: str, port: int | None = None,
                 timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `sparsellama serve-model` (this checkout's CLI) on 127.0.0.1; return (process, base URL) once healthy."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "flows.cli", "serve-model", str(model), "--host", "127.0.0.1", "--port", str(port),
           *extra]
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


async def _one_level(base_url: str, model: str, clients: int, requests: int, max_tokens: int, prompt: str,
                     timeout_s: float) -> dict:
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
                    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - start
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                records.append({"ok": tokens == max_tokens, "latency_s": time.perf_counter() - start,
                                "ttft_s": first, "tokens": tokens})
            except Exception as err:  # recorded as a failure; the run goes on
                records.append({"ok": False, "error": f"{type(err).__name__}: {err}",
                                "latency_s": time.perf_counter() - start, "ttft_s": None, "tokens": tokens})

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
        from sparsify.kernels import kernel_isa

        info["kernels_isa"] = kernel_isa()
    except Exception as err:  # the client side may lack the kernels; the figure still stands
        info["kernels_isa"] = f"unknown ({type(err).__name__})"
    return info


def run_load(base_url: str, model: str, *, clients: tuple[int, ...] = (1, 4, 16), requests: int = 4,
             max_tokens: int = 32, prompt: str = "def main():", timeout_s: float = 300.0) -> dict:
    """Run every concurrency level in turn against a live server; the results as a dict (see the module doc)."""
    levels = [asyncio.run(_one_level(base_url, model, c, requests, max_tokens, prompt, timeout_s)) for c in clients]
    return {"model": model, "base_url": base_url, "requests_per_client": requests, "max_tokens": max_tokens,
            "prompt": prompt, "machine": machine(), "levels": levels}


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
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    return hf


def make_synthetic_model(out: str | os.PathLike, *, hidden: int, intermediate: int, layers: int, heads: int,
                         kv_heads: int, vocab: int, context: int = 4096, sparsity: float = 0.7,
                         int8: bool = True, seed: int = 0) -> Path:
    """A random Llama of the given shape, decoder Linears pruned to ``sparsity`` per row (magnitude), INT8
    W8A8 (round-to-nearest, per channel) for the decoder Linears and ``lm_head`` when ``int8``, written in the
    project's sparse format with a byte-level tokenizer. For load tests of bigger shapes than the tests use."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsify.export import save_sparse_model
    from sparsify.masks import prunable_linear_names
    from sparsify.quantization import QuantScheme, attach_quantization, rtn_quantize

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=context, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    masks = {}
    scheme = QuantScheme(weight_bits=8, group_size=None, activation_bits=8)
    with torch.no_grad():
        for name in prunable_linear_names(model):
            w = model.get_parameter(name)
            k = int(w.shape[1] * sparsity)
            thr = w.abs().kthvalue(k, dim=1, keepdim=True).values if k else torch.zeros(w.shape[0], 1)
            masks[name] = w.abs() > thr
            w.mul_(masks[name])
        if int8:
            for name in [*masks, "lm_head.weight"]:
                linear = model.get_submodule(name.removesuffix(".weight"))
                q = rtn_quantize(linear.weight.detach(), scheme, mask=masks.get(name))
                attach_quantization(linear, q.weight, q.codes, q.scales, scheme)
    out = Path(out)
    save_sparse_model(model, masks, out)
    byte_tokenizer(vocab).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", help="start `sparsellama serve-model` on this folder")
    p.add_argument("--base-url", help="use a running server instead (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--model", help="the served model name (with --base-url)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default="def main():")
    p.add_argument("--threads", type=int, default=None, help="the started server's torch threads")
    p.add_argument("--out", default="serve_load.json")
    p.add_argument("--make-synthetic", metavar="DIR", default=None,
                   help="write a random sparse model to DIR first (shape from --shape) and serve it")
    p.add_argument("--shape", default="hidden=1024,intermediate=2816,layers=8,heads=16,kv_heads=16,vocab=32000",
                   help="the synthetic model's shape (key=value,...)")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--no-int8", dest="int8", action="store_false", help="synthetic: keep fp32 values")
    args = p.parse_args(argv)
    if args.make_synthetic:
        shape = {k: int(v) for k, v in (kv.split("=") for kv in args.shape.split(","))}
        args.model_dir = str(make_synthetic_model(args.make_synthetic, sparsity=args.sparsity, int8=args.int8,
                                                  **shape))
    if bool(args.model_dir) == bool(args.base_url):
        p.error("give MODEL_DIR or --base-url (with --model)")
    proc = None
    try:
        if args.model_dir:
            extra = ["--max-batch", str(max(args.clients)), "--max-queue", str(max(args.clients))]
            if args.threads:
                extra += ["--threads", str(args.threads)]
            proc, base = start_server(args.model_dir, *extra)
            with urllib.request.urlopen(base + "/models") as r:
                model = json.load(r)["data"][0]["id"]
        else:
            base, model = args.base_url, args.model
        result = run_load(base, model, clients=tuple(args.clients), requests=args.requests,
                          max_tokens=args.max_tokens, prompt=args.prompt)
    finally:
        if proc is not None:
            stop_server(proc)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    def sec(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f} s"

    for level in result["levels"]:
        print(f"{level['clients']:>3} clients: {level['requests']} requests, {level['failures']} failed, "
              f"{level['tokens_per_s']:.1f} tokens/s, latency p50 {sec(level['latency_p50_s'])} "
              f"p95 {sec(level['latency_p95_s'])}, TTFT p50 {sec(level['ttft_p50_s'])} p95 {sec(level['ttft_p95_s'])}")
    print(f"wrote {args.out}")
    return 1 if any(level["failures"] for level in result["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
