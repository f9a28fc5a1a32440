"""The one training loop: dense base, sparse continued pretraining, sparse fine-tuning with KD.

Masks are held fixed. Gradients of pruned weights are zeroed before the optimizer
step, and after it the pruned weights and their AdamW moments are zeroed again, so
neither weight decay nor momentum can regrow a pruned weight, and the mask never
changes.

Objective: ``kd_ce``·CE + ``kd_kl``·KL + ``kd_squarehead``·SquareHead from a frozen
teacher (see :mod:`sparsify.training.distill`); the teacher only runs when a KD weight is > 0.

Batches come from a :class:`BatchSource`: packed LM blocks (:class:`PackedBlocks`) or
prompt/target fine-tuning records (:class:`sparsify.training.sft.SFTDataset`). Micro-batch
(step, micro) is a pure function of (seed, step, micro), so a resumed run, or any rank,
rebuilds exactly the batches an uninterrupted single process would have seen.

Global batch. ``cfg.batch_size`` rows per micro-batch and ``cfg.grad_accum``
micro-batches per optimizer step, *whatever the number of processes*. Under
``torchrun --nproc_per_node=W script.py`` (the script calls :func:`train`, which joins
the process group from torchrun's environment; the script destroys it at the end) each
of the W ranks computes ``batch_size / W`` rows of every micro-batch. Losses are sums
over target tokens divided by the number of target tokens in the step's whole global
batch, and each rank's loss is multiplied by W so DDP's gradient average becomes a
sum: the gradient equals the one-process gradient, and the trajectories match up to
float summation order. (SquareHead is the exception: its normalizer is per local
micro-batch, see :mod:`sparsify.training.distill`.) With ``cfg.fsdp`` the model is sharded with
FSDP2 (one unit per decoder layer) instead of replicated; meant for CUDA, it also runs
on CPU/gloo, which is how it is tested. The teacher is replicated on every rank.
Rank 0 alone writes checkpoints, logs and calls ``on_step``.

Checkpoints (``checkpoint_every`` steps, into ``checkpoint_dir``) hold the weights
(safetensors), the optimizer state (``torch.save`` of tensors and plain values, read
back with ``weights_only=True``), the RNG state and, in ``trainer_state.json``, the step,
logged history and fingerprints of the training config and the masks. The directory
is replaced as a whole and only once the new checkpoint is complete, and a state with
non-finite weights is never written, so a divergence keeps the last good checkpoint.

Under FSDP the checkpoint is sharded (format 2): every rank writes its own shards of the
weights and optimizer state with ``torch.distributed.checkpoint`` (``shards/``), so no
process ever holds the whole model and optimizer — at 7B that is ~80 GB of fp32 weights
and Adam moments a gathered checkpoint would pull into rank 0's host memory. A sharded
checkpoint resumes on any number of ranks (DCP reshards on load), with or without FSDP;
:func:`checkpoint_weights` reads its full weights in one process.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sparsify.config import Section
from sparsify.errors import ConfigError, DataError, MissingFileError, SparsellamaError
from sparsify.evaluation.metrics import check_token_ids
from sparsify.fingerprint import fingerprint
from sparsify.io import atomic_dir, atomic_write_json, replace_dir
from sparsify.model import bf16_supported
from sparsify.sparsity.masks import find_decoder_layers, validate_masks
from sparsify.training.distill import KDWeights, check_teacher, cross_entropy_sum, freeze, objective, target_positions

log = logging.getLogger(__name__)


class TrainConfig(Section):
    steps: int = Field(gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    eval_every: int = Field(default=100, gt=0)
    eval_blocks: int = Field(default=64, gt=0)
    log_every: int = Field(default=10, gt=0)
    # bf16 autocast of the forward/backward (weights, gradients and AdamW state stay fp32): True,
    # False, or "auto" = where the device computes bf16 natively (CUDA with bf16; a CPU with
    # AVX512-BF16 or AMX). Measured at the default shape on Zen 4: 1.5x the fp32 step rate; on an
    # AVX2-only CPU bf16 is emulated and slower than fp32, so "auto" keeps fp32 there.
    bf16: bool | Literal["auto"] = False
    checkpoint_every: int = Field(default=0, ge=0)  # optimizer steps between resumable checkpoints; 0 = off
    # Objective: kd_ce·CE(labels) + kd_kl·KL_T(teacher‖student)·T² + kd_squarehead·SquareHead
    # (sparsify.training.distill). The teacher only runs when kd_kl or kd_squarehead is > 0.
    kd_ce: float = Field(default=1.0, ge=0)
    kd_kl: float = Field(default=0.0, ge=0)
    kd_squarehead: float = Field(default=0.0, ge=0)
    kd_temperature: float = Field(default=1.0, gt=0)
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of replicating with DDP (for CUDA/NCCL)
    # Recompute each decoder layer's activations in the backward pass instead of keeping them:
    # activation memory falls from every layer's to ~one layer's, for ~1/3 more compute per step.
    gradient_checkpointing: bool = False
    # The KD teacher's weights in bf16 where the device computes bf16 natively (CUDA with bf16,
    # a CPU with AVX512-BF16/AMX): half its memory; it never needs gradients or fp32 updates.
    teacher_bf16: bool = False

    @model_validator(mode="after")
    def _some_loss(self) -> TrainConfig:
        if self.kd_ce + self.kd_kl + self.kd_squarehead <= 0:
            raise ValueError("at least one of kd_ce, kd_kl, kd_squarehead must be > 0 (nothing to train on)")
        return self


class TrainingDiverged(SparsellamaError, RuntimeError):
    """The loss, the gradients or the weights became NaN/inf (the message names train.lr; the CLI prints one line)."""


@dataclass
class TrainResult:
    steps: int
    final_train_loss: float
    val_loss: float | None
    history: list[dict] = field(default_factory=list)  # one row per logged step
    evals: list[dict] = field(default_factory=list)  # one row per validation
    tokens_per_s: float = 0.0  # over the steps this call ran
    seconds: float = 0.0
    start_step: int = 0  # > 0 when the run resumed from a checkpoint


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True, eq=False)
class Batch:
    """One micro-batch. Labels are unshifted, as in Hugging Face: ``labels[:, t]`` is the
    token at t, and -100 excludes it from every loss (prompt and padding tokens)."""

    input_ids: Tensor  # [B, T] int64
    labels: Tensor  # [B, T] int64
    attention_mask: Tensor | None = None  # [B, T], 1 = token, 0 = padding; None = no padding

    @property
    def n_targets(self) -> int:
        """Tokens the loss is computed on."""
        return int(target_positions(self.labels).sum())

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) input tokens, for throughput."""
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        mask = None if self.attention_mask is None else fn(self.attention_mask)
        return Batch(fn(self.input_ids), fn(self.labels), mask)

    def shard(self, rank: int, world: int) -> Batch:
        """This rank's contiguous share of the rows (the row count must divide evenly)."""
        rows = self.input_ids.shape[0] // world
        return self._map(lambda t: t[rank * rows : (rank + 1) * rows])

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))


class BatchSource(Protocol):
    """Where training and validation batches come from."""

    def batch(self, step: int, micro: int, batch_size: int, seed: int) -> Batch:
        """Micro-batch (step, micro): must depend on (seed, step, micro) only."""
        ...

    def eval_batches(self, max_rows: int, batch_size: int) -> Iterator[Batch]:
        """The first `max_rows` rows in a fixed order (validation)."""
        ...


def sample_indices(n_items: int, step: int, micro: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of micro-batch (step, micro), drawn with replacement by a generator seeded from
    (seed, step, micro) alone: any process can rebuild any batch without replaying the
    stream. Sorted, so reads from a memory-mapped corpus move forward."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 997 + micro)
    return np.sort(torch.randint(0, n_items, (batch_size,), generator=gen).numpy())


def batch_at(blocks: np.ndarray, step: int, micro: int, batch_size: int, seed: int) -> torch.Tensor:
    """The packed blocks of micro-batch (step, micro) as int64 token ids."""
    idx = sample_indices(len(blocks), step, micro, batch_size, seed)
    return torch.from_numpy(np.asarray(blocks[idx], dtype=np.int64))


@dataclass(frozen=True, eq=False)
class PackedBlocks:
    """Pretraining batches: fixed-length blocks of packed documents, every token a target."""

    blocks: np.ndarray  # [n_blocks, block_size]

    def batch(self, step: int, micro: int, batch_size: int, seed: int) -> Batch:
        ids = batch_at(self.blocks, step, micro, batch_size, seed)
        return Batch(ids, ids)

    def eval_batches(self, max_rows: int, batch_size: int) -> Iterator[Batch]:
        n = min(max_rows, len(self.blocks))
        for start in range(0, n, batch_size):
            ids = torch.from_numpy(np.asarray(self.blocks[start : min(start + batch_size, n)], dtype=np.int64))
            yield Batch(ids, ids)


def as_source(data: BatchSource | np.ndarray) -> BatchSource:
    """A token-block array becomes :class:`PackedBlocks`; a source is returned as is."""
    return PackedBlocks(data) if isinstance(data, np.ndarray) else data


# --------------------------------------------------------------------------- optimizer and masks


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-D tensors), the usual Llama recipe.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


BoundMasks = list[tuple[nn.Parameter, Tensor]]  # (parameter, bool "pruned" laid out like the parameter)


def bind_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> BoundMasks:
    """Pair each parameter with its *pruned* pattern (``~mask``), laid out like the parameter
    is now: on its device, and as a DTensor shard of the same placement under FSDP."""
    if not masks:
        return []
    validate_masks(model, masks)
    params = dict(model.named_parameters())
    bound = []
    for name, mask in masks.items():
        param = params[name]
        pruned = ~mask.to(device=param.device, dtype=torch.bool)
        if hasattr(param, "device_mesh"):  # a DTensor: every rank cuts its own shard, no communication
            from torch.distributed.tensor import distribute_tensor

            pruned = distribute_tensor(pruned, param.device_mesh, param.placements, src_data_rank=None)
        bound.append((param, pruned))
    return bound


def mask_gradients(bound: BoundMasks) -> None:
    """Zero the gradients of pruned weights, so clipping and Adam's moments never see them."""
    for param, pruned in bound:
        if param.grad is not None:
            param.grad.masked_fill_(pruned, 0)


@torch.no_grad()
def enforce_masks(bound: BoundMasks, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero pruned weights and, with `optimizer`, their per-weight state (Adam's moments).

    ``masked_fill`` rather than multiplying by the mask: ``nan * 0`` is nan.
    """
    for param, pruned in bound:
        param.masked_fill_(pruned, 0)
        if optimizer is not None:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.masked_fill_(pruned, 0)


def masks_fingerprint(masks: Mapping[str, Tensor] | None) -> str:
    """A short hash of the masks' names, shapes and bits (a resume must use the same masks)."""
    if not masks:
        return "none"
    return fingerprint({name: m.detach().to("cpu", torch.bool) for name, m in masks.items()}, length=16)


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    The group is created once (NCCL with CUDA, gloo otherwise) and never destroyed
    here: the launching script owns its lifetime. Without torchrun: one process.
    """
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def _all_reduce_sum(tensor: Tensor, info: DistInfo) -> Tensor:
    if info.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _resolve_device(device: torch.device | str, info: DistInfo) -> torch.device:
    """Each rank of a multi-GPU run gets its own GPU (``cuda:LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and info.world > 1:
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _wrap(model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device) -> nn.Module:
    """The module the loop calls forward on.

    FSDP2 (``cfg.fsdp``; meant for CUDA/NCCL, also runs on CPU/gloo) shards `model` in
    place, one unit per decoder layer plus the root, so each rank holds 1/W of the
    weights, gradients and optimizer state. DDP (several processes) wraps `model` and
    shares its parameters. Either way the optimizer, masks and checkpoints keep working
    on `model` itself.
    """
    if cfg.fsdp:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("train.fsdp needs a process group: launch the script with torchrun")
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6

        for layer in find_decoder_layers(model)[1]:
            fully_shard(layer)
        fully_shard(model)
        return model
    if info.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC)
    return model


# No buffer syncs in forward: the only buffers (rotary frequencies) are constants, and
# syncing them would make every forward (evaluation too) a collective. Recent torch
# deprecates `broadcast_buffers` in favour of `forward_sync_buffers`.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def _gradient_sync(wrapped: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients across ranks only after the last micro-batch of a step: summing
    locally first gives the same gradient with one reduction instead of grad_accum."""
    if isinstance(wrapped, DistributedDataParallel) and not enabled:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2); a plain tensor as is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextlib.contextmanager
def _activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """HF activation (gradient) checkpointing of every decoder layer, non-reentrant (works with
    inputs that need no gradient, and with FSDP), for the block only: the model given back to
    the caller behaves as it came."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    if enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU does not support bf16; training in fp32")
        enabled = False
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 1  # one process wrote the gathered weights and optimizer state
SHARDED_FORMAT = 2  # every rank wrote its shards (torch.distributed.checkpoint) under SHARDS_DIR
STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE, SHARDS_DIR = (
    "trainer_state.json",
    "model.safetensors",
    "optimizer.pt",
    "rng.safetensors",
    "shards",
)
# Fields that change what is logged, or how the work is laid out, but not the weights'
# trajectory: a run may resume with them changed. Everything else must match.
_NOT_TRAJECTORY = frozenset(
    {"eval_every", "eval_blocks", "log_every", "checkpoint_every", "fsdp", "gradient_checkpointing"}
)


def trajectory_config(cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """The settings that decide the weights after each step (what a resume must match)."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_TRAJECTORY}
    return {**settings, "seed": seed}


def _is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())  # FSDP2 parameters are DTensors


def _state_dict_options(model: nn.Module) -> StateDictOptions:
    """Full (gathered, on CPU) state dicts under FSDP; the plain ones otherwise."""
    return StateDictOptions(full_state_dict=True, cpu_offload=True) if _is_sharded(model) else StateDictOptions()


def _rng_state() -> dict[str, Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo
) -> None:
    """Replace the checkpoint in `path` with the current one, atomically.

    Every rank must call this. A sharded (FSDP) model: every rank writes its shards. Otherwise
    rank 0 writes the whole state. The new files go to a temporary sibling directory that is
    renamed over `path` only once all are written, so a crash mid-write keeps the previous
    checkpoint.
    """
    if _is_sharded(model):
        _save_sharded(path, model, optimizer, state, info)
        return
    options = _state_dict_options(model)
    weights = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if info.is_main:
        rng = _rng_state()
        with atomic_dir(path) as tmp:
            # clone: tied weights share storage, which safetensors refuses to write
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, tmp / WEIGHTS_FILE)
            torch.save(optim_state, tmp / OPTIMIZER_FILE)  # tensors and plain values only
            save_file(rng, tmp / RNG_FILE)
            atomic_write_json(tmp / STATE_FILE, state)
    if info.world > 1:
        dist.barrier()


def _save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    # One temporary directory that every rank agrees on (DCP's writers need the same path);
    # rank 0 clears a stale one a killed run may have left, and moves the finished one into place.
    tmp = path.with_name(f".{path.name}.tmp-sharded")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if info.world > 1:
        dist.barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=tmp / SHARDS_DIR)  # collective: each rank its shards
    if info.is_main:
        save_file(_rng_state(), tmp / RNG_FILE)
        atomic_write_json(tmp / STATE_FILE, {**state, "format": SHARDED_FORMAT})
        replace_dir(tmp, path)
    if info.world > 1:
        dist.barrier()


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """What a sharded checkpoint holds, as this process sees it: its shards under FSDP (DTensors),
    whole tensors otherwise; DCP maps either onto the stored shards."""
    out: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        out["optim"] = get_optimizer_state_dict(model, optimizer)  # initializes Adam's moments to load into
    return out


def _read_checkpoint_file(file: Path, read: Callable[[Path], Any]) -> Any:
    """``read(file)`` for a file of a training checkpoint; one that does not read (truncated, corrupt) is a
    DataError naming it. Checkpoints are written atomically, so this is damage from outside the trainer."""
    try:
        return read(file)
    except Exception as err:  # safetensors, torch.load and json each raise their own types
        raise DataError(
            f"training checkpoint file {file} is unreadable (truncated or corrupt?): {type(err).__name__}: {err}; "
            f"remove {file.parent} to train from the start"
        ) from err


def checkpoint_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The full model weights of a checkpoint directory, either format, in this one process."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return _read_checkpoint_file(path / WEIGHTS_FILE, load_file)
    if not (path / SHARDS_DIR).is_dir():
        raise MissingFileError(f"{path} holds no training checkpoint ({WEIGHTS_FILE} or {SHARDS_DIR}/)")
    with tempfile.TemporaryDirectory() as tmp:  # DCP's own converter: shards → one torch.save file
        dcp_to_torch_save(path / SHARDS_DIR, Path(tmp) / "full.pt")
        return torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)["model"]


def read_checkpoint_state(path: Path, expected_config: dict, masks_fp: str) -> dict | None:
    """The checkpoint's ``trainer_state.json`` (None if there is none), after checking that
    it was written by this training configuration and these masks."""
    state_path = Path(path) / STATE_FILE
    if not state_path.is_file():
        return None
    state = _read_checkpoint_file(state_path, lambda f: json.loads(f.read_text()))
    if state.get("format") not in (CHECKPOINT_FORMAT, SHARDED_FORMAT):
        raise DataError(
            f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT} or {SHARDED_FORMAT}"
        )
    if state["config_fingerprint"] != fingerprint(expected_config):
        saved = state["config"]
        diffs = [
            f"{k}: {saved.get(k)!r} in the checkpoint, {expected_config.get(k)!r} now"
            for k in sorted(set(saved) | set(expected_config))
            if saved.get(k) != expected_config.get(k)
        ]
        raise ConfigError(
            f"checkpoint {path} was written by a different training configuration "
            f"({'; '.join(diffs)}); resume with the same train config and seed, "
            f"or use an empty checkpoint_dir"
        )
    if state["masks_fingerprint"] != masks_fp:
        raise ConfigError(
            f"checkpoint {path} was written with different masks ({state['masks_fingerprint']}, "
            f"now {masks_fp}); resume with the masks it was trained with"
        )
    return state


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, source: BatchSource, *, max_rows: int, batch_size: int, device: torch.device | str = "cpu"
) -> float:
    """Mean next-token loss (nats) over the target tokens of `source`'s first `max_rows` rows.

    For packed blocks this is ``metrics.mean_nll``; for fine-tuning data, the loss on
    the targets only.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in source.eval_batches(max_rows, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total += cross_entropy_sum(logits, batch.labels).item()
        count += batch.n_targets
    model.train(was_training)
    if count == 0:
        raise DataError("validation data has no target tokens")
    return total / count


# --------------------------------------------------------------------------- the loop


def _teacher_for(
    student: nn.Module, teacher: nn.Module | None, weights: KDWeights, device: torch.device, bf16: bool
) -> nn.Module | None:
    """The frozen teacher on `device` when a KD term needs it, else None (it never runs).

    With ``bf16`` (``train.teacher_bf16``) and a device that computes bf16 natively, its
    weights are cast to bf16 (in place: the caller's teacher is the stage's own copy).
    """
    if not weights.needs_teacher:
        if teacher is not None:
            log.warning("a teacher was given but kd_kl and kd_squarehead are 0: it is not used")
        return None
    if teacher is None:
        raise ConfigError("kd_kl or kd_squarehead > 0 needs a teacher model")
    check_teacher(student, teacher, weights)
    dtype = None
    if bf16:
        if bf16_supported(device):
            dtype = torch.bfloat16
        else:
            log.warning("train.teacher_bf16: %s has no native bf16; the teacher stays in its dtype", device)
    return freeze(teacher).to(device=device, dtype=dtype)


def _accumulate_gradients(
    wrapped: nn.Module,
    teacher: nn.Module | None,
    batches: list[Batch],
    weights: KDWeights,
    info: DistInfo,
    device: torch.device,
    autocast: torch.autocast,
) -> dict[str, float]:
    """Forward and backward every micro-batch of one step (this rank's rows).

    Returns the step's loss and its terms over the whole global batch (all ranks).
    """
    n_targets = sum(b.n_targets for b in batches)  # global: every rank builds the full batches
    sums: dict[str, Tensor] = {}
    for micro, full in enumerate(batches):
        batch = full.shard(info.rank, info.world).to(device)
        with _gradient_sync(wrapped, micro == len(batches) - 1):
            with autocast:
                out = wrapped(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    output_hidden_states=weights.needs_hidden_states,
                )
                teacher_out = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_out = teacher(
                            input_ids=batch.input_ids,
                            attention_mask=batch.attention_mask,
                            output_hidden_states=weights.needs_hidden_states,
                        )
                loss, terms = objective(out, teacher_out, batch.labels, weights, n_targets)
            # DDP averages gradients over the W ranks; × W turns the average into the sum
            # over ranks, i.e. the gradient of the global batch's loss.
            (loss * info.world).backward()
        for name, value in {"loss": loss.detach(), **terms}.items():
            sums[name] = sums.get(name, 0.0) + value.float()
    names = sorted(sums)
    totals = _all_reduce_sum(torch.stack([sums[n] for n in names]), info)
    return dict(zip(names, totals.tolist(), strict=True))


def _clip_gradients(model: nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _weights_finite(model: nn.Module, info: DistInfo, device: torch.device) -> bool:
    """Whether every weight is finite, agreed by all ranks (each checks its own shard)."""
    bad = sum(int((~torch.isfinite(_local(p.detach()))).sum()) for p in model.parameters())
    return _all_reduce_sum(torch.tensor([float(bad)], device=device), info).item() == 0


def _continue_from(
    state: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, bound: BoundMasks, result: TrainResult
) -> None:
    """Load a checkpoint's optimizer and RNG state and the history it logged so far (a gathered
    checkpoint's weights were loaded before wrapping; a sharded one's are loaded here, into
    whatever layout this run has)."""
    if state["format"] == SHARDED_FORMAT:
        target = _sharded_state(model, optimizer)
        with warnings.catch_warnings():  # one process, no group: DCP says it loads alone, which is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, checkpoint_id=path / SHARDS_DIR)
        set_model_state_dict(model, target["model"])
        set_optimizer_state_dict(model, optimizer, target["optim"])
    else:
        optim_state = _read_checkpoint_file(
            path / OPTIMIZER_FILE, lambda f: torch.load(f, map_location="cpu", weights_only=True)
        )
        set_optimizer_state_dict(model, optimizer, optim_state, options=_state_dict_options(model))
    enforce_masks(bound, optimizer)
    rng = _read_checkpoint_file(path / RNG_FILE, load_file)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    result.start_step = state["step"]
    result.history, result.evals = state["history"], state["evals"]
    result.final_train_loss = state["final_train_loss"]
    result.val_loss = result.evals[-1]["val_loss"] if result.evals else None


def _perplexity(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf  # exp overflows a float past ~709


def train(
    model: nn.Module,
    train_data: BatchSource | np.ndarray,
    val_data: BatchSource | np.ndarray | None,
    cfg: TrainConfig,
    *,
    seed: int,
    masks: Mapping[str, Tensor] | None = None,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    on_step: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train `model` in place for `cfg.steps` optimizer steps; returns losses and throughput.

    `train_data`/`val_data`: a :class:`BatchSource`, or an array of packed token blocks.
    `masks`: parameter name → bool (True = kept), held fixed. `teacher`: for KD.
    `checkpoint_dir`: where ``cfg.checkpoint_every`` writes; with `resume` (the default)
    a checkpoint found there is continued from, after checking it belongs to this config,
    seed and masks. `on_step`: called (rank 0 only) after every step with that step's
    row (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, KD terms, and
    ``val_loss`` on validation steps), after any checkpoint of that step is written.
    Under ``torchrun`` the process group is joined here and the model wrapped in DDP
    (or FSDP2 with ``cfg.fsdp``); the global batch stays as configured.
    """
    torch.set_flush_denormal(True)  # measured: ~5x slowdown from denormals after ~50 CPU steps without it
    info = init_distributed()
    if cfg.batch_size % info.world:
        raise ConfigError(
            f"train.batch_size ({cfg.batch_size}) is the global micro-batch and must divide evenly "
            f"over the {info.world} processes"
        )
    device = _resolve_device(device, info)
    if cfg.bf16 == "auto":  # resolved here, so the checkpoint's fingerprint records what ran
        cfg = cfg.model_copy(update={"bf16": bf16_supported(device)})
        if info.is_main:
            log.info("train.bf16=auto: %s on %s", "bf16 autocast" if cfg.bf16 else "fp32 (no native bf16)", device)
    weights = KDWeights.from_config(cfg)
    teacher = _teacher_for(model, teacher, weights, device, cfg.teacher_bf16)
    source = as_source(train_data)
    val_source = as_source(val_data) if val_data is not None else None
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    expected = trajectory_config(cfg, seed)

    torch.manual_seed(seed)
    model.to(device).train()
    masks_fp = masks_fingerprint(masks)
    state = read_checkpoint_state(ckpt, expected, masks_fp) if ckpt is not None and resume else None
    if state is not None and state["format"] == CHECKPOINT_FORMAT:  # before wrapping: FSDP shards, DDP broadcasts
        saved = _read_checkpoint_file(ckpt / WEIGHTS_FILE, lambda f: load_file(f, device=str(device)))
        model.load_state_dict(saved, strict=True)
    wrapped = _wrap(model, cfg, info, device)
    bound = bind_masks(model, masks)
    enforce_masks(bound)
    opt = make_optimizer(model, cfg)

    result = TrainResult(steps=cfg.steps, final_train_loss=float("nan"), val_loss=None)
    if state is not None:
        _continue_from(state, ckpt, model, opt, bound, result)
        if info.is_main:
            log.info("resuming from %s at step %d of %d", ckpt, result.start_step, cfg.steps)
    elif ckpt is not None and (ckpt / STATE_FILE).is_file() and info.is_main:
        log.warning("not resuming (resume=False): the checkpoint in %s will be replaced", ckpt)
    if cfg.checkpoint_every and ckpt is None and info.is_main:
        log.warning(
            "train.checkpoint_every is %d but no checkpoint_dir was given: no checkpoints", cfg.checkpoint_every
        )
    last_good = result.start_step if state is not None else None  # step of the checkpoint on disk

    def diverged(what: str, step: int) -> TrainingDiverged:
        kept = (
            f"the last good checkpoint (step {last_good}) is kept in {ckpt}"
            if last_good is not None
            else "no checkpoint was written"
        )
        return TrainingDiverged(
            f"{what} at step {step} (lr {lr_at(step, cfg):.2e}); training stopped and "
            f"{kept}; lower train.lr or raise warmup_steps"
        )

    autocast = _autocast(device, cfg.bf16)
    bar = tqdm(
        total=cfg.steps, initial=result.start_step, desc="train", unit="step", disable=not (progress and info.is_main)
    )
    t0, tokens = time.perf_counter(), 0
    with bar, _activation_checkpointing(model, cfg.gradient_checkpointing):
        for step in range(result.start_step, cfg.steps):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batches = [source.batch(step, micro, cfg.batch_size, seed) for micro in range(cfg.grad_accum)]
            for b in batches:  # cheap next to the forward; an id past the embedding is otherwise an opaque crash
                check_token_ids(b.input_ids, model, f"training batch (step {step})")
            terms = _accumulate_gradients(wrapped, teacher, batches, weights, info, device, autocast)
            loss = terms["loss"]
            if not math.isfinite(loss):
                raise diverged(f"the loss became {loss}", step)
            mask_gradients(bound)
            grad_norm = _clip_gradients(model, cfg.grad_clip)
            if not math.isfinite(grad_norm):
                raise diverged(f"the gradient norm became {grad_norm}", step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            enforce_masks(bound, opt)

            tokens += sum(b.n_tokens for b in batches)
            tps = tokens / (time.perf_counter() - t0)
            result.final_train_loss = loss
            row = {"step": step, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, **terms}
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)  # redraw at tqdm's interval only
            last = step == cfg.steps - 1
            if step % cfg.log_every == 0 or last:
                result.history.append(row)
            if val_source is not None and ((step + 1) % cfg.eval_every == 0 or last):
                val = evaluate(model, val_source, max_rows=cfg.eval_blocks, batch_size=cfg.batch_size, device=device)
                result.evals.append({"step": step + 1, "val_loss": val, "val_ppl": _perplexity(val)})
                result.val_loss = row["val_loss"] = val
                if info.is_main:
                    log.info(
                        "step %d: train loss %.4f, val loss %.4f (ppl %.2f)", step + 1, loss, val, _perplexity(val)
                    )
            if ckpt is not None and cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or last):
                if not _weights_finite(model, info, device):
                    raise diverged("the weights became non-finite", step)
                save_checkpoint(
                    ckpt,
                    model,
                    opt,
                    {  # format: SHARDED_FORMAT when the model is sharded
                        "format": CHECKPOINT_FORMAT,
                        "step": step + 1,
                        "config": expected,
                        "config_fingerprint": fingerprint(expected),
                        "masks_fingerprint": masks_fp,
                        "final_train_loss": loss,
                        "history": result.history,
                        "evals": result.evals,
                        "world_size": info.world,
                    },
                    info,
                )
                last_good = step + 1
            if on_step is not None and info.is_main:
                on_step(row)
    result.seconds = time.perf_counter() - t0
    result.tokens_per_s = tokens / result.seconds if tokens else 0.0
    model.eval()
    return result
