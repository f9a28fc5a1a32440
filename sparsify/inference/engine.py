"""A continuous-batching decode engine for Llama models on the sparse CPU runtime.

:class:`BatchedLlama` is a small Llama forward over a *batch of sequences*, each with its own
:class:`KVCache` and any number of new tokens (its whole prompt when it joins, then one token a
step). All sequences' new tokens go through every decoder Linear together — one call with
``M = total new tokens`` rows, which the sparse kernels (and dense GEMMs) process while streaming
each weight once — so a decode step costs about one weight read however many sequences share it
(batch-1 decode is memory-bound). Attention is per sequence, against its own cache (grouped-query
heads without copying K/V): a decoding sequence's one new token through ``decode_attention`` (the
kernels' attention.h), prompt chunks through torch's SDPA. Rotary cos/sin come from the model's own rotary
module, so every rope scaling it knows (``llama3``, ``linear``, ``dynamic``...) stays right. The
modules are the model's own (SparseLinear or nn.Linear, RMSNorm, MLP): no weight is copied.

:class:`Engine` schedules requests: a bounded waiting queue (:class:`QueueFull` beyond it); before
every step the waiting requests join the running batch up to ``max_batch`` and finished or
cancelled ones leave it (continuous batching). A background thread runs the steps; each request's
outputs go to its callback (text deltas with stop strings and incremental detokenization from
:mod:`sparsify.inference.generation`). :meth:`Engine.generate` is the blocking, streaming form the CLI uses.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify.errors import ModelLoadError, UserInputError
from sparsify.inference.generation import SamplingParams, TextStream, make_generator, next_token
from sparsify.inference.kernels.ops import decode_attention, kernel_isa

logger = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CACHE_CHUNK = 256  # KV slots reserved past the prompt at first; the cache grows by doubling


class ContextLengthError(UserInputError):
    """The prompt, or prompt + max_tokens, does not fit the context."""


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: try again later."""


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """One sequence's keys and values: per layer ``[kv_heads, capacity, head_dim]``; ``length`` slots used."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int) -> None:
        self.k = [torch.empty(kv_heads, capacity, head_dim, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(kv_heads, capacity, head_dim, dtype=dtype) for _ in range(layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions (doubling, so appends cost O(1) amortized)."""
        if total <= self.capacity:
            return
        new = max(total, 2 * self.capacity)
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                grown = torch.empty(t.shape[0], new, t.shape[2], dtype=t.dtype)
                grown[:, : self.length] = t[:, : self.length]
                cache[i] = grown

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class BatchedLlama:
    """The forward of a Llama-family ``*ForCausalLM`` over several sequences with separate KV caches."""

    def __init__(self, model: nn.Module) -> None:
        try:
            base = model.model
            self.embed = base.embed_tokens
            self.layers = list(base.layers)
            self.norm = base.norm
            self.rotary = base.rotary_emb
            self.lm_head = model.lm_head
            for layer in self.layers:
                attn = layer.self_attn
                _ = (
                    attn.q_proj,
                    attn.k_proj,
                    attn.v_proj,
                    attn.o_proj,
                    layer.mlp,
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                )
        except AttributeError as err:
            raise ModelLoadError(
                f"{type(model).__name__} is not a Llama-family causal LM (model.layers[i].self_attn."
                f"q_proj ..., model.rotary_emb, lm_head): {err}"
            ) from err
        cfg = model.config
        self.config = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.dtype = self.embed.weight.dtype
        self.scale = self.head_dim**-0.5
        # One new token attends through the decode_attention kernel (fp32 accumulation over a bf16 or
        # fp32 cache; torch's SDPA reads a bf16 cache 4-12x slower at q_len = 1). fp16 caches, and
        # machines without the compiled kernels, stay with SDPA.
        self.decode_kernel = self.dtype in (torch.bfloat16, torch.float32) and kernel_isa() != "torch"
        self.max_positions = int(cfg.max_position_embeddings)
        if getattr(cfg, "sliding_window", None):
            raise ModelLoadError("sliding-window attention is not supported by the engine")

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(len(self.layers), self.n_kv, self.head_dim, self.dtype, capacity)

    @torch.no_grad()
    def forward(
        self, new_ids: Sequence[Sequence[int]], caches: Sequence[KVCache], *, all_logits: bool = False
    ) -> Tensor | list[Tensor]:
        """Run each sequence's ``new_ids`` after what its cache holds; append them to the caches.

        Returns fp32 logits of each sequence's last new token ``[n_seqs, vocab]``, or with
        ``all_logits`` a list of ``[n_new, vocab]`` (for tests against the reference model).
        """
        if len(new_ids) != len(caches) or not new_ids:
            raise ValueError("one list of new ids per cache, at least one sequence")
        counts = [len(ids) for ids in new_ids]
        if min(counts) < 1:
            raise ValueError("every sequence needs at least one new token")
        for cache, n in zip(caches, counts, strict=True):
            if cache.length + n > self.max_positions:
                raise ContextLengthError(f"{cache.length + n} positions exceed the model's {self.max_positions}")
            cache.reserve(cache.length + n)
        ids = torch.tensor([t for seq in new_ids for t in seq], dtype=torch.long)
        positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, counts, strict=True)])
        x = self.embed(ids)  # [T, hidden]: every sequence's new tokens, one after the other
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim], broadcast over heads
        total = ids.numel()
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(total, self.n_heads, self.head_dim)
            k = attn.k_proj(h).view(total, self.n_kv, self.head_dim)
            v = attn.v_proj(h).view(total, self.n_kv, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            outs, start = [], 0
            for cache, n in zip(caches, counts, strict=True):
                past, end = cache.length, start + n
                cache.k[i][:, past : past + n] = k[start:end].transpose(0, 1)
                cache.v[i][:, past : past + n] = v[start:end].transpose(0, 1)
                if n == 1 and self.decode_kernel:  # a decoding sequence: memory-bound, our kernel
                    o = decode_attention(q[start], cache.k[i], cache.v[i], past + 1, self.scale)
                else:  # query j (position past + j) sees keys 0 .. past + j
                    mask = torch.ones(n, past + n, dtype=torch.bool).tril(past) if n > 1 else None
                    o = F.scaled_dot_product_attention(
                        q[None, start:end].transpose(1, 2),
                        cache.k[i][None, :, : past + n],
                        cache.v[i][None, :, : past + n],
                        attn_mask=mask,
                        scale=self.scale,
                        enable_gqa=self.n_kv != self.n_heads,
                    )[0].transpose(0, 1)
                outs.append(o.reshape(n, self.n_heads * self.head_dim))
                start = end
            x = x + attn.o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        for cache, n in zip(caches, counts, strict=True):
            cache.length += n
        if all_logits:
            return list(self.lm_head(self.norm(x)).float().split(counts))
        last = torch.tensor(list(itertools.accumulate(counts))) - 1
        return self.lm_head(self.norm(x[last])).float()


# --------------------------------------------------------------------------- scheduling


@dataclass
class Output:
    """One event of a request: new text, and at the end why it finished and the token counts."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A sequence in the engine. ``callback`` is called from the engine's thread."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    callback: Callable[[Output], None]
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    generated: list[int] = field(default_factory=list)
    cache: KVCache | None = None
    cancelled: bool = False
    finished: bool = False
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    prefilled: int = 0  # prompt tokens already in the cache (prefill may take several steps)


@dataclass
class EngineStats:
    """Counters for /metrics (a snapshot)."""

    requests_finished: dict[str, int]
    prompt_tokens: int
    generated_tokens: int
    queue_depth: int
    running: int
    steps: int
    tokens_per_second: float  # generated tokens over the last `window` seconds
    ttft_buckets: list[tuple[float, int]]  # (upper bound, cumulative count), Prometheus-style
    ttft_sum: float
    ttft_count: int
    kv_cache_bytes: int


class Engine:
    """Continuous batching over :class:`BatchedLlama`: submit, cancel, a background step loop."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_context: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        prefill_chunk: int = 512,
        rate_window_s: float = 10.0,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise UserInputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        if prefill_chunk < 1:
            raise UserInputError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        # Prompt tokens per step over all joining sequences: a long prompt is prefilled over several
        # steps, so the sequences already decoding keep getting a token every step meanwhile.
        self.prefill_chunk = prefill_chunk
        self.runner = BatchedLlama(model)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        limit = self.runner.max_positions
        if max_context is not None and max_context < 2:
            raise UserInputError(f"max_context must be >= 2, got {max_context}")
        self.max_context = min(limit, max_context) if max_context else limit
        if eos_token_ids is None:
            eos_token_ids = default_eos_ids(model, tokenizer)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        # statistics
        self._finished: dict[str, int] = {}
        self._prompt_tokens = 0
        self._generated = 0
        self._steps = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._window = rate_window_s
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0

    # ------------------------------------------------------------------ requests

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError / ContextLengthError if the request cannot run."""
        if not prompt_ids:
            raise UserInputError("the prompt is empty")
        vocab = self.runner.embed.num_embeddings
        if any(not 0 <= int(t) < vocab for t in prompt_ids):
            raise UserInputError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_ids) >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; the context is {self.max_context} "
                "tokens, and at least one must be left to generate"
            )
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ContextLengthError(
                f"max_tokens={params.max_tokens} + {len(prompt_ids)} prompt tokens exceed the context of "
                f"{self.max_context} tokens (at most {self.max_context - len(prompt_ids)} new tokens)"
            )

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, callback: Callable[[Output], None]) -> Request:
        """Queue a request (ValueError if it cannot run, QueueFull if the queue is full)."""
        self.check(prompt_ids, params)
        request = Request(next(self._ids), [int(t) for t in prompt_ids], params, callback)
        with self._cond:
            # Free batch slots take requests at the next step; beyond them, max_queue may wait.
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._running)):
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the limit is {self.max_queue})")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client went away): it leaves the batch before the next step."""
        with self._cond:
            request.cancelled = True
            if request in self._waiting:  # never admitted: it ends here, with no output
                self._waiting.remove(request)
                request.finished = True
                self._count_finished("cancelled")

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Output]:
        """Submit and yield the request's outputs as they come (starts the step thread if needed)."""
        outputs: queue.Queue[Output] = queue.Queue()
        self.start()
        request = self.submit(prompt_ids, params, outputs.put)
        try:
            while True:
                out = outputs.get()
                yield out
                if out.finished:
                    return
        finally:
            if not request.finished:
                self.cancel(request)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._loop, name="sparsellama-engine", daemon=True)
                self._thread.start()

    @property
    def is_running(self) -> bool:
        """Whether the step thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the step thread; running and waiting requests end with finish_reason 'cancelled'."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            for request in list(self._waiting) + self._running:
                self._finish(request, "cancelled", "")
            self._waiting.clear()
            self._running.clear()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as err:  # a bug in a step must not leave every client waiting forever
                logger.exception("engine step failed outside the forward")
                with self._cond:
                    for request in self._running:
                        self._finish(request, "error", "", error=f"{type(err).__name__}: {err}")
                    self._running = []

    def step(self) -> int:
        """Admit waiting requests, run one batched forward, hand out one token per sequence. Returns the batch size."""
        with self._cond:
            for request in self._running:
                if request.cancelled:
                    self._finish(request, "cancelled", "")
            self._running = [r for r in self._running if not r.finished]
            while self._waiting and len(self._running) < self.max_batch:
                request = self._waiting.popleft()
                request.cache = self.runner.new_cache(
                    len(request.prompt_ids) + min(request.params.max_tokens, CACHE_CHUNK)
                )
                request.stream = TextStream(self.tokenizer, request.params.stop)
                request.generator = None if request.params.greedy else make_generator(request.params.seed)
                self._prompt_tokens += len(request.prompt_ids)
                self._running.append(request)
            running = list(self._running)
        batch, new_ids, budget = [], [], self.prefill_chunk
        for r in running:
            if r.prefilled < len(r.prompt_ids):  # still prefilling: a share of this step's prompt budget
                if budget <= 0:
                    continue
                take = min(budget, len(r.prompt_ids) - r.prefilled)
                new_ids.append(r.prompt_ids[r.prefilled : r.prefilled + take])
                budget -= take
            else:
                new_ids.append(r.generated[-1:])
            batch.append(r)
        if not batch:
            return 0
        try:
            logits = self.runner.forward(new_ids, [r.cache for r in batch])
        except Exception as err:  # a failing step ends its requests, not the engine
            logger.exception("engine step failed")
            with self._cond:
                for request in batch:
                    self._finish(request, "error", "", error=f"{type(err).__name__}: {err}")
                self._running = [r for r in self._running if r not in batch]
            return len(batch)
        now = time.perf_counter()
        done, sampled = [], 0
        for request, ids, row in zip(batch, new_ids, logits, strict=True):
            if request.prefilled < len(request.prompt_ids):
                request.prefilled += len(ids)
                if request.prefilled < len(request.prompt_ids):
                    continue  # more of the prompt next step: no token yet
            try:
                token = next_token(row, request.params, request.generator)
            except RuntimeError as err:  # e.g. non-finite logits under sampling: this request ends, not the batch
                logger.error("request %d: sampling failed: %s", request.id, err)
                done.append((request, "error", "", None, f"sampling failed: {err}"))
                continue
            request.generated.append(token)
            sampled += 1
            if request.first_token is None:
                request.first_token = now
                self._observe_ttft(now - request.submitted)
            eos = token in self.eos_token_ids and not request.params.ignore_eos
            delta, stopped = ("", False) if eos else request.stream.push(token)
            reason = None
            if eos or stopped:
                reason = "stop"
            elif len(request.generated) >= request.params.max_tokens or request.cache.length >= self.max_context:
                reason = "length"
            if reason is None:
                if not request.cancelled:  # one output per token, even when its text is still held back
                    self._emit(request, Output(delta, [token]))
            else:
                done.append((request, reason, delta, token, None))
        with self._cond:
            self._steps += 1
            self._generated += sampled
            self._recent.append((now, sampled))
            for request, reason, delta, token, error in done:
                self._finish(request, reason, delta, [] if token is None else [token], error)
            self._running = [r for r in self._running if not r.finished]
        return len(batch)

    # ------------------------------------------------------------------ helpers

    def _emit(self, request: Request, output: Output) -> None:
        try:
            request.callback(output)
        except Exception:  # a broken consumer must not stop the batch
            logger.exception("request %d: output callback failed; cancelling it", request.id)
            request.cancelled = True

    def _finish(
        self, request: Request, reason: str, delta: str, token_ids: Sequence[int] = (), error: str | None = None
    ) -> None:
        """End a request; its last output carries the rest of its text and ``token_ids`` not sent yet."""
        if request.finished:
            return
        request.finished = True
        text = delta
        if reason in ("stop", "length") and request.stream is not None:
            text += request.stream.finish()
        self._count_finished(reason)
        request.cache = None  # free the KV memory now
        if reason != "cancelled" or not request.cancelled:
            self._emit(
                request,
                Output(text, list(token_ids), True, reason, len(request.prompt_ids), len(request.generated), error),
            )

    def _count_finished(self, reason: str) -> None:
        self._finished[reason] = self._finished.get(reason, 0) + 1

    def _observe_ttft(self, seconds: float) -> None:
        self._ttft_counts[bisect_left(TTFT_BUCKETS, seconds)] += 1
        self._ttft_sum += seconds

    def stats(self) -> EngineStats:
        with self._cond:
            now = time.perf_counter()
            while self._recent and self._recent[0][0] < now - self._window:
                self._recent.popleft()
            span = min(self._window, now - self._recent[0][0]) if self._recent else 0.0
            recent = sum(n for _, n in self._recent)
            cumulative, buckets = 0, []
            for bound, count in zip((*TTFT_BUCKETS, float("inf")), self._ttft_counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            return EngineStats(
                requests_finished=dict(self._finished),
                prompt_tokens=self._prompt_tokens,
                generated_tokens=self._generated,
                queue_depth=len(self._waiting),
                running=len(self._running),
                steps=self._steps,
                tokens_per_second=recent / span if span > 0 else 0.0,
                ttft_buckets=buckets,
                ttft_sum=self._ttft_sum,
                ttft_count=cumulative,
                kv_cache_bytes=sum(r.cache.nbytes for r in self._running if r.cache is not None),
            )


def default_eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids: the generation config's (an int or a list, as Llama 3 has) and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
            break
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@dataclass
class GenerationResult:
    """One finished generation and its timing."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    seconds: float  # submit to last token
    time_to_first_token: float

    @property
    def tokens_per_second(self) -> float:
        """Decode rate: tokens after the first over the time after the first (prefill excluded)."""
        decode = self.seconds - self.time_to_first_token
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else 0.0


def stream_generation(
    engine: Engine, prompt_ids: Sequence[int], params: SamplingParams, write: Callable[[str], None] | None = None
) -> GenerationResult:
    """Generate, handing each text delta to ``write`` as it comes; the whole result at the end."""
    start = time.perf_counter()
    first = None
    pieces, ids = [], []
    out = None
    for out in engine.generate(prompt_ids, params):
        if first is None and out.token_ids:
            first = time.perf_counter() - start
        ids.extend(out.token_ids)
        if out.text:
            pieces.append(out.text)
            if write is not None:
                write(out.text)
    if out is not None and out.error:
        raise RuntimeError(f"generation failed: {out.error}")
    seconds = time.perf_counter() - start
    return GenerationResult(
        "".join(pieces),
        ids,
        out.finish_reason if out else "error",
        len(prompt_ids),
        seconds,
        first if first is not None else seconds,
    )
