"""Data parallel training under torchrun matches one process with the same global batch.

Two gloo processes on CPU run the cases that this test also runs in one process; loss
trajectories and final weights must agree, masks included. Cases: DDP on packed blocks;
DDP on SFT batches whose rows carry different numbers of target tokens, with KL
distillation (where a per-rank mean would not match); FSDP2, killed mid-run and
resumed from the checkpoint the two ranks wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsify.training.sft import SFTDataset
from sparsify.training.trainer import (
    CHECKPOINT_FORMAT,
    SHARDED_FORMAT,
    SHARDS_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
    Batch,
    PackedBlocks,
    TrainResult,
    checkpoint_weights,
    train,
)
from tests.test_sft import CharTokenizer
from tests.test_trainer import Killed, half_masks, random_blocks, tiny_config, tiny_llama

REPO = Path(__file__).resolve().parents[1]
CASES = ("blocks", "sft_kd", "fsdp_resume")
REFERENCE = {"blocks": "blocks", "sft_kd": "sft_kd", "fsdp_resume": "blocks"}  # the 1-process run to match

SCRIPT = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tests.test_ddp import CASES, run_case

torch.set_num_threads(1)
out = Path(sys.argv[1])
for name in CASES:
    model, result = run_case(name, out / f"ckpt-{name}")  # train() joins the group torchrun describes
    # gathered (FSDP shards) on every rank, written by rank 0
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, out / f"{name}.safetensors")
        summary = {"losses": [row["loss"] for row in result.history], "start_step": result.start_step}
        (out / f"{name}.json").write_text(json.dumps(summary))
dist.destroy_process_group()
"""


@dataclass(frozen=True)
class DyingBlocks(PackedBlocks):
    """Blocks whose batch `die_at` kills the run on every rank at once, like a lost node."""

    die_at: int = -1

    def batch(self, step: int, micro: int, batch_size: int, seed: int) -> Batch:
        if step == self.die_at:
            raise Killed
        return super().batch(step, micro, batch_size, seed)


def run_case(name: str, checkpoint_dir: Path | None = None) -> tuple[torch.nn.Module, TrainResult]:
    """One training run, identical in every process that calls it."""
    model = tiny_llama()
    masks = half_masks(model)
    cfg = tiny_config(steps=6, batch_size=4, grad_accum=2, checkpoint_every=3)
    if name == "sft_kd":
        records = [{"prompt": "q" * (1 + i % 7), "target": "abcdefghij"[: 1 + (3 * i) % 9]} for i in range(40)]
        data = SFTDataset.from_records(records, CharTokenizer(), max_length=16)
        cfg = cfg.model_copy(update={"kd_ce": 0.5, "kd_kl": 0.5, "kd_temperature": 2.0})
        result = train(
            model,
            data,
            data,
            cfg,
            seed=0,
            masks=masks,
            teacher=tiny_llama(seed=9),
            progress=False,
            checkpoint_dir=checkpoint_dir,
        )
        return model, result
    blocks = random_blocks()
    if name == "fsdp_resume":  # sharded, killed after its step-3 checkpoint, resumed by a fresh model
        cfg = cfg.model_copy(update={"fsdp": True})
        with contextlib.suppress(Killed):
            train(
                tiny_llama(),
                DyingBlocks(blocks, die_at=4),
                blocks,
                cfg,
                seed=0,
                masks=masks,
                progress=False,
                checkpoint_dir=checkpoint_dir,
            )
        model = tiny_llama(seed=5)
    result = train(model, blocks, blocks, cfg, seed=0, masks=masks, progress=False, checkpoint_dir=checkpoint_dir)
    return model, result


def test_two_process_ddp_matches_one_process(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(script),
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    references = {name: run_case(name) for name in set(REFERENCE.values())}
    for name in CASES:
        model, result = references[REFERENCE[name]]
        summary = json.loads((tmp_path / f"{name}.json").read_text())
        assert summary["start_step"] == (3 if name == "fsdp_resume" else 0)
        losses = summary["losses"]
        assert len(losses) == 6
        assert torch.allclose(torch.tensor(losses), torch.tensor([r["loss"] for r in result.history]), rtol=1e-4)
        ddp_weights = load_file(tmp_path / f"{name}.safetensors")
        for key, value in model.state_dict().items():
            assert torch.allclose(ddp_weights[key], value, rtol=1e-4, atol=1e-5), (name, key)
        for key, keep in half_masks(model).items():
            assert torch.count_nonzero(ddp_weights[key][~keep]) == 0, (name, key)
        # One checkpoint of the last step, and no leftover temporary directories.
        ckpt = tmp_path / f"ckpt-{name}"
        state = json.loads((ckpt / STATE_FILE).read_text())
        assert state["world_size"] == 2 and state["step"] == 6
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".ckpt-{name}")]
        if name == "fsdp_resume":  # sharded: each rank wrote its own shards, no gathered copy
            assert state["format"] == SHARDED_FORMAT and not (ckpt / WEIGHTS_FILE).exists()
            assert len(list((ckpt / SHARDS_DIR).glob("*.distcp"))) == 2
        else:
            assert state["format"] == CHECKPOINT_FORMAT
        saved = checkpoint_weights(ckpt)
        for key, value in model.state_dict().items():
            assert torch.allclose(saved[key], value, rtol=1e-4, atol=1e-5), (name, key)

    # The sharded checkpoint resumes in one process without FSDP (DCP reshards 2 → 1) into a fresh
    # model: weights and optimizer state loaded, nothing left to train, the reference's weights.
    model, _ = references["blocks"]
    resumed = tiny_llama(seed=7)
    cfg = tiny_config(steps=6, batch_size=4, grad_accum=2, checkpoint_every=3)
    result = train(
        resumed,
        random_blocks(),
        random_blocks(),
        cfg,
        seed=0,
        masks=half_masks(model),
        progress=False,
        checkpoint_dir=tmp_path / "ckpt-fsdp_resume",
    )
    assert result.start_step == 6 and len(result.history) == 6
    for key, value in model.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, rtol=1e-4, atol=1e-5), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_on_one_gpu_matches_plain_training(tmp_path):
    """FSDP2 over NCCL on one GPU (a one-process group) trains like the unwrapped model."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        blocks = random_blocks()
        results = []
        for fsdp in (False, True):
            model = tiny_llama()
            masks = half_masks(model)
            result = train(
                model,
                blocks,
                None,
                tiny_config(fsdp=fsdp, checkpoint_every=3),
                seed=0,
                masks=masks,
                device="cuda",
                progress=False,
                checkpoint_dir=tmp_path / f"fsdp-{fsdp}",
            )
            results.append([row["loss"] for row in result.history])
            weights = checkpoint_weights(tmp_path / f"fsdp-{fsdp}")
            assert all(torch.count_nonzero(weights[k][~m]) == 0 for k, m in masks.items())
        assert torch.allclose(torch.tensor(results[0]), torch.tensor(results[1]), rtol=1e-4)
    finally:
        dist.destroy_process_group()


def test_pipeline_stage_under_torchrun(tmp_path, smoke_root):
    """`torchrun -m flows.cli stage pretrain50`: both ranks train, rank 0 alone saves the model (masks
    kept), writes metrics and stamp, and logs the one MLflow run."""
    import shutil

    from mlflow.tracking import MlflowClient

    from sparsify.sparsity.masks import load_masks
    from tasks import stages
    from tasks.runner import execute
    from tests.conftest import PARAMS, smoke_config

    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    cfg = smoke_config(root)
    for name in ("data", "base", "prune50"):
        execute(stages.get(cfg, name), cfg, force=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "flows.cli",
            "stage",
            "pretrain50",
            "--config",
            str(PARAMS),
            "--profile",
            "smoke",
            "--set",
            f"project.root={root}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((root / "metrics" / "pretrain50.json").read_text())
    assert abs(metrics["sparsity"]["global"] - 0.5) < 1e-3 and metrics["ppl"]["val"] > 0
    masks = load_masks(root / "models" / "pretrain50" / "masks.safetensors")
    weights = load_file(root / "models" / "pretrain50" / "model.safetensors")
    for key, keep in masks.items():
        assert torch.count_nonzero(weights[key][~keep]) == 0, key
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sparsellama")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'pretrain50'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert not [p for p in (root / "models").iterdir() if p.name.startswith(".")]  # no leftover temp dirs
