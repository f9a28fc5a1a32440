"""`sparsellama serve-model` live on 127.0.0.1 (a real process on a free port), driven by the official
`openai` client: completions and chat, streaming or not, equal to `sparsellama generate` and to
transformers' greedy generate; OpenAI-shaped errors; disconnects free their slots; a bounded load test.

SPARSELLAMA_LOADTEST_N (requests per client, default 2) and SPARSELLAMA_LOADTEST_JSON (where the load
test's results go) size the load test when run by hand.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time

import httpx
import pytest
import torch

from flows.cli import main as cli
from sparsify.inference.kernels import load_extension
from tests.conftest import REPO
from tests.serve_fixtures import (
    sparse_llama,
    tokenizer,  # noqa: F401  (a pytest fixture)
    write_sparse_folder,
)

openai = pytest.importorskip("openai")

CONTEXT = 2048
MAX_BATCH, MAX_QUEUE = 8, 8


def _load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    load_extension()  # build once here, not inside the server's startup
    dense, masks = sparse_llama(max_position_embeddings=CONTEXT)
    folder = write_sparse_folder(dense, masks, tmp_path_factory.mktemp("serve") / "tiny-sparse", tokenizer)
    return dense, folder


@pytest.fixture(scope="module")
def server(model_dir):
    proc, base = bench.start_server(
        model_dir[1], "--threads", "1", "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE)
    )
    try:
        yield base
    finally:
        log = bench.stop_server(proc)
        assert "Traceback" not in log, log


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def hf_text(model, tokenizer, ids: list[int], max_new: int) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=304)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base.removesuffix("/v1") + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-sparse"]
    assert httpx.get(server.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_completions_equal_cli_generate_and_transformers(client, model_dir, tokenizer, capsys):
    dense, folder = model_dir
    prompt = "def read(self, path):\n    "
    ids = tokenizer(prompt).input_ids
    expected = hf_text(dense, tokenizer, ids, 24)
    assert cli(["generate", str(folder), prompt, "--max-tokens", "24"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    done = client.completions.create(model="tiny-sparse", prompt=prompt, max_tokens=24, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        len(ids),
        24,
        len(ids) + 24,
    )
    chunks = list(
        client.completions.create(
            model="tiny-sparse",
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert len([c for c in chunks if c.choices]) > 2  # streamed, not one block
    assert (
        chunks[-1].usage.completion_tokens == 24
        and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    )


def test_chat_equals_transformers_on_the_template(client, model_dir, tokenizer):
    dense, _ = model_dir
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2+2?"}]
    ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    ).input_ids
    expected = hf_text(dense, tokenizer, ids, 16)
    done = client.chat.completions.create(model="tiny-sparse", messages=messages, max_tokens=16, temperature=0)
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == expected
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 16
    chunks = list(
        client.chat.completions.create(
            model="tiny-sparse", messages=messages, max_completion_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_seeded_sampling(client):
    kw = dict(
        model="tiny-sparse",
        prompt="import",
        max_tokens=20,
        temperature=0.9,
        top_p=0.95,
        seed=11,
        extra_body={"top_k": 40, "ignore_eos": True},
    )
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b and len(a) > 2
    stop = a[len(a) // 2 : len(a) // 2 + 2]
    cut = client.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.text == a[: a.index(stop)] and cut.finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_running(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(
            model="tiny-sparse", messages=[{"role": "user", "content": "x"}], temperature=-0.5
        )
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-sparse", prompt="hi", max_tokens=CONTEXT)
    assert err.value.body["code"] == "context_length_exceeded" and "max_tokens" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-sparse", prompt="x" * (4 * CONTEXT), max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded" and "the prompt has" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model="tiny-sparse", prompt="hi", stop=[""])
    raw = httpx.post(
        server + "/completions",
        content=b'{"model": "tiny-sparse", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"} and "JSON" in raw.json()["error"]["message"]
    raw = httpx.post(server + "/chat/completions", json={"model": "tiny-sparse", "messages": []})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages"
    done = client.completions.create(model="tiny-sparse", prompt="still alive", max_tokens=3, temperature=0)
    assert done.usage.completion_tokens == 3


def test_full_queue_is_refused_and_disconnects_free_their_slots(client, server):
    """MAX_BATCH running + MAX_QUEUE waiting long streams fill the server: one more gets 503. Closing the
    streams cancels their sequences (running ones leave the batch before the next step)."""
    before = metrics(server)
    body = {"model": "tiny-sparse", "prompt": "x", "max_tokens": CONTEXT - 8, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", server + "/completions", json=body) for _ in range(MAX_BATCH + MAX_QUEUE)]
        responses = [s.__enter__() for s in streams]  # headers arrive once each request is queued
        assert all(r.status_code == 200 for r in responses)
        lines = responses[0].iter_lines()  # kept: dropping the iterator would close that stream
        next(lines)  # the first ones are decoding
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny-sparse", prompt="one more", max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "server_overloaded"
        for s in streams:
            s.__exit__(None, None, None)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = metrics(server)
        if now["sparsellama_running_sequences"] == 0 and now["sparsellama_queue_depth"] == 0:
            break
        time.sleep(0.1)
    cancelled = 'sparsellama_requests_finished_total{reason="cancelled"}'
    assert now["sparsellama_running_sequences"] == 0 and now["sparsellama_queue_depth"] == 0
    assert now[cancelled] - before.get(cancelled, 0) == MAX_BATCH + MAX_QUEUE
    assert now["sparsellama_generation_tokens_total"] - before["sparsellama_generation_tokens_total"] < MAX_BATCH * (
        CONTEXT - 8
    )  # nobody decoded to the end
    again = client.completions.create(model="tiny-sparse", prompt="free again", max_tokens=2)
    assert again.usage.completion_tokens == 2


def test_a_client_that_stops_waiting_for_a_whole_answer_frees_its_slot(server):
    before = metrics(server)
    body = {"model": "tiny-sparse", "prompt": "x", "max_tokens": CONTEXT - 8, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    cancelled = 'sparsellama_requests_finished_total{reason="cancelled"}'
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = metrics(server)
        if now.get(cancelled, 0) > before.get(cancelled, 0) and now["sparsellama_running_sequences"] == 0:
            break
        time.sleep(0.1)
    assert now.get(cancelled, 0) - before.get(cancelled, 0) == 1 and now["sparsellama_running_sequences"] == 0


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="tiny-sparse", prompt="count me", max_tokens=2)
    m = metrics(server)
    assert m['sparsellama_http_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert m["sparsellama_time_to_first_token_seconds_count"] >= 1
    assert (
        m['sparsellama_time_to_first_token_seconds_bucket{le="+Inf"}']
        == m["sparsellama_time_to_first_token_seconds_count"]
    )
    for name in ("sparsellama_tokens_per_second", "sparsellama_queue_depth", "sparsellama_prompt_tokens_total"):
        assert name in m


def test_load_levels_complete_without_failures(server, tmp_path):
    n = int(os.environ.get("SPARSELLAMA_LOADTEST_N", "2"))
    result = bench.run_load(server, "tiny-sparse", clients=(1, 4, 16), requests=n, max_tokens=16, timeout_s=120)
    out = os.environ.get("SPARSELLAMA_LOADTEST_JSON") or str(tmp_path / "serve_load.json")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    for level, clients in zip(result["levels"], (1, 4, 16), strict=True):
        assert level["clients"] == clients and level["requests"] == clients * n
        assert level["failures"] == 0, level["errors"]
        assert level["generated_tokens"] == clients * n * 16
        assert level["latency_p50_s"] <= level["latency_p95_s"] and level["ttft_p50_s"] <= level["latency_p50_s"]


def test_serving_modules_import_no_orchestration():
    """sparsify/ stays a library: the loader, engine and server pull no prefect/mlflow/dvc."""
    import subprocess
    import sys

    code = (
        "import sys; import sparsify.inference.loading, sparsify.inference.engine; "
        "import sparsify.inference.generation, sparsify.inference.server; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'dvc'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@torch.no_grad()
def test_synthetic_models_hold_the_same_weights_and_load_on_the_runtime(tmp_path):
    """The load test's random models: every kind is the same weights (dense bf16, pruned fp32, pruned INT8),
    written tensor by tensor, and each loads and generates; the weight bytes per token are the stored ones."""
    from safetensors.torch import load_file

    from sparsify.inference.export import load_sparse_tensors
    from sparsify.inference.loading import load_runtime_model

    shape = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300)
    folders = {kind: bench.make_synthetic_model(tmp_path / kind, kind=kind, **shape) for kind in bench.SYNTHETIC_KINDS}
    dense = load_file(folders["dense_bf16"] / "model.safetensors")
    sparse = load_sparse_tensors(folders["sparse"])
    quant = load_sparse_tensors(folders["sparse_int8"])
    assert sorted(dense) == sorted(sparse) == sorted(quant)
    up = "model.layers.1.mlp.up_proj.weight"
    assert (sparse[up] == 0).float().mean() == pytest.approx(0.7, abs=0.01)
    # The same fp32 draws: the kept ones, rounded to bf16, are the dense model's; 70% of every row pruned.
    assert torch.equal(sparse[up].bfloat16(), dense[up] * (sparse[up] != 0))
    assert torch.equal((sparse[up] == 0).sum(1), torch.full((128,), round(0.7 * 64)))
    assert torch.equal(quant[up] != 0, sparse[up] != 0)
    assert torch.allclose(quant[up], sparse[up], atol=float(sparse[up].abs().max()) / 127)
    assert torch.equal(sparse["lm_head.weight"].bfloat16(), dense["lm_head.weight"])
    for kind, folder in folders.items():
        runtime = load_runtime_model(folder)
        expected_sparse = 0 if kind == "dense_bf16" else 14 + (kind == "sparse_int8")  # 7 per layer, + INT8 head
        assert len(runtime.sparse_layers) == expected_sparse, kind
        out = runtime.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 6)
    stored = bench.weight_bytes_per_token(folders["dense_bf16"])
    per_layer = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64)  # q,o + k,v (GQA) + MLP + 2 norms, bf16
    assert stored == 2 * per_layer + 2 * 64 + 2 * 300 * 64  # + final norm + lm_head; embeddings excluded
