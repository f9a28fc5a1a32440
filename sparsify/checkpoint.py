"""A pipeline checkpoint folder: the one place that writes it and reads it back.

Every stage that writes a model writes this layout, and every stage that reads one reads it here:

  config.json, model*.safetensors     the model (Hugging Face ``save_pretrained``; never pickle)
  tokenizer.json, ...                 its tokenizer
  provenance.json                     stage, config sections, parents, git commit
  masks.safetensors                   the keep-masks of a sparse model (file format: ``sparsify.sparsity.masks``)

Reads are local: a checkpoint that is not on disk is an error that names the path, never a
download. Only what the user names as a source (``base.source``, ``data.tokenizer``) may be a
hub id (``hub=True``), served by the user's own Hugging Face cache and login.

Two other folders are not this one: the trainer's resume state (``sparsify.training.trainer.save_checkpoint``:
optimizer, step and RNG, to continue a killed run) and the sparse format the CPU runtime loads
(``sparsify.inference.loading.load_runtime_model``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsify.errors import DataError, ModelLoadError
from sparsify.io import atomic_write_json
from sparsify.sparsity.masks import load_masks, save_masks

PROVENANCE = "provenance.json"
MASKS = "masks.safetensors"
# Any one of these means the folder holds a tokenizer; without them, a folder search moves on.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, as :func:`load_checkpoint` read it."""

    path: Path
    model: nn.Module
    tokenizer: Any
    masks: dict[str, Tensor] | None  # None: a dense model
    provenance: dict | None  # None: a folder the pipeline did not write (e.g. a downloaded model)


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    provenance: dict,
    *,
    masks: dict[str, Tensor] | None = None,
    write_weights: Callable[[nn.Module, Path], None] | None = None,
) -> None:
    """Write ``model``, ``tokenizer`` (None: none), ``provenance`` and ``masks`` (None: dense) into ``out_dir``.

    The caller makes ``out_dir`` atomic (``sparsify.io.atomic_dir``), so a checkpoint is whole or absent.
    ``write_weights(model, out_dir)`` stands in for ``save_pretrained`` where the weights have another
    format (the quantize stage's compressed-tensors).
    """
    out_dir = Path(out_dir)
    # The weights first: a writer of another format may replace the whole folder (an atomic_dir of its own).
    if write_weights is None:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        write_weights(model, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    atomic_write_json(out_dir / PROVENANCE, provenance)
    if masks is not None:
        save_masks(masks, out_dir / MASKS)


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Checkpoint:
    """The checkpoint in the local folder ``path``: model (see :func:`load_model` for ``dtype``), tokenizer,
    and its masks and provenance when it has them."""
    path = Path(path)
    # The model first: a folder that is no checkpoint at all is best told by why its model does not load.
    model = load_model(path, dtype)
    return Checkpoint(
        path=path,
        model=model,
        tokenizer=load_tokenizer(path),
        masks=checkpoint_masks(path),
        provenance=read_provenance(path),
    )


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, *, hub: bool = False) -> nn.Module:
    """The causal LM in the folder ``path``, in eval mode.

    ``dtype``: the weights are read straight into it, so a 7B teacher in bf16 never exists in fp32
    (27 GB) first; None keeps the dtype it was saved in. ``hub``: ``path`` may also be a hub id (a
    user's ``base.source``). ModelLoadError, naming the path and the cause, when it is not a folder,
    does not load, or has no decoder layers (``model.model.layers``, which every stage walks).
    """
    from transformers import AutoModelForCausalLM

    if not hub and not Path(path).is_dir():
        raise ModelLoadError(f"cannot load checkpoint {path}: not a directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=not hub, **({} if dtype is None else {"dtype": dtype})
        )
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... by case
        raise ModelLoadError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ModelLoadError(f"{path}: {type(model).__name__} has no decoder layers (model.model.layers)")
    return model.eval()


def load_tokenizer(folder: str | os.PathLike, *fallbacks: str | os.PathLike | None, hub: bool = False):
    """The tokenizer of ``folder``, else of the first of ``fallbacks`` that holds one.

    Fallbacks serve a folder that borrows its tokenizer (the runtime's ``<output>/sparse`` uses
    ``<output>``'s). ``hub``: a name that is not a local folder is a hub id (``data.tokenizer``,
    ``base.source``). A tokenizer without a pad token pads with EOS, as the trainer and the
    evaluation's batches need; one without EOS is a DataError, since documents could then not be
    separated nor generation stop. ModelLoadError, naming the folders, when none holds a tokenizer
    or the one found does not load.
    """
    from transformers import AutoTokenizer

    tried = []
    for candidate in (folder, *fallbacks):
        if candidate is None:
            continue
        local = Path(candidate).is_dir()
        if local and not any((Path(candidate) / f).is_file() for f in _TOKENIZER_FILES):
            tried.append(str(candidate))
            continue
        if not local and not hub:
            tried.append(f"{candidate} (not a directory)")
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(candidate), local_files_only=not hub)
        except Exception as err:  # transformers raises many types by case
            raise ModelLoadError(f"cannot load the tokenizer in {candidate}: {type(err).__name__}: {err}") from err
        if tokenizer.eos_token_id is None:
            raise DataError(
                f"tokenizer {candidate} has no EOS token; documents could not be separated nor generation stop"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    raise ModelLoadError(f"no tokenizer found in {', '.join(tried)}; pass the folder that holds one")


def checkpoint_masks(path: str | os.PathLike) -> dict[str, Tensor] | None:
    """The keep-masks saved with the checkpoint at ``path``, or None for a dense one."""
    file = Path(path) / MASKS
    return load_masks(file) if file.is_file() else None


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The provenance saved with the checkpoint at ``path``, or None for a folder the pipeline did not write."""
    file = Path(path) / PROVENANCE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{file} is unreadable (truncated or corrupt?): {type(err).__name__}: {err}") from err
