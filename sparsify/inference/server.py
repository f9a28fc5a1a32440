"""An OpenAI-compatible HTTP server over the continuous-batching :class:`~sparsify.inference.engine.Engine`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
tokenizer's chat template), ``GET /health``, ``GET /metrics`` (Prometheus text format). With
``"stream": true`` the answer is server-sent events (``data: {chunk}`` ... ``data: [DONE]``) in
OpenAI's chunk shapes; ``stream_options.include_usage`` adds the usage chunk. Every response
reports usage (prompt, completion, total tokens).

Requests are decoded together: each one is submitted to the engine, whose thread runs one batched
step for all active sequences and hands each its tokens through a thread-safe callback into the
request's asyncio queue. Bad requests get a 4xx JSON body in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``) — malformed JSON, a bad field (negative
temperature...), an unknown model (404), a prompt or ``max_tokens`` beyond the context — and a full
queue gets 503 with ``Retry-After``; the server keeps running. A client that disconnects (mid-stream
or while waiting for a whole answer) has its sequence cancelled (a watcher task polls for the
disconnect), which frees its batch slot before the next step, or its place in the queue.

Extensions beyond OpenAI's fields (as vLLM has them): ``top_k`` and ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparsify.errors import UserInputError
from sparsify.inference.engine import ContextLengthError, Engine, Output, QueueFull, Request
from sparsify.inference.generation import SamplingParams, chat_prompt_ids

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often each request checks that its client is still there


# --------------------------------------------------------------------------- request bodies


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are ignored, as OpenAI-compatible servers do

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default and range
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise UserInputError("stop: up to 4 non-empty strings")
        return stops

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise UserInputError("one prompt per request (send several requests; they are batched together)")
            return v[0]
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


# --------------------------------------------------------------------------- metrics


class HTTPCounters:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()


class CountRequests:
    """ASGI middleware counting responses by path and status. A plain ASGI wrapper, not Starlette's
    BaseHTTPMiddleware, which wraps ``receive`` so that ``Request.is_disconnected()`` never sees the
    client leave."""

    def __init__(self, app, counters: HTTPCounters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counters.requests[(scope["path"], message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def render_metrics(engine: Engine, http: HTTPCounters) -> str:
    """Prometheus text exposition (version 0.0.4) of the server's and the engine's counters."""
    s = engine.stats()
    lines = [
        "# HELP sparsellama_http_requests_total HTTP requests by path and status code.",
        "# TYPE sparsellama_http_requests_total counter",
    ]
    for (path, status), n in sorted(http.requests.items()):
        lines.append(f'sparsellama_http_requests_total{{path="{path}",status="{status}"}} {n}')
    lines += [
        "# HELP sparsellama_requests_finished_total Generation requests by finish reason.",
        "# TYPE sparsellama_requests_finished_total counter",
    ]
    for reason, n in sorted(s.requests_finished.items()):
        lines.append(f'sparsellama_requests_finished_total{{reason="{reason}"}} {n}')
    scalars = [
        ("prompt_tokens_total", "counter", "Prompt tokens admitted to the batch.", s.prompt_tokens),
        ("generation_tokens_total", "counter", "Tokens generated.", s.generated_tokens),
        ("steps_total", "counter", "Batched decode steps.", s.steps),
        ("tokens_per_second", "gauge", "Generated tokens per second over the last seconds.", s.tokens_per_second),
        ("queue_depth", "gauge", "Requests waiting for a batch slot.", s.queue_depth),
        ("running_sequences", "gauge", "Sequences in the running batch.", s.running),
        ("kv_cache_bytes", "gauge", "Bytes held by the running sequences' KV caches.", s.kv_cache_bytes),
    ]
    for name, kind, help_, value in scalars:
        lines += [
            f"# HELP sparsellama_{name} {help_}",
            f"# TYPE sparsellama_{name} {kind}",
            f"sparsellama_{name} {value:g}" if isinstance(value, float) else f"sparsellama_{name} {value}",
        ]
    lines += [
        "# HELP sparsellama_time_to_first_token_seconds Submission to first generated token.",
        "# TYPE sparsellama_time_to_first_token_seconds histogram",
    ]
    for bound, count in s.ttft_buckets:
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        lines.append(f'sparsellama_time_to_first_token_seconds_bucket{{le="{le}"}} {count}')
    lines += [
        f"sparsellama_time_to_first_token_seconds_sum {s.ttft_sum:.6f}",
        f"sparsellama_time_to_first_token_seconds_count {s.ttft_count}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the app


def _usage(out: Output) -> dict:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, name: str):
    """The FastAPI app serving ``engine`` as model ``name``. The engine's thread runs while the app does."""
    created = int(time.time())
    http = HTTPCounters()
    tokenizer = engine.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="sparsellama", lifespan=lifespan)

    app.add_middleware(CountRequests, counters=http)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    def check_model(model: str) -> None:
        if model != name:
            raise APIError(
                404,
                f"The model `{model}` does not exist (this server has `{name}`)",
                param="model",
                code="model_not_found",
            )

    watchers: set[asyncio.Task] = set()  # strong references: asyncio keeps only weak ones to tasks

    async def watch_disconnect(http_request: HTTPRequest, request: Request, outputs: asyncio.Queue) -> None:
        """Cancel ``request`` as soon as its client is gone, and wake its consumer with None.

        Its own task, polling, because Starlette watches for disconnects only while it streams a response
        from an ASGI < 2.4 server (uvicorn's HTTP is 2.3): a client waiting for a whole answer would keep its
        slot, and under ASGI 2.4 a stream learns of it only when a send fails (a queued request sends
        nothing) and its abandoned generator is closed only when garbage-collected.
        """
        while not request.finished:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if not request.finished and await http_request.is_disconnected():
                engine.cancel(request)
                outputs.put_nowait(None)
                logger.info("request %d: client disconnected, sequence cancelled", request.id)
                return

    def submit(
        http_request: HTTPRequest, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output | None] = asyncio.Queue()
        try:
            request = engine.submit(prompt_ids, params, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        except ContextLengthError as err:
            raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from err
        except QueueFull as err:
            raise APIError(
                503,
                f"the server is busy: {err}",
                type="server_error",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            ) from err
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from err
        task = asyncio.create_task(watch_disconnect(http_request, request, outputs))
        watchers.add(task)
        task.add_done_callback(watchers.discard)
        return request, outputs

    def max_tokens(requested: int | None, prompt_len: int, default: int | None) -> int:
        if requested is not None:
            return requested
        room = engine.max_context - prompt_len
        return max(1, min(default, room) if default else room)

    async def collect(request: Request, outputs: asyncio.Queue) -> tuple[str, Output]:
        pieces = []
        try:
            while True:
                out = await outputs.get()
                if out is None:  # the client left; nobody reads this answer
                    raise APIError(499, "the client closed the request", code="client_disconnected")
                pieces.append(out.text)
                if out.finished:
                    if out.error:
                        raise APIError(500, f"generation failed: {out.error}", type="server_error")
                    return "".join(pieces), out
        finally:
            if not request.finished:
                engine.cancel(request)

    async def stream(
        request: Request, outputs: asyncio.Queue, chunk, include_usage: bool, first: dict | None = None
    ) -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            while True:
                out = await outputs.get()
                if out is None:  # the client left
                    return
                if out.error:  # headers are sent: the error goes in the stream, as OpenAI's API sends it
                    yield _sse(APIError(500, f"generation failed: {out.error}", type="server_error").body())
                    yield _sse("[DONE]")
                    return
                if out.text or out.finished:
                    yield _sse(chunk(out))
                if out.finished:
                    if include_usage:
                        yield _sse(chunk(None) | {"choices": [], "usage": _usage(out)})
                    yield _sse("[DONE]")
                    return
        finally:  # ended, or closed after a failed send
            if not request.finished:
                engine.cancel(request)

    @app.get("/health")
    async def health():
        alive = engine.is_running
        return JSONResponse(
            {"status": "ok" if alive else "engine stopped", "model": name}, status_code=200 if alive else 503
        )

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine, http), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "sparsellama",
            "max_model_len": engine.max_context,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: HTTPRequest):
        check_model(body.model)
        for field_name, value in (("echo", body.echo), ("logprobs", body.logprobs), ("suffix", body.suffix)):
            if value:
                raise APIError(400, f"{field_name} is not supported by this server", param=field_name)
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported by this server", param="best_of")
        prompt_ids = tokenizer(body.prompt).input_ids if isinstance(body.prompt, str) else list(body.prompt)
        params = body.sampling(max_tokens(body.max_tokens, len(prompt_ids), 16))  # OpenAI's default: 16
        request, outputs = submit(http_request, prompt_ids, params)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(out: Output | None) -> dict:
            choices = (
                []
                if out is None
                else [
                    {
                        "index": 0,
                        "text": out.text,
                        "logprobs": None,
                        "finish_reason": out.finish_reason if out.finished else None,
                    }
                ]
            )
            return {"id": rid, "object": "text_completion", "created": now, "model": name, "choices": choices}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(request, outputs, chunk, include), media_type="text/event-stream")
        text, last = await collect(request, outputs)
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": _usage(last),
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http_request: HTTPRequest):
        check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs is not supported by this server", param="logprobs")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        try:
            prompt_ids = chat_prompt_ids(tokenizer, messages)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from err
        except Exception as err:  # a template may reject a conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from err
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = body.sampling(max_tokens(requested, len(prompt_ids), None))
        request, outputs = submit(http_request, prompt_ids, params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(out: Output | None) -> dict:
            choices = []
            if out is not None:
                delta = {"content": out.text} if out.text else {}
                choices = [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": out.finish_reason if out.finished else None,
                    }
                ]
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name, "choices": choices}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            first = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": name,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
            }
            return StreamingResponse(stream(request, outputs, chunk, include, first), media_type="text/event-stream")
        text, last = await collect(request, outputs)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": last.finish_reason,
                }
            ],
            "usage": _usage(last),
        }

    return app


def serve(engine: Engine, *, name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn, one process: the engine batches in its own thread)."""
    import uvicorn

    logger.info(
        "serving %s on http://%s:%d/v1 (batch <= %d, queue <= %d, context %d)",
        name,
        host,
        port,
        engine.max_batch,
        engine.max_queue,
        engine.max_context,
    )
    uvicorn.run(create_app(engine, name), host=host, port=port, log_level=log_level)
