"""Language-model metrics computed directly on the packed validation blocks."""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def mean_nll(model, blocks: np.ndarray, *, max_blocks: int | None = None, batch_size: int = 8,
             device: torch.device | str = "cpu") -> float:
    """Mean next-token negative log-likelihood (nats) over the first `max_blocks` blocks."""
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    if n == 0:
        raise ValueError("no validation blocks to evaluate")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        ids = torch.from_numpy(np.asarray(blocks[i : min(i + batch_size, n)], dtype=np.int64)).to(device)
        loss = model(input_ids=ids, labels=ids).loss  # mean over the batch's predicted tokens
        tokens = ids.shape[0] * (ids.shape[1] - 1)
        total += loss.item() * tokens
        count += tokens
    model.train(was_training)
    return total / count


def perplexity(model, blocks: np.ndarray, **kwargs) -> float:
    return math.exp(mean_nll(model, blocks, **kwargs))
