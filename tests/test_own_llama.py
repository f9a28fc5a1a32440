"""The path a real user takes: their own Llama checkpoint, its tokenizer, their data files.

Fixtures in the conventions of Llama-2 and Llama-3.x (tests/llama_fixtures.py); pretraining data
in the SlimPajama and The Stack schemas read through `datasets`; task files in the GSM8K, Dolly
and UltraChat schemas. The end-to-end tests run the whole Prefect flow on smoke budgets.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsify.checkpoint import load_tokenizer
from sparsify.data.corpus import Corpus, DataError, bos_prefix, vocab_bound
from tasks.config import load_config
from tests.conftest import PARAMS
from tests.llama_fixtures import llama_checkpoint, write_pretraining_files, write_task_files

TASKS = {"llama2": ["gsm8k", "dolly"], "llama3": ["gsm8k", "ultrachat"]}
# The end-to-end runs: Llama-3's 128,256-wide logits make every step ~4x a Llama-2 step, so it runs
# the chat task alone (gsm8k runs on Llama-2); the quantized sparse-pretrained models cover the exports.
# An untrained model never stops early, so every scored document costs max_gen_toks forward passes:
# 4 documents per task are enough to compare lm-eval's scores.
E2E = {
    "llama2": {"quantize__finetuned": False, "finetune__max_length": 128, "evaluate__limit": 4},
    "llama3": {
        "quantize__finetuned": False,
        "finetune__max_length": 128,
        "evaluate__limit": 4,
        "downstream__tasks": ["ultrachat"],
        "pipeline__dense_control": False,
    },
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own-llama")
    slim, stack = write_pretraining_files(root / "pretraining")
    return {
        "llama2": llama_checkpoint("llama2", root / "llama2"),
        "llama3": llama_checkpoint("llama3", root / "llama3"),
        "slim": slim,
        "stack": stack,
        "tasks": root / "tasks",
    }


def user_params(fixtures: dict[str, Path], family: str, root: Path, **extra) -> dict:
    """What a user writes into params.yaml for their checkpoint and data (nested overrides)."""
    files = write_task_files(fixtures["tasks"])
    params = {
        "project": {"root": str(root)},
        "tracking": {"enabled": False},
        "base": {"source": str(fixtures[family])},
        "data": {
            "sources": [
                {
                    "name": "slimpajama",
                    "kind": "hf",
                    "path": "json",
                    "data_files": [str(fixtures["slim"])],
                    "text_field": "text",
                    "weight": 0.6,
                },
                {
                    "name": "the_stack",
                    "kind": "hf",
                    "path": "parquet",
                    "data_files": [str(fixtures["stack"])],
                    "text_field": "content",
                    "weight": 0.4,
                },
            ]
        },
        "downstream": {
            "tasks": TASKS[family],
            "data_files": {t: files[t] for t in TASKS[family]},
            "train_size": 48,
            "test_size": 12,
        },
    }
    for key, value in extra.items():
        section, name = key.split("__")
        params.setdefault(section, {})[name] = value
    if "downstream__data_files" not in extra:
        params["downstream"]["data_files"] = {t: files[t] for t in params["downstream"]["tasks"] if t in files}
    return params


def config(fixtures, family, root, **extra):
    return load_config(PARAMS, profile="smoke", params=user_params(fixtures, family, root, **extra))


# --------------------------------------------------------------------------- the corpus follows the model


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_the_corpus_is_written_with_the_models_own_tokenizer(fixtures, family, tmp_path):
    from tasks import data

    cfg = config(fixtures, family, tmp_path)
    assert cfg.data.tokenizer is None and cfg.tokenizer_source == str(fixtures[family])
    data.run(cfg)
    corpus = Corpus.open(tmp_path / "data" / "corpus")
    own = load_tokenizer(fixtures[family])
    assert load_tokenizer(corpus.tokenizer_path).get_vocab() == own.get_vocab()
    # Llama-3's special tokens sit at 128,000+: the token files need 32-bit ids.
    assert corpus.meta["dtype"] == ("uint32" if family == "llama3" else "uint16")
    assert corpus.meta["vocab_size"] == vocab_bound(own) == (128256 if family == "llama3" else 32000)
    # Every document starts with the model's BOS, as its tokenizer frames a text, and ends with EOS.
    bos = bos_prefix(own)
    assert bos == [own.bos_token_id]
    for split in ("train", "val"):
        toks = np.asarray(corpus.tokens(split))
        ends = np.flatnonzero(toks == own.eos_token_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        assert len(ends) > 5 and (toks[starts] == own.bos_token_id).all()
    doc = next(corpus.documents("val", own, limit=1))
    assert not doc.startswith(own.bos_token)  # the held-out documents are text, not framing


def test_a_tokenizer_that_is_not_the_models_fails_before_any_work(fixtures, tmp_path):
    from flows.pipeline import sparse_llama
    from tasks import data

    cfg = config(fixtures, "llama2", tmp_path, data__tokenizer=str(fixtures["llama3"]))
    with pytest.raises(DataError, match=r"emits token ids up to 128255, but base.source .* 32000 rows"):
        data.run(cfg)
    assert not (tmp_path / "data").exists()
    # Same size, other ids: the Llama-2 tokenizer retrained on other text.
    other = tmp_path / "other-tok"
    from tests.llama_fixtures import llama2_tokenizer

    llama2_tokenizer(["completely different text " * 50, "zebra quartz " * 80]).save_pretrained(other)
    cfg = config(fixtures, "llama2", tmp_path, data__tokenizer=str(other))
    with pytest.raises(DataError, match=r"is not base.source .*'s tokenizer: [\d,]+ tokens have other ids"):
        sparse_llama.fn(
            profile="smoke",
            params=user_params(fixtures, "llama2", tmp_path, data__tokenizer=str(other)),
            config_path=str(PARAMS),
        )
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


def test_a_chat_task_needs_a_chat_template(fixtures, tmp_path):
    from tasks import data

    cfg = config(fixtures, "llama2", tmp_path, downstream__tasks=["gsm8k", "ultrachat"])
    with pytest.raises(ValueError, match=r"\['ultrachat'\] are chat tasks, but the tokenizer .* has no chat template"):
        data.preflight(cfg)


def test_chat_records_use_the_tokenizers_template(fixtures):
    from sparsify.data.downstream import apply_chat_template, load_records
    from sparsify.training.sft import SFTDataset, encode_prompt

    tok = load_tokenizer(fixtures["llama3"])
    files = write_task_files(fixtures["tasks"])
    records = apply_chat_template(load_records("ultrachat", data_files=files["ultrachat"]["test"], limit=2), tok)
    prompt = records[0]["prompt"]
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = encode_prompt(tok, prompt)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS, not two
    data = SFTDataset.from_records(records, tok, 256)
    batch = data.collate([0])
    assert int(batch.input_ids[0, 0]) == tok.bos_token_id
    assert tok.eos_token_id in batch.labels[0].tolist()  # the answer ends with <|eot_id|>


def test_a_dataset_with_one_split_gets_a_held_out_test_split(fixtures, tmp_path):
    """Dolly publishes only a train split: the test split is held out of it, by prompt hash."""
    from tasks.taskdata import task_records

    files = write_task_files(tmp_path / "tasks", n_train=60, n_test=0)
    cfg = config(
        fixtures,
        "llama2",
        tmp_path,
        downstream__data_files={"dolly": {"train": files["dolly"]["train"]}},
        downstream__train_size=40,
        downstream__test_size=4,
    )
    splits = task_records(cfg, "dolly")
    assert len(splits["train"]) == 40 and len(splits["test"]) == 4
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["test"]}


def test_token_ids_outside_the_embedding_are_a_clear_error(fixtures, tmp_path):
    from sparsify.evaluation.metrics import token_nll
    from sparsify.training.trainer import PackedBlocks, train
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab_size=128)
    blocks = np.full((2, 16), 5, dtype=np.int64)
    blocks[1, 3] = 300
    with pytest.raises(
        ValueError, match=r"validation blocks holds token id 300, outside the model's embedding \[0, 128\)"
    ):
        token_nll(model, blocks)
    cfg = load_config(PARAMS, profile="smoke").base.train.model_copy(update={"steps": 1, "batch_size": 2})
    with pytest.raises(ValueError, match=r"training batch \(step 0\) holds token id 300"):
        train(model, PackedBlocks(blocks), None, cfg, seed=0)


# --------------------------------------------------------------------------- validation represents the mix


def test_validation_draws_on_every_source(fixtures, tmp_path):
    """`ppl/val` reads the first blocks of the val split: they hold both sources in proportion, and
    the overall figure is exactly the token-weighted mix of the per-source ones."""
    from tasks import data
    from tasks.common import val_perplexities

    cfg = config(fixtures, "llama2", tmp_path)
    data.run(cfg)
    corpus = Corpus.open(tmp_path / "data" / "corpus")
    owner = corpus.token_sources("val")
    n = min(cfg.evaluate.val_blocks, len(corpus.blocks("val")))
    evaluated = owner[: n * corpus.meta["block_size"]]
    assert corpus.source_names == ["slimpajama", "the_stack"]
    # Documents are written whole, so a window of a few documents mixes only roughly (1,024 tokens
    # here; 131k at real scale); the split as a whole holds the weights exactly.
    shares = np.bincount(evaluated, minlength=2) / len(evaluated)
    assert (shares > 0.1).all(), shares
    assert np.bincount(owner, minlength=2) / len(owner) == pytest.approx([0.6, 0.4], abs=1e-3)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixtures["llama2"])
    ppl = val_perplexities(cfg, model, corpus, "cpu")
    assert set(ppl) == {"ppl/val", "ppl/val/slimpajama", "ppl/val/the_stack"}
    predicted = evaluated.reshape(n, -1)[:, 1:]
    counts = [(predicted == i).sum() for i in range(2)]
    log_ppls = (math.log(ppl["ppl/val/slimpajama"]), math.log(ppl["ppl/val/the_stack"]))
    mixed = (counts[0] * log_ppls[0] + counts[1] * log_ppls[1]) / sum(counts)
    assert math.log(ppl["ppl/val"]) == pytest.approx(mixed, rel=1e-9)

    # The held-out documents (the rolling-perplexity task) come from both sources too.
    tok = load_tokenizer(corpus.tokenizer_path)
    toks = np.asarray(corpus.tokens("val"))
    ends = np.flatnonzero(toks == tok.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    source_of = {tok.decode(toks[a + 1 : b].tolist()): owner[a] for a, b in zip(starts, ends, strict=True)}
    docs = list(corpus.documents("val", tok, limit=4))
    assert len(ends) > 4 and len(docs) == 4 and {source_of[d] for d in docs} == {0, 1}


# --------------------------------------------------------------------------- end to end


@pytest.fixture()
def all_cores():
    """The whole pipeline with torch's default threads (conftest pins unit tests to one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(before)


def _model_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "models").iterdir() if (p / "config.json").is_file())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_the_whole_pipeline_on_your_own_llama(fixtures, family, tmp_path, prefect_server, all_cores):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from flows.pipeline import sparse_llama
    from sparsify.evaluation.lmeval import flatten_results
    from sparsify.sparsity.masks import load_masks
    from tasks.common import read_metrics, val_perplexities
    from tasks.stages import stages

    params = user_params(fixtures, family, tmp_path, **E2E[family])
    tasks = params["downstream"]["tasks"]
    results = sparse_llama(profile="smoke", params=params, config_path=str(PARAMS))
    cfg = load_config(PARAMS, profile="smoke", params=params)
    table = stages(cfg)
    assert set(results) == {s.name for s in table}
    corpus = Corpus.open(tmp_path / "data" / "corpus")
    base = read_metrics(tmp_path / "metrics" / "base.json")
    assert {"ppl/val/slimpajama", "ppl/val/the_stack"} <= set(base)

    # Every stage's checkpoint reloads through transformers alone and computes what the stage measured.
    by_output = {s.outs[0]: s.name for s in table}
    checked = 0
    for path in _model_dirs(tmp_path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert model.config.vocab_size == (128256 if family == "llama3" else 32000)
        if family == "llama3":
            assert model.config.rope_parameters["rope_type"] == "llama3" and model.config.num_key_value_heads == 2
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
        metrics = read_metrics(tmp_path / "metrics" / f"{by_output[f'models/{path.name}']}.json")
        if "ppl/val" in metrics:  # (a compressed-tensors export decompresses its weights in this forward)
            again = val_perplexities(cfg, model, corpus, "cpu")
            assert again["ppl/val"] == pytest.approx(metrics["ppl/val"], rel=1e-4), path.name
            checked += 1
        if (path / "masks.safetensors").is_file() and not hasattr(model.config, "quantization_config"):
            # (the quantize stage checks its own zeros; a packed INT4 export holds no dense weight)
            weights = model.state_dict()
            for name, mask in load_masks(path / "masks.safetensors").items():
                assert not weights[name][~mask].any(), f"{path.name}: {name} lost its zeros"
    assert checked >= 5  # base, prune50/70, pretrain50/70, the quantized exports

    # lm-eval's own HFLM, loading the checkpoint from disk, scores what the eval stage reported.
    task = tasks[-1]
    model_name = f"ft-sparse70-{task}"
    ours = json.loads((tmp_path / "reports" / "eval" / f"{model_name}.json").read_text())["results"]
    lm = HFLM(pretrained=str(tmp_path / "models" / model_name), device="cpu", batch_size=cfg.evaluate.batch_size)
    theirs = simple_evaluate(
        model=lm,
        tasks=[task],
        limit=cfg.evaluate.limit,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path / ".lmeval" / model_name), include_defaults=False),
    )
    theirs = flatten_results(theirs["results"])[task]
    for metric, value in theirs.items():
        assert ours[task][metric] == pytest.approx(value, abs=1e-6), metric
