"""Language-model metrics computed directly on the packed validation blocks."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sparsify.errors import DataError


def check_token_ids(ids: torch.Tensor | np.ndarray, model, what: str) -> None:
    """Raise ValueError when an id in `ids` has no row in the model's embedding.

    Without this, an id past the embedding is an opaque IndexError deep in a forward pass (or,
    on some devices, a silent read of another row): a sign that the data was tokenized with
    another tokenizer than the model's.
    """
    if len(ids) == 0:
        return
    rows = model.get_input_embeddings().num_embeddings
    top = int(ids.max())
    low = int(ids.min())
    if top >= rows or low < 0:
        raise DataError(
            f"{what} holds token id {top if top >= rows else low}, outside the model's embedding "
            f"[0, {rows}): the data was tokenized with a different tokenizer than the model's"
        )


@torch.no_grad()
def token_nll(
    model, blocks: np.ndarray, *, max_blocks: int | None = None, batch_size: int = 8, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Next-token negative log-likelihood (nats) of every predicted token of the first `max_blocks`
    blocks: ``[n, block_size - 1]``, entry ``[i, t]`` the loss of token ``t + 1`` given ``≤ t``.

    Per token so that callers can split one pass by where each token came from (per-source
    perplexity) instead of running the model once per grouping.
    """
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    if n == 0:
        raise DataError("no validation blocks to evaluate")
    check_token_ids(np.asarray(blocks[:n]), model, "the validation blocks")
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, n, batch_size):
        ids = torch.from_numpy(np.asarray(blocks[i : min(i + batch_size, n)], dtype=np.int64)).to(device)
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        out.append(nll.view(ids.shape[0], -1).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def mean_nll(model, blocks: np.ndarray, **kwargs) -> float:
    """Mean next-token negative log-likelihood (nats) over the first `max_blocks` blocks."""
    return float(token_nll(model, blocks, **kwargs).mean())


def perplexity(model, blocks: np.ndarray, **kwargs) -> float:
    return math.exp(mean_nll(model, blocks, **kwargs))
