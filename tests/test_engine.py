"""The batched Llama forward against transformers' logits, the continuous-batching engine's outputs against
transformers' generate, sampling, stop strings and incremental detokenization."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from sparsify.inference.engine import BatchedLlama, ContextLengthError, Engine, QueueFull
from sparsify.inference.generation import IncrementalDetokenizer, SamplingParams, TextStream, next_token
from sparsify.inference.loading import load_runtime_model
from tests.serve_fixtures import (
    extension,  # noqa: F401  (a pytest fixture)
    sparse_llama,
    tokenizer,  # noqa: F401  (a pytest fixture)
    write_sparse_folder,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """(the dense fp32 model holding the zeros, the same model loaded from the sparse format)."""
    dense, masks = sparse_llama()
    folder = write_sparse_folder(dense, masks, tmp_path_factory.mktemp("engine") / "m", tokenizer)
    return dense, load_runtime_model(folder).model


def hf_greedy(model, tokenizer, prompt: str, max_new: int) -> tuple[list[int], str]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=304)
    new = out[0, ids.shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def test_batched_forward_matches_transformers_logits(models):
    """Prefill of sequences of different lengths in one step, then decode steps with a sequence joining
    midway; positions past rope's original 64 exercise llama3 scaling."""
    dense, sparse = models
    runner = BatchedLlama(sparse)
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, 300, (n,), generator=g).tolist() for n in (70, 5, 9))
    ca, cb = runner.new_cache(4), runner.new_cache(4)  # small: the caches must grow
    la, lb = runner.forward([a, b], [ca, cb], all_logits=True)
    torch.testing.assert_close(la, dense(torch.tensor([a])).logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lb, dense(torch.tensor([b])).logits[0], atol=1e-4, rtol=1e-4)
    cc = runner.new_cache(16)
    for step in range(4):
        a.append(step + 7)
        b.append(step + 100)
        seqs, caches, news = [a, b], [ca, cb], [[a[-1]], [b[-1]]]
        if step >= 2:  # c joins with its whole prompt while a and b decode
            if step == 2:
                news.append(c)
            else:
                c.append(3)
                news.append([3])
            seqs.append(c)
            caches.append(cc)
        logits = runner.forward(news, caches)
        assert logits.shape == (len(seqs), 320)
        for row, seq in zip(logits, seqs, strict=True):
            torch.testing.assert_close(row, dense(torch.tensor([seq])).logits[0, -1], atol=1e-4, rtol=1e-4)
    assert ca.length == len(a) and cc.length == len(c)


def test_engine_greedy_equals_transformers_generate(models, tokenizer):
    dense, sparse = models
    engine = Engine(sparse, tokenizer, max_batch=4)
    prompts = ["def parse(self, text):", "The module provides", "import os\nimport sys\n"]
    try:
        for prompt in prompts:
            expected_ids, expected = hf_greedy(dense, tokenizer, prompt, 24)
            outs = list(engine.generate(tokenizer(prompt).input_ids, SamplingParams(max_tokens=24)))
            assert "".join(o.text for o in outs) == expected
            assert [t for o in outs for t in o.token_ids] == expected_ids
            assert outs[-1].finished and outs[-1].completion_tokens == len(expected_ids)
            assert outs[-1].finish_reason == ("stop" if expected_ids[-1] == 304 else "length")
        # Together in one batch (continuous batching), each sequence decodes what it decodes alone.
        results: dict[int, str] = {i: "" for i in range(len(prompts))}
        finished: set[int] = set()
        done = threading.Event()

        def collect(i):
            def callback(out):
                results[i] += out.text
                if out.finished:
                    finished.add(i)
                    if len(finished) == len(prompts):
                        done.set()

            return callback

        for i, prompt in enumerate(prompts):
            engine.submit(tokenizer(prompt).input_ids, SamplingParams(max_tokens=24), collect(i))
        engine.start()
        assert done.wait(60)
        assert [results[i] for i in range(3)] == [hf_greedy(dense, tokenizer, p, 24)[1] for p in prompts]
        assert engine.stats().generated_tokens > 0 and engine.stats().running == 0
    finally:
        engine.stop()


def test_long_prompts_are_prefilled_in_chunks_while_others_decode(models, tokenizer):
    dense, sparse = models
    engine = Engine(sparse, tokenizer, max_batch=4, prefill_chunk=8)
    long_prompt = "import os\nimport sys\n\ndef main(argv):\n    for name in argv:\n        print(name)\n"
    long_ids, short_ids = tokenizer(long_prompt).input_ids, tokenizer("x = 1").input_ids
    assert len(long_ids) > 24
    got = {"short": [], "long": []}
    short = engine.submit(short_ids, SamplingParams(max_tokens=12), lambda o: got["short"].append(o))
    engine.step()  # the short prompt (<= 8 tokens) is prefilled and gets its first token
    assert len(short.generated) == 1
    long = engine.submit(long_ids, SamplingParams(max_tokens=12), lambda o: got["long"].append(o))
    steps = 0
    while not long.generated:
        before = len(short.generated)
        engine.step()
        steps += 1
        assert len(short.generated) == before + 1 or short.finished  # decoding never waits for the prefill
    assert steps == -(-len(long_ids) // 8)  # 8 prompt tokens a step
    while engine.step():
        pass
    for key, prompt in (("short", "x = 1"), ("long", long_prompt)):
        assert "".join(o.text for o in got[key]) == hf_greedy(dense, tokenizer, prompt, 12)[1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(models, tokenizer):
    _, sparse = models
    engine = Engine(sparse, tokenizer)
    ids = tokenizer("for line in").input_ids

    def run(**kw):
        return "".join(o.text for o in engine.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True, **kw)))

    try:
        assert run(temperature=1.0, seed=1) == run(temperature=1.0, seed=1)
        assert run(temperature=1.0, seed=1) != run(temperature=1.0, seed=2)
        assert run(temperature=0.7, top_k=1, seed=5) == run()
    finally:
        engine.stop()


def test_next_token_filters():
    logits = torch.tensor([3.0, 2.9, 1.0, -5.0])
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, SamplingParams()) == 0
    drawn = {next_token(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert drawn == {0, 1}
    # top_p: token 0 alone has ~0.49 < 0.5, so token 1 stays; token 2 (ranked after 0.98) is dropped.
    drawn = {next_token(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {next_token(logits, SamplingParams(temperature=1.0, top_p=0.4), g) for _ in range(50)}
    assert drawn == {0}
    for bad, match in [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=-1), "top_k"),
        (dict(stop=("",)), "stop"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


def test_incremental_detokenization_equals_full_decode(tokenizer):
    text = "naïve café — 東京 € déjà vu 🙂 def f(x):\n    return x"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens are partial characters
    rng = random.Random(0)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    assert "".join(deltas) == text and detok.flush() == ""
    assert "" in deltas  # a partial character was held back, never shown as U+FFFD
    # Random ids (invalid UTF-8 included; specials skipped): the same text as one decode of all of them.
    rng = random.Random(0)
    sequence = [rng.randrange(305) for _ in range(300)]
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.push(t) for t in sequence) + detok.flush()
    assert streamed == tokenizer.decode(sequence, skip_special_tokens=True)


def test_stop_strings_cut_the_text_and_hold_back_prefixes(tokenizer):
    text = "alpha beta\n\ngamma delta"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, ("\n\n", "zz"))
    shown, stopped = "", False
    for t in ids:
        delta, stopped = stream.push(t)
        shown += delta
        assert not shown.endswith("\n")  # a prefix of a stop string is never shown early
        if stopped:
            break
    assert stopped and shown + stream.finish() == "alpha beta"
    stream = TextStream(tokenizer, ("zz",))
    shown = "".join(stream.push(t)[0] for t in ids) + stream.finish()
    assert shown == text  # no stop string: everything, including what was held back
    stream = TextStream(tokenizer, ("a much longer stop string",))  # longer than the whole text
    deltas = [stream.push(t)[0] for t in ids]
    assert deltas == [""] * len(ids) and stream.finish() == text


def test_engine_refuses_what_does_not_fit_and_bounds_its_queue(models, tokenizer):
    _, sparse = models
    engine = Engine(sparse, tokenizer, max_batch=1, max_queue=1, max_context=32)
    with pytest.raises(ContextLengthError, match="the context is 32"):
        engine.submit(list(range(32)), SamplingParams(max_tokens=1), print)
    with pytest.raises(ContextLengthError, match="at most 2 new tokens"):
        engine.submit(list(range(30)), SamplingParams(max_tokens=3), print)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams(), print)
    # Not started: one request fills the free batch slot, one waits in the queue, the third is refused.
    first = engine.submit([1, 2], SamplingParams(max_tokens=4), lambda o: None)
    engine.submit([1, 2], SamplingParams(max_tokens=4), lambda o: None)
    with pytest.raises(QueueFull):
        engine.submit([1, 2], SamplingParams(max_tokens=4), lambda o: None)
    engine.cancel(first)  # a cancelled waiting request frees its place at once
    engine.submit([1, 2], SamplingParams(max_tokens=4), lambda o: None)
    assert engine.stats().queue_depth == 2 and engine.stats().requests_finished == {"cancelled": 1}
    assert engine.step() == 1 and engine.stats().running == 1 and engine.stats().queue_depth == 1
    engine.stop()
    assert engine.stats().running == 0


def test_cancel_frees_the_slot_between_steps(models, tokenizer):
    _, sparse = models
    engine = Engine(sparse, tokenizer, max_batch=1)
    outputs = []
    request = engine.submit([300, 5, 6], SamplingParams(max_tokens=50, ignore_eos=True), outputs.append)
    engine.step()
    engine.step()
    assert len(request.generated) == 2 and request.cache is not None
    engine.cancel(request)
    assert engine.step() == 0 and request.finished and request.cache is None
    assert engine.stats().requests_finished == {"cancelled": 1} and len(outputs) == 2


def test_a_failing_sequence_ends_alone(tokenizer):
    """Non-finite logits under sampling end that request with an error; the batch decodes on."""
    model, _ = sparse_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    engine = Engine(model, tokenizer)
    bad, good = [], []
    engine.submit([300, 7], SamplingParams(max_tokens=4, temperature=1.0), bad.append)
    engine.submit([300, 8], SamplingParams(max_tokens=4, ignore_eos=True), good.append)
    while engine.step():
        pass
    assert bad[-1].finished and bad[-1].finish_reason == "error" and "sampling failed" in bad[-1].error
    assert good[-1].finish_reason == "length" and good[-1].completion_tokens == 4
    assert engine.stats().requests_finished == {"error": 1, "length": 1}


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def family_checkpoint(request, tmp_path_factory):
    """Tiny checkpoints in the real families' conventions (tests/llama_fixtures.py): Llama-2's
    SentencePiece-style tokenizer (▁ spaces, byte fallback), Llama-3's byte-level one with EOS ids list."""
    from tests.llama_fixtures import llama_checkpoint

    return request.param, llama_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def test_real_tokenizer_conventions_stream_the_transformers_text(family_checkpoint):
    family, path = family_checkpoint
    loaded = load_runtime_model(path)
    tok = loaded.tokenizer
    # Incremental text equals one decode of everything, for arbitrary ids (byte tokens, ▁ spaces, specials).
    rng = random.Random(1)
    ids = [rng.randrange(1000) for _ in range(300)] + tok("naïve café — 東京 🙂", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(t) for t in ids) + detok.flush() == tok.decode(ids, skip_special_tokens=True)
    engine = Engine(loaded.model, tok)
    try:
        prompt = "def main():\n    return"
        prompt_ids = tok(prompt).input_ids
        with torch.no_grad():
            out = loaded.model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id
            )
        expected = tok.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
        assert "".join(o.text for o in engine.generate(prompt_ids, SamplingParams(max_tokens=16))) == expected
        if family == "llama3":
            assert {128001, 128008, 128009} <= engine.eos_token_ids
    finally:
        engine.stop()
