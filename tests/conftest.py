"""Shared fixtures: the smoke configuration and a corpus built once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports prefect/mlflow/transformers: offline, and Prefect's home out of the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="sparsellama-prefect-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import tasks  # noqa: E402,F401  (the project's environment defaults, as the CLI sets them, before prefect loads)
from tasks.config import Config, load_config  # noqa: E402

# Unit tests use tiny tensors: extra threads only add synchronisation (and contend on 2 cores).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def tiny_llama(seed: int = 0, **config):
    """A tiny random LlamaForCausalLM (every module type, fast on one core); `config` overrides the shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(shape | config)))


def smoke_config(root: Path, *overrides: str) -> Config:
    return load_config(PARAMS, profile="smoke", overrides=[f"project.root={root}", *overrides])


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """A project root holding the smoke profile's corpus (data stage run once)."""
    from tasks import data

    root = tmp_path_factory.mktemp("smoke")
    data.run(smoke_config(root, "tracking.enabled=false"))
    return root


@pytest.fixture()
def smoke_cfg(tmp_path) -> Config:
    return smoke_config(tmp_path, "tracking.enabled=false")


@pytest.fixture(scope="module")
def prefect_server():
    """Prefect's real temporary server, started once per module and stopped before pytest closes its
    log capture."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
