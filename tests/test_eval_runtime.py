"""Evaluating what is deployed: lm-eval through the sparse CPU runtime gives the metrics of the dense
model holding the same zeros (float tolerance), from a HF checkpoint and from the sparse format."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from sparsify.checkpoint import load_checkpoint
from sparsify.data import downstream as ds
from sparsify.evaluation import lmeval as ev
from sparsify.inference.kernels import load_extension
from sparsify.inference.loading import load_runtime_model
from sparsify.inference.runtime import SparseLinear
from tests.serve_fixtures import sparse_llama, tiny_tokenizer, write_sparse_folder

TASKS = ["arithmetic", "heldout"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    load_extension()
    root = tmp_path_factory.mktemp("evalrt")
    tokenizer = tiny_tokenizer()
    model, masks = sparse_llama(sparsity=0.6)
    model.save_pretrained(root / "hf")  # a pipeline checkpoint: the zeros stored dense
    tokenizer.save_pretrained(root / "hf")
    write_sparse_folder(model, masks, root / "sparse", tokenizer)
    arithmetic = ds.write_task_jsonl(ds.generate_arithmetic(1, 3)["test"], root / "arithmetic.jsonl")
    heldout = ds.write_task_jsonl(
        ds.text_records(["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]),
        root / "heldout.jsonl",
    )
    specs = [(dataclasses.replace(ds.TASKS["arithmetic"], max_gen_toks=6), arithmetic), (ds.TASKS["heldout"], heldout)]
    return root, ev.write_lmeval_tasks(specs, root / "tasks", cache_dir=root / "hf-cache")


def scores(path, include, runtime: bool, samples) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The metrics, and what the model generated for the generation task's documents."""
    if runtime:
        loaded = load_runtime_model(path)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        loaded = load_checkpoint(path)
        model, tokenizer = loaded.model, loaded.tokenizer
    assert any(isinstance(m, SparseLinear) for m in model.modules()) == runtime
    metrics = ev.evaluate_model(
        model, tokenizer, TASKS, include_path=include, limit=3, batch_size=2, device="cpu", samples_path=samples
    )
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return metrics, [r["output"] for r in rows if r["task"] == "arithmetic"]


def test_runtime_metrics_equal_the_dense_model_holding_the_same_zeros(folders):
    root, include = folders
    dense, dense_outputs = scores(root / "hf", include, False, root / "dense.jsonl")
    assert len(dense_outputs) == 3 and any(dense_outputs)
    for folder in ("hf", "sparse"):
        on_runtime, outputs = scores(root / folder, include, True, root / f"{folder}.jsonl")
        assert outputs == dense_outputs  # greedy generations: the same text
        assert on_runtime.keys() == dense.keys() == set(TASKS)
        for task, metrics in dense.items():
            assert on_runtime[task].keys() == metrics.keys()
            for name, value in metrics.items():
                assert math.isclose(on_runtime[task][name], value, rel_tol=1e-4, abs_tol=1e-6), (folder, task, name)
    assert any(v > 0 for v in dense["heldout"].values())  # perplexities: a real comparison, not 0 == 0


def test_eval_stage_scores_through_the_runtime_when_asked(tmp_path):
    """The `eval-<model>` stage with `evaluate.runtime=true`: the same metrics (target NLL included), and the
    results say which way the model ran."""
    from tasks import evaluate as stage
    from tasks.common import Layout
    from tests.conftest import smoke_config

    model, masks = sparse_llama(sparsity=0.6)
    tokenizer = tiny_tokenizer()
    results = {}
    for runtime in (False, True):
        root = tmp_path / str(runtime)
        cfg = smoke_config(
            root, "tracking.enabled=false", "evaluate.limit=2", f"evaluate.runtime={str(runtime).lower()}"
        )
        layout = Layout.of(cfg)
        model.save_pretrained(layout.model("tiny"))
        tokenizer.save_pretrained(layout.model("tiny"))
        test = ds.write_task_jsonl(ds.generate_arithmetic(1, 2)["test"], layout.task_data / "arithmetic_test.jsonl")
        (layout.task_data / "manifest.json").write_text(json.dumps({"arithmetic": {"test": {"file": test.name}}}))
        out = stage.run(cfg, model="tiny", variant="sparse60", tasks=("arithmetic",), reference=None)
        saved = json.loads(layout.eval_results("tiny").read_text())
        assert saved["runtime"] is runtime
        results[runtime] = out.metrics
    assert results[True].keys() == results[False].keys() and "eval/arithmetic/target_nll" in results[True]
    for name, value in results[False].items():
        assert math.isclose(results[True][name], value, rel_tol=1e-4, abs_tol=1e-6), name
