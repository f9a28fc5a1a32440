"""The CLI reports the project's own errors (config, data, user input) as one line; anything else,
a bug, keeps its traceback."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys

import pytest

from flows.cli import main
from sparsify.data.corpus import DataError
from sparsify.errors import (
    ConfigError,
    MissingFileError,
    ModelLoadError,
    OutputWriteError,
    SparsellamaError,
    UserInputError,
)
from sparsify.inference.loading import UnsupportedLayer
from sparsify.training.trainer import TrainingDiverged
from tasks.common import RootBusy
from tests.conftest import PARAMS, REPO


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, so stderr is exactly what a user sees (Python's own traceback
    printing included); `code` runs first (e.g. to plant a bug)."""
    prelude = code or ""
    script = f"import sys\n{prelude}\nfrom flows.cli import main\nsys.exit(main({list(args)!r}))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def _stage_args(tmp_path, name: str = "data") -> list[str]:
    return [
        "stage",
        name,
        "--config",
        str(PARAMS),
        "--set",
        f"project.root={tmp_path}",
        "--set",
        "tracking.enabled=false",
    ]


def failing_stage(stage, error: BaseException):
    """`stage`, with a run that raises `error`: a stand-in for a stage whose code fails."""

    def fail(cfg):
        raise error

    # The stage's code dependencies (its fingerprint) derive from its function's module: keep the real one.
    fail.__module__ = getattr(stage.run, "func", stage.run).__module__
    return dataclasses.replace(stage, run=fail)


def test_the_error_types_keep_their_old_bases():
    # Callers caught ValueError (the HTTP server's 400s, the loader's wrapping) and RuntimeError before
    # these types existed; they still do, and the CLI catches exactly the base.
    for cls in (ConfigError, DataError, UserInputError, ModelLoadError, UnsupportedLayer, MissingFileError):
        assert issubclass(cls, SparsellamaError) and issubclass(cls, ValueError), cls
    assert issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(RootBusy, SparsellamaError) and issubclass(RootBusy, RuntimeError)


def test_a_config_error_is_its_message_alone_and_exits_nonzero(tmp_path):
    out = _cli(*_stage_args(tmp_path), "--set", "prune.sparsityy=0.7")
    assert out.returncode == 2, out.stderr
    # The message alone: it starts the output and names the key (a config error lists every bad key,
    # one per line, under a one-line heading); no traceback.
    assert out.stderr.startswith("sparsellama: error: invalid configuration"), out.stderr
    assert "prune.sparsityy: unknown key" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_bug_inside_a_stage_shows_its_traceback(tmp_path):
    # A ValueError from a bug is exactly what the CLI used to swallow into one line.
    bug = (
        "from tasks import stages\nfrom tests.test_cli_errors import failing_stage\n_get = stages.get\n"
        "stages.get = lambda cfg, name: failing_stage(_get(cfg, name), ValueError('planted bug'))\n"
    )
    out = _cli(*_stage_args(tmp_path), code=bug)
    assert out.returncode == 1, out.stderr
    assert "Traceback (most recent call last)" in out.stderr and "in fail" in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "ValueError: planted bug"
    assert "sparsellama: error" not in out.stderr


@pytest.mark.parametrize(
    "error",
    [
        DataError("source 'x': no documents"),
        OutputWriteError(errno.ENOSPC, "cannot write models/base: the disk is full (No space left on device)"),
        TrainingDiverged("the loss became nan at step 3 (lr 1.00e-02); lower train.lr or raise warmup_steps"),
        KeyError("bug"),
    ],
)
def test_a_stage_error_is_reported_by_its_type(tmp_path, monkeypatch, capsys, error):
    from tasks import stages

    real_get = stages.get
    monkeypatch.setattr(stages, "get", lambda cfg, name: failing_stage(real_get(cfg, name), error))
    if isinstance(error, SparsellamaError):
        assert main(_stage_args(tmp_path)) == 2
        assert capsys.readouterr().err.strip() == f"sparsellama: error: {error}"
    else:
        with pytest.raises(type(error)):
            main(_stage_args(tmp_path))
        assert "sparsellama: error" not in capsys.readouterr().err
