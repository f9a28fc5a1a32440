"""The eval stage and generated code: it records the protections pass@1 ran under, and it refuses to
start when the code could not be isolated unless `evaluate.sandbox.allow_unisolated` says otherwise."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from sparsify.data import downstream as ds
from sparsify.evaluation import sandbox as sbx
from sparsify.evaluation.sandbox import SandboxUnavailable
from tests.serve_fixtures import sparse_llama, tiny_tokenizer


@pytest.fixture
def no_bwrap(monkeypatch):
    """A machine without bubblewrap."""
    real_which = shutil.which

    def which(name, *args, **kwargs):
        return None if name == "bwrap" else real_which(name, *args, **kwargs)

    monkeypatch.setattr(sbx.shutil, "which", which)
    sbx._probe.cache_clear()
    yield
    sbx._probe.cache_clear()


def code_project(root, *overrides: str):
    """A project root holding a tiny model and a one-problem humaneval test split."""
    from tasks.common import Layout
    from tests.conftest import smoke_config

    cfg = smoke_config(root, "tracking.enabled=false", "evaluate.limit=1", *overrides)
    layout = Layout.of(cfg)
    model, _ = sparse_llama(sparsity=0.5)
    model.save_pretrained(layout.model("tiny"))
    tiny_tokenizer().save_pretrained(layout.model("tiny"))
    test = ds.write_task_jsonl(ds.load_humaneval(limit=1), layout.task_data / "humaneval_test.jsonl")
    (layout.task_data / "manifest.json").write_text(json.dumps({"humaneval": {"test": {"file": test.name}}}))
    return cfg, layout


@pytest.fixture
def short_generations(monkeypatch):
    from tasks import evaluate as stage

    real = stage.get_task
    monkeypatch.setattr(stage, "get_task", lambda name: dataclasses.replace(real(name), max_gen_toks=8))


def run_stage(cfg):
    from tasks import evaluate as stage

    return stage.run(cfg, model="tiny", variant="sparse50", tasks=("humaneval",), reference=None)


def test_without_isolation_the_eval_stage_refuses_before_loading_anything(tmp_path, no_bwrap):
    from tasks.common import Layout
    from tests.conftest import smoke_config

    cfg = smoke_config(tmp_path, "tracking.enabled=false")
    layout = Layout.of(cfg)
    layout.task_data.mkdir(parents=True)
    (layout.task_data / "manifest.json").write_text(json.dumps({"humaneval": {"test": {"file": "x.jsonl"}}}))
    # No model and no test file exist: the refusal must come first, and name the key that opts in.
    with pytest.raises(SandboxUnavailable, match=r"evaluate\.sandbox\.allow_unisolated"):
        run_stage(cfg)


def test_unisolated_opt_in_is_recorded_in_the_results(tmp_path, no_bwrap, short_generations):

    cfg, layout = code_project(tmp_path, "evaluate.sandbox.allow_unisolated=true")
    out = run_stage(cfg)
    saved = json.loads(layout.eval_results("tiny").read_text())
    assert saved["sandbox"].startswith("unisolated(") and "guard" in saved["sandbox"]
    assert out.params["sandbox"] == saved["sandbox"]
    assert "eval/humaneval/pass@1" in out.metrics


def test_eval_stage_records_the_bwrap_protections(tmp_path, short_generations):

    try:
        sbx.check_isolation()
    except SandboxUnavailable as exc:
        pytest.skip(f"no kernel isolation here: {exc}")
    cfg, layout = code_project(tmp_path)
    run_stage(cfg)
    saved = json.loads(layout.eval_results("tiny").read_text())
    assert saved["sandbox"].startswith("bwrap(") and "net" in saved["sandbox"]


def test_tasks_without_generated_code_need_no_sandbox(tmp_path, no_bwrap):
    from tasks import evaluate as stage
    from tests.conftest import smoke_config

    cfg = smoke_config(tmp_path, "tracking.enabled=false")
    assert stage.code_sandbox(cfg, [ds.TASKS["arithmetic"], ds.TASKS["docsum"]]) is None
    with pytest.raises(SandboxUnavailable):
        stage.code_sandbox(cfg, [ds.TASKS["arithmetic"], ds.TASKS["humaneval"]])


def test_report_line_names_the_sandbox_per_model_when_they_differ():
    from tasks.report import code_sandbox_line

    assert code_sandbox_line({"bwrap(net,fs)": ["a", "b"]}) == "bwrap(net,fs)"
    assert (
        code_sandbox_line({"bwrap(net)": ["a"], "unisolated(guard)": ["b"]}) == "bwrap(net) (a); unisolated(guard) (b)"
    )
