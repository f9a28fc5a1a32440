"""The training loop for causal LMs on packed token blocks.

Used for the dense base model; sparse continued pretraining and fine-tuning use
the same loop with `masks` (held fixed: gradients of pruned weights are zeroed
and weights are re-masked after every optimizer step, so neither weight decay nor
Adam's momentum can regrow them).

Batches are drawn with a generator seeded by (seed, step), so a run is
deterministic and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsify.config import TrainConfig
from sparsify.metrics import mean_nll

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or gradients became NaN/inf."""


@dataclass
class TrainResult:
    steps: int
    final_train_loss: float
    val_loss: float | None
    history: list[dict] = field(default_factory=list)  # one row per logged step
    evals: list[dict] = field(default_factory=list)  # one row per validation
    tokens_per_s: float = 0.0
    seconds: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_at(blocks: np.ndarray, step: int, micro: int, batch_size: int, seed: int) -> torch.Tensor:
    """The micro-batch for (step, micro), a pure function of the seed so resume is exact."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 997 + micro)
    idx = torch.randint(0, len(blocks), (batch_size,), generator=gen).numpy()
    return torch.from_numpy(np.asarray(blocks[np.sort(idx)], dtype=np.int64))


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-D tensors), the usual Llama recipe.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _masked_params(model, masks: dict[str, torch.Tensor] | None) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    if not masks:
        return []
    params = dict(model.named_parameters())
    missing = [k for k in masks if k not in params]
    if missing:
        raise ValueError(f"masks name parameters the model does not have, e.g. {missing[0]!r}")
    out = []
    for name, mask in masks.items():
        p = params[name]
        if mask.shape != p.shape:
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight {tuple(p.shape)}")
        out.append((p, mask.to(device=p.device, dtype=torch.bool)))
    return out


def train(
    model,
    train_blocks: np.ndarray,
    val_blocks: np.ndarray | None,
    cfg: TrainConfig,
    *,
    seed: int,
    masks: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train `model` in place for `cfg.steps` optimizer steps; returns losses and throughput."""
    torch.set_flush_denormal(True)  # measured: ~5x slowdown from denormals after ~50 CPU steps without it
    torch.manual_seed(seed)
    device = torch.device(device)
    model.to(device).train()
    masked = _masked_params(model, masks)
    with torch.no_grad():
        for p, m in masked:
            p.mul_(m)
    opt = make_optimizer(model, cfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * train_blocks.shape[1]
    result = TrainResult(steps=cfg.steps, final_train_loss=float("nan"), val_loss=None)
    t0 = time.perf_counter()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not progress)
    for step in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            ids = batch_at(train_blocks, step, micro, cfg.batch_size, seed).to(device)
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"loss became {loss_sum} at step {step} (lr {lr:.2e}); lower train.lr")
        for p, m in masked:
            if p.grad is not None:
                p.grad.mul_(m)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm became {grad_norm.item()} at step {step}; lower train.lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in masked:
                p.mul_(m)
        result.final_train_loss = loss_sum
        elapsed = time.perf_counter() - t0
        tps = tokens_per_step * (step + 1) / elapsed
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}")
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            result.history.append({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm.item(),
                                   "tokens_per_s": tps})
        last = step == cfg.steps - 1
        if val_blocks is not None and ((step + 1) % cfg.eval_every == 0 or last):
            val = mean_nll(model, val_blocks, max_blocks=cfg.eval_blocks, batch_size=cfg.batch_size, device=device)
            model.train()
            result.evals.append({"step": step + 1, "val_loss": val, "val_ppl": math.exp(val)})
            log.info("step %d: train loss %.4f, val loss %.4f (ppl %.2f)", step + 1, loss_sum, val, math.exp(val))
            result.val_loss = val
    result.seconds = time.perf_counter() - t0
    result.tokens_per_s = tokens_per_step * cfg.steps / result.seconds
    model.eval()
    return result
