"""Pruning masks as data: which weights are prunable, save/load, enforce, check, report.

Convention (used by every stage): a mask is a ``torch.bool`` tensor with its weight's
shape; ``True`` = the weight is kept (it may be nonzero), ``False`` = pruned (it must be
exactly zero). Masks are keyed by full parameter names as ``model.named_parameters()``
spells them, e.g. ``model.layers.0.self_attn.q_proj.weight``.

Masks are computed once by pruning, saved next to the checkpoint
(``masks.safetensors``), and enforced by every later stage (``apply_masks`` after each
optimizer step, ``check_masks`` before writing a model).

Prunable weights are the ``nn.Linear`` weights inside the decoder layers: embeddings and
``lm_head`` are never pruned (the paper keeps them dense; they are few parameters in a
7B model and very sensitive).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from sparsify.errors import DataError, MissingFileError
from sparsify.io import atomic_path, atomic_write_bytes
from sparsify.safetensors_io import canonical_bytes

# Where Llama-family models keep their decoder layers: `LlamaForCausalLM` and a bare `LlamaModel`.
_DECODER_LAYER_PATHS = ("model.layers", "layers")


# --------------------------------------------------------------------------- prunable weights


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers and their module path (``"model.layers"`` for a CausalLM).

    Raises ValueError when the model has none, so callers fail before doing any work.
    """
    for path in _DECODER_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(
        f"{type(model).__name__} has no decoder layers: expected a non-empty ModuleList at "
        f"{' or '.join(_DECODER_LAYER_PATHS)} (a Llama-family model)"
    )


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name matches one of the ``ignore`` patterns.

    A pattern is an fnmatch glob matched against the whole name (``*.mlp.down_proj``,
    ``model.layers.0.*``), or, with a ``re:`` prefix, a regular expression that must
    match the whole name (``re:.*layers\\.(0|1)\\..*``) — the llm-compressor convention.
    """
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def prunable_linear_names(model: nn.Module, ignore: Sequence[str] = ()) -> list[str]:
    """Parameter names of the Linear weights inside decoder layers, in module order.

    ``ignore`` holds patterns on the *module* name (see :func:`matches_any`). Embeddings
    are not Linear and ``lm_head`` lives outside the decoder layers, so neither is ever
    returned.
    """
    prefix, _ = find_decoder_layers(model)
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix + ".") and not matches_any(name, ignore)
    ]


# --------------------------------------------------------------------------- save / load


def _as_bool_mask(name: str, mask: Tensor) -> Tensor:
    """A bool mask; uint8 0/1 (how some tools store masks) is converted, anything else refused."""
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype == torch.uint8 and bool((mask <= 1).all()):
        return mask.bool()
    raise DataError(f"mask {name!r} must be a bool (or 0/1 uint8) tensor, got {mask.dtype}")


def save_masks(masks: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write masks to a safetensors file (bool tensors) atomically: temp file, then rename."""
    tensors = {name: _as_bool_mask(name, m).detach().cpu().contiguous() for name, m in masks.items()}
    data = save(tensors, metadata={"format": "pt", "content": "sparsity masks (True = kept)"})
    # Canonical header: safetensors orders metadata at random per save, so the same masks saved by a
    # resumed run differed in bytes from those of an uninterrupted one (found by test_crash_anywhere).
    atomic_write_bytes(Path(path), canonical_bytes(data))


def load_masks(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read masks written by :func:`save_masks`, as bool tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"mask file not found: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise DataError(f"mask file {path} is corrupt or not a safetensors file: {err}") from err
    return {name: _as_bool_mask(name, t) for name, t in tensors.items()}


# --------------------------------------------------------------------------- enforce / check


def _fitting_mask(name: str, mask: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """``mask`` as bool, after checking it names a parameter of ``params`` with its shape."""
    if name not in params:
        raise DataError(f"mask {name!r} names no parameter of the model")
    if tuple(mask.shape) != tuple(params[name].shape):
        raise DataError(
            f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has {tuple(params[name].shape)}"
        )
    return _as_bool_mask(name, mask)


def validate_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Raise ValueError naming the first mask that is not bool or matches no parameter's name and shape."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        _fitting_mask(name, mask, params)


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero every pruned weight in place (no autograd record).

    All masks are validated before any weight changes, so a bad mask file leaves the
    model untouched. ``masked_fill`` rather than multiplication: ``nan * 0`` is nan.
    """
    validate_masks(model, masks)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            param = params[name]
            param.masked_fill_(~_as_bool_mask(name, mask).to(param.device), 0)


def check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Raise ValueError naming the first parameter that breaks its mask (shape, or a pruned nonzero)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        keep = _fitting_mask(name, mask, params)
        param = params[name].detach()
        violations = int(torch.count_nonzero(param[~keep.to(param.device)]))
        if violations:
            raise DataError(f"parameter {name!r} has {violations} nonzero weights where its mask prunes them")


# --------------------------------------------------------------------------- report


def sparsity_report(model: nn.Module, masks: Mapping[str, Tensor] | None = None, ignore: Sequence[str] = ()) -> dict:
    """Measured sparsity (fraction of exact zeros) of the prunable weights.

    Returns ``{"global": float, "layers": {name: float}, "zeros": int, "total": int}``;
    ``global`` weighs layers by size. With ``masks``, adds ``mask_global`` and
    ``mask_layers``: the fraction the masks prune (for the masked layers), so intended
    and measured sparsity can be compared side by side.
    """
    params = dict(model.named_parameters())
    layers: dict[str, float] = {}
    zeros = total = 0
    for name in prunable_linear_names(model, ignore):
        weight = params[name].detach()
        n_zero = weight.numel() - int(torch.count_nonzero(weight))
        layers[name] = n_zero / weight.numel()
        zeros += n_zero
        total += weight.numel()
    report: dict = {"global": zeros / total if total else 0.0, "layers": layers, "zeros": zeros, "total": total}
    if masks is not None:
        pruned_counts = {n: int((~_as_bool_mask(n, m)).sum()) for n, m in masks.items()}
        mask_layers = {n: pruned_counts[n] / masks[n].numel() for n in masks}
        pruned = sum(pruned_counts.values())
        numel = sum(m.numel() for m in masks.values())
        report["mask_layers"] = mask_layers
        report["mask_global"] = pruned / numel if numel else 0.0
    return report


def _short_name(name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` → ``3.mlp.down_proj`` for plot labels."""
    for prefix in (p + "." for p in _DECODER_LAYER_PATHS):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.removesuffix(".weight")


def plot_sparsity(report: Mapping, path: str | os.PathLike) -> None:
    """Write a PNG bar chart of per-layer sparsity, with the global sparsity as a line.

    Uses matplotlib's object API on an Agg canvas: no pyplot state and no global
    backend switch, so it is safe inside servers and threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report["layers"])
    values = [report["layers"][n] for n in names]
    fig = Figure(figsize=(max(6.0, 0.22 * len(names) + 2), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.axhline(report["global"], color="tab:red", linestyle="--", label=f"global {report['global']:.3f}")
    ax.set_xticks(range(len(names)), [_short_name(n) for n in names], rotation=90, fontsize=6)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_title("sparsity per layer")
    ax.legend(loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
