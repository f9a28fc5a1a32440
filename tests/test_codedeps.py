"""Stage code dependencies are derived from imports: complete (every repository module a stage
loads is listed, lazily imported ones included), and used by both dvc.yaml and the fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import stages
from tasks.codedeps import code_files, module_closure
from tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
STAGE_MODULES = sorted(
    {s.run.func.__module__ if hasattr(s.run, "func") else s.run.__module__ for s in stages.stages(load_config(PARAMS))}
)


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_closure_covers_every_repository_module_the_stage_loads(module):
    """Importing the stage module (in a fresh interpreter) loads only modules the static closure lists."""
    code = (
        f"import sys, json, {module}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('sparsify', 'tasks', 'flows'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    missing = loaded - set(module_closure(module))
    assert not missing, f"{module} loads {sorted(missing)} but its code deps do not list them"


def test_lazy_imports_and_compiled_sources_count():
    base = code_files("tasks.base")
    # What the hand-written list missed (issue #17): the trainer's own imports and the shared helpers.
    for f in (
        "sparsify/training/distill.py",
        "sparsify/sparsity/masks.py",
        "sparsify/data/corpus.py",
        "sparsify/config.py",
        "sparsify/io.py",
        "tasks/common.py",
        "sparsify/__init__.py",
        "tasks/__init__.py",
    ):
        assert f in base, f
    # runtime imports sparsify.quant.quantization inside a function: still a dependency.
    assert "sparsify/quant/quantization.py" in code_files("sparsify.inference.runtime")
    bench = code_files("tasks.benchmark")
    assert {"sparsify/inference/kernels/sparse_gemv_avx2.cpp", "sparsify/inference/kernels/outer.h"} <= set(bench)


def test_dvc_yaml_and_fingerprint_use_the_derived_lists():
    cfg = load_config(PARAMS)
    base = stages.get(cfg, "base")
    assert base.code == code_files("tasks.base")
    dvc = (REPO / "dvc.yaml").read_text()
    assert "- sparsify/training/distill.py" in dvc and "- sparsify/inference/kernels/sparse_gemv_avx512.cpp" in dvc
    from tasks.runner import fingerprint

    before = fingerprint(base, cfg)
    import tasks.runner as runner

    original = runner.file_digest
    try:  # a change to a file only the derived list knows about changes the fingerprint
        runner.file_digest = lambda p: "edited" if p.name == "distill.py" else original(p)
        assert fingerprint(base, cfg) != before
    finally:
        runner.file_digest = original


def test_not_a_repository_module():
    with pytest.raises(ValueError, match="not a module of this repository"):
        module_closure("json")
