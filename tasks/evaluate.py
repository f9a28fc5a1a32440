"""Stage `eval-<model>`: score one checkpoint with lm-evaluation-harness, and its recovery.

The pipeline's own tasks (data/tasks) are exposed to lm-eval as local tasks whose
YAML is generated from the task definitions; standard lm-eval task names in
`evaluate.extra_tasks` pass straight through. Recovery is metric ÷ the reference
model's metric (`base` for pruned models), per task and averaged. Generation tasks also get
`target_nll`: the fine-tuning loss on the test split (each reference target's NLL given its
prompt), per document in `reports/eval/<model>.samples.jsonl` beside what the model generated.
Tasks scored by running generated code (pass@1) run it in `sparsify.evaluation.sandbox` under
`evaluate.sandbox`; the results name the protections that were in force (`sandbox`), and the stage
refuses to start when the code could not be isolated unless `evaluate.sandbox.allow_unisolated`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sparsify.checkpoint import load_model, load_tokenizer
from sparsify.data.downstream import TaskSpec, get_task, read_task_jsonl
from sparsify.errors import DataError
from sparsify.evaluation.lmeval import evaluate_model, write_lmeval_tasks
from sparsify.evaluation.recovery import recovery_where_defined
from sparsify.evaluation.sandbox import SandboxPolicy, check_isolation
from sparsify.inference.loading import UnsupportedLayer, load_runtime_model
from sparsify.io import atomic_write_json, atomic_write_jsonl
from sparsify.training.sft import SFTDataset, target_nll
from tasks.common import Layout, StageResult
from tasks.config import Config

log = logging.getLogger(__name__)


def score_targets(cfg: Config, net, tokenizer, spec: TaskSpec, path: Path) -> list[tuple[float, int]]:
    """Teacher-forced NLL of each test document's reference target given its prompt, formatted
    and cut exactly as fine-tuning does: the fine-tuning loss on the test split, a likelihood
    measure next to the generation metric that small models leave near their floor."""
    records = read_task_jsonl(path)[: cfg.evaluate.limit]
    data = SFTDataset.from_records(
        records, tokenizer, cfg.finetune.max_length, render_prompt=spec.render_prompt, render_target=spec.render_target
    )
    return target_nll(net, data, cfg.evaluate.batch_size)


def add_to_samples(path: Path, values: dict[str, list[dict]]) -> None:
    """Merge per-document `values` ({task: [fields per document, in test-split order = lm-eval's
    doc_id]}) into the sample rows of those tasks."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["task"] in values:
            row.update(values[row["task"]][row["doc_id"]])
    atomic_write_jsonl(path, rows)


def sandbox_policy(cfg: Config) -> SandboxPolicy:
    return SandboxPolicy(**cfg.evaluate.sandbox.model_dump())


def code_sandbox(cfg: Config, specs: list[TaskSpec]) -> str | None:
    """The protections generated code will run under (e.g. `bwrap(net,fs,pid,...)`), None without
    code tasks; raises `SandboxUnavailable` (naming `evaluate.sandbox.allow_unisolated`) before any
    model is loaded when the code could not be isolated and running it unisolated was not allowed."""
    if not any("pass@1" in spec.metrics for spec in specs):
        return None
    return str(check_isolation(sandbox_policy(cfg)))


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{metric}": value for task, ms in results.items() for metric, value in ms.items()}


def run(cfg: Config, *, model: str, variant: str, tasks: tuple[str, ...], reference: str | None) -> StageResult:
    """Score models/<model> on the local `tasks` (plus `evaluate.extra_tasks`); recovery vs `reference`."""
    layout = Layout.of(cfg)
    manifest = json.loads((layout.task_data / "manifest.json").read_text())
    specs = []
    for task in tasks:
        entry = manifest.get(task, {}).get("test")
        if entry is None:
            raise DataError(f"task {task!r} has no test split in {layout.task_data}; rerun the taskdata stage")
        specs.append((get_task(task), layout.task_data / entry["file"]))
    sandbox = code_sandbox(cfg, [spec for spec, _ in specs])
    include = cfg.root / ".lmeval" / model  # generated task YAML, rewritten on every run
    write_lmeval_tasks(specs, include, sandbox=sandbox_policy(cfg))

    runtime, why_not = cfg.evaluate.runtime, None
    if runtime:
        try:
            loaded = load_runtime_model(layout.model(model))
            net, tokenizer = loaded.model, loaded.tokenizer
        except UnsupportedLayer as err:  # e.g. INT4 groups the kernels cannot tile; say so in the results
            log.warning("%s: cannot run on the sparse CPU runtime (%s); scoring it with transformers", model, err)
            runtime, why_not = False, str(err)
    if not runtime:
        # Not load_checkpoint: scoring needs no masks, which at 7B are gigabytes of bools.
        net, tokenizer = load_model(layout.model(model)), load_tokenizer(layout.model(model))
    names = [spec.name for spec, _ in specs] + list(cfg.evaluate.extra_tasks)
    results = evaluate_model(
        net,
        tokenizer,
        names,
        include_path=include,
        limit=cfg.evaluate.limit,
        batch_size=cfg.evaluate.batch_size,
        samples_path=layout.eval_samples(model),
        details_path=layout.eval_details(model),
        device="cpu" if runtime else None,
    )  # the kernels run on the CPU
    per_doc_nll = {}
    for spec, path in specs:
        if spec.output_type == "generate_until" and spec.name in results:
            per_doc = score_targets(cfg, net, tokenizer, spec, path)
            results[spec.name]["target_nll"] = sum(v for v, _ in per_doc) / sum(n for _, n in per_doc)
            per_doc_nll[spec.name] = [{"target_nll": v / n, "target_tokens": n} for v, n in per_doc]
    samples = layout.eval_samples(model)
    if per_doc_nll:
        add_to_samples(samples, per_doc_nll)
    metrics = flat_metrics(results)
    if reference is not None:
        ref_file = layout.eval_results(reference)
        if not ref_file.is_file():
            raise DataError(f"no evaluation of the reference model {reference!r} at {ref_file}; run eval-{reference}")
        metrics.update(recovery_where_defined(results, json.loads(ref_file.read_text())["results"])[0])
    out = layout.eval_results(model)
    atomic_write_json(
        out,
        {
            "model": model,
            "variant": variant,
            "reference": reference,
            "results": results,
            "runtime": runtime,
            **({"runtime_unavailable": why_not} if why_not else {}),
            **({"sandbox": sandbox} if sandbox else {}),
        },
    )
    details = layout.eval_details(model)
    return StageResult(
        metrics=metrics,
        outputs=[out, samples, details],
        variant=variant,
        artifacts=[out, samples, details],
        params={"sandbox": sandbox} if sandbox else {},
    )
