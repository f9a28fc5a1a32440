"""Fine-tuning batches: prompt + target records, with the loss on the target only.

Records are the task records of :mod:`sparsify.data.downstream` (``{"id", "prompt",
"target", ...}``). Each becomes the prompt's tokens followed by the target's tokens
and EOS (so the model learns where an answer ends). Labels are -100 on the prompt and
on padding, so the model is trained to answer, not to reproduce questions.

Prompt and target are tokenized separately and then concatenated: the boundary
between "no loss" and "loss" is then exact, where tokenizing the joined text could
merge the last prompt character and the first target character into one token.

A too-long example keeps its target: the prompt is cut from the left (its start is the
least useful context for the answer), keeping a leading BOS. Only a target longer
than the whole budget is itself cut, from the right.

:class:`SFTDataset` is a :class:`sparsify.training.trainer.BatchSource`: micro-batch
(step, micro) is drawn from (seed, step, micro) alone, like the packed blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sparsify.errors import ConfigError, DataError
from sparsify.training.distill import IGNORE_INDEX
from sparsify.training.trainer import Batch, sample_indices

log = logging.getLogger(__name__)

Render = Callable[[Mapping[str, Any]], str]


def fit_length(
    prompt: Sequence[int], target: Sequence[int], max_length: int, keep_prefix: int = 0
) -> tuple[list[int], int]:
    """Cut ``prompt + target`` to at most `max_length` tokens; returns (ids, prompt length).

    The prompt loses tokens from its left, after its first `keep_prefix` tokens (a BOS);
    the target is cut (from the right) only when it alone does not fit.
    """
    if max_length <= keep_prefix:
        raise ConfigError(f"max_length ({max_length}) must exceed the {keep_prefix} kept prefix tokens")
    excess = len(prompt) + len(target) - max_length
    if excess <= 0:
        return [*prompt, *target], len(prompt)
    head, body = list(prompt[:keep_prefix]), list(prompt[keep_prefix:])
    kept_prompt = head + body[min(excess, len(body)) :]
    kept_target = list(target[: max_length - len(kept_prompt)])
    return kept_prompt + kept_target, len(kept_prompt)


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompts' ids with the tokenizer's special tokens, except for a prompt whose text already
    starts with the BOS (a chat template writes it): one BOS either way, as lm-eval encodes the
    same prompt. Batched, in the prompts' order."""
    bos = getattr(tokenizer, "bos_token", None)  # a minimal tokenizer may have no BOS at all
    framed = [bool(bos) and p.startswith(bos) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for special in (True, False):
        picked = [i for i, f in enumerate(framed) if f != special]
        if picked:
            encoded = tokenizer([prompts[i] for i in picked], add_special_tokens=special)["input_ids"]
            for i, ids in zip(picked, encoded, strict=True):
                out[i] = list(ids)
    return out


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """One prompt's ids (see `encode_prompts`)."""
    return encode_prompts(tokenizer, [prompt])[0]


def _prompt_and_target(record: Any, index: int) -> tuple[str, str]:
    """Check one record's fields; errors name the record index and the field."""
    for name in ("prompt", "target"):
        if not isinstance(record, Mapping) or name not in record:
            raise DataError(f"fine-tuning record {index}: missing field {name!r}")
        if not isinstance(record[name], str):
            raise DataError(
                f"fine-tuning record {index}: field {name!r} must be a string, got {type(record[name]).__name__}"
            )
    return record["prompt"], record["target"]


class SFTDataset:
    """Tokenized fine-tuning examples, served as right-padded micro-batches."""

    def __init__(self, examples: Sequence[tuple[Sequence[int], int]], pad_id: int) -> None:
        """`examples`: (token ids, number of leading prompt tokens) pairs."""
        if not examples:
            raise DataError("no fine-tuning examples")
        self._ids = [np.asarray(ids, dtype=np.int64) for ids, _ in examples]
        self._n_prompt = [int(n) for _, n in examples]
        self.pad_id = int(pad_id)

    @classmethod
    def from_records(
        cls,
        records: Iterable[Mapping[str, Any]],
        tokenizer: Any,
        max_length: int,
        *,
        render_prompt: Render | None = None,
        render_target: Render | None = None,
        add_eos: bool = True,
    ) -> SFTDataset:
        """Tokenize records. `render_prompt`/`render_target` format the text (e.g. a
        ``TaskSpec``'s ``render_prompt``/``render_target``, so training sees the format
        evaluation uses); by default the raw ``prompt`` and ``target`` fields.

        The prompt gets the tokenizer's own special tokens (a BOS for Llama), as a
        prompt does at generation time (:func:`encode_prompt`); the target none, then EOS if
        `add_eos`.
        """
        records = list(records)
        pairs = [_prompt_and_target(record, i) for i, record in enumerate(records)]  # all checked before work
        prompts = [render_prompt(r) if render_prompt else p for r, (p, _) in zip(records, pairs, strict=True)]
        targets = [render_target(r) if render_target else t for r, (_, t) in zip(records, pairs, strict=True)]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token to pad with")
        eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
        prompt_ids = encode_prompts(tokenizer, prompts)
        target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"] if targets else []
        examples, cut = [], 0
        for p_ids, t_ids in zip(prompt_ids, target_ids, strict=True):
            keep = 1 if p_ids and tokenizer.bos_token_id is not None and p_ids[0] == tokenizer.bos_token_id else 0
            examples.append(fit_length(p_ids, [*t_ids, *eos], max_length, keep_prefix=keep))
            cut += len(p_ids) + len(t_ids) + len(eos) > max_length
        if cut:
            log.warning(
                "%d of %d fine-tuning examples exceed %d tokens: prompts cut from the left",
                cut,
                len(examples),
                max_length,
            )
        return cls(examples, pad_id)

    def __len__(self) -> int:
        return len(self._ids)

    def collate(self, indices: Iterable[int]) -> Batch:
        """Right-pad the examples to the longest; labels are -100 on prompt and padding.

        Right padding keeps every real token at the positions it would have alone
        (causal attention never looks right), so padding changes no loss.
        """
        rows = [int(i) for i in indices]
        length = max(len(self._ids[i]) for i in rows)
        input_ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
        attention = np.zeros((len(rows), length), dtype=np.int64)
        for row, i in enumerate(rows):
            ids, n_prompt = self._ids[i], self._n_prompt[i]
            input_ids[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
            labels[row, n_prompt : len(ids)] = ids[n_prompt:]
        return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(attention))

    def batch(self, step: int, micro: int, batch_size: int, seed: int) -> Batch:
        return self.collate(sample_indices(len(self), step, micro, batch_size, seed))

    def eval_batches(self, max_rows: int, batch_size: int) -> Iterator[Batch]:
        n = min(max_rows, len(self))
        for start in range(0, n, batch_size):
            yield self.collate(range(start, min(start + batch_size, n)))


@torch.no_grad()
def target_nll(model: torch.nn.Module, dataset: SFTDataset, batch_size: int) -> list[tuple[float, int]]:
    """Per example, in order: (summed negative log-likelihood of its target tokens, EOS
    included, given its prompt; the number of those tokens). The fine-tuning loss measured one
    document at a time, so the same documents scored by two models can be compared pairwise;
    summed over examples and divided by the tokens it is the mean loss the trainer reports."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collate(range(start, min(start + batch_size, len(dataset))))
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        labels = batch.labels[:, 1:].to(device)  # unshifted labels: logits at t predict token t + 1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        mask = labels != IGNORE_INDEX
        out += [(float(nll[row][mask[row]].sum()), int(mask[row].sum())) for row in range(len(labels))]
    return out
