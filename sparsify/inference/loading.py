"""Load a pipeline output straight into the sparse CPU runtime.

:func:`load_runtime_model` takes a folder and returns a model whose sparse Linears are
:class:`sparsify.inference.runtime.SparseLinear` modules, plus the tokenizer:

* **The project's sparse format** (``sparse_model.safetensors`` + ``config.json``, written by
  :func:`sparsify.inference.export.save_sparse_model`; the quantize stage writes it under ``<output>/sparse``,
  which is found from ``<output>`` too). Each encoded weight becomes a
  :class:`sparsify.inference.kernels.PackedWeight` directly (:func:`packed_from_layer`): no dense copy of a
  sparse weight is ever built. The file is memory-mapped: dense tensors (embeddings, norms, a
  float ``lm_head``), the bitmasks (when ``in_features`` is a multiple of 64, as in every Llama
  shape, the file's rows already are whole 64-bit words) and the row offsets are views of the
  mapping. The packed values are copied once, because the kernels' format requires 64 bytes of
  zeros after them (vector loads may read past the last row).
* **A Hugging Face folder** (dense, or holding the zeros of a pruned model): loaded by
  transformers (which memory-maps safetensors), then decoder Linears at least ``min_sparsity``
  sparse are swapped for SparseLinear (:func:`sparsify.inference.runtime.sparsify_model`) in the model's
  own float dtype, so the arithmetic is the dense model's. A compressed-tensors checkpoint is left
  to transformers' integration (its Linears hold compressed weights and activation quantization).

Encodings: ``float`` (bf16/fp32 values; fp16 is widened to fp32, exactly), ``int8``
(per-channel codes, W8A8 or W8A16 by the layer's activation bits) and ``int4`` (codes in groups
that are a multiple of 64 columns, W4A16 or W4A8): the export's row-padded two's-complement
nibbles are re-packed into the kernels' per-mask-word layout from the kept codes alone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsify.checkpoint import load_model, load_tokenizer
from sparsify.errors import ModelLoadError
from sparsify.inference.export import SPARSE_FILE, SparseLayer, check_sparse_header, int4_row_codes
from sparsify.inference.kernels import PackedWeight
from sparsify.inference.kernels.format import PAD_BYTES, pack_int4_kept, popcount_rows, row_sums
from sparsify.inference.runtime import SparseLinear, sparsify_model, use_decode_attention
from sparsify.safetensors_io import SafetensorsReadError, read_safetensors_mmap

logger = logging.getLogger(__name__)


class UnsupportedLayer(ModelLoadError):
    """A well-formed layer the kernels have no path for (e.g. INT4 groups that are not whole mask
    words): the model is fine and runs elsewhere (transformers), just not on the sparse runtime."""


# --------------------------------------------------------------------------- SparseLayer -> PackedWeight


def _padded_values(values: Tensor, row_ptr: Tensor) -> Tensor:
    """The stored values followed by the kernels' 64 bytes of zeros: the file's own tensor (a view of the
    mapping, no copy) when it was written with them (:class:`sparsify.inference.export.SparseModelWriter` does),
    else one copy."""
    stored, pad = int(row_ptr[-1]), PAD_BYTES // values.element_size()
    if values.numel() == stored + pad and not values[stored:].any():
        return values
    out = torch.empty(stored + pad, dtype=values.dtype)
    out[:stored].copy_(values[:stored])
    out[stored:].zero_()
    return out


def _kernel_bitmask(bitmask: Tensor, in_features: int) -> Tensor:
    """The export's rows (``ceil(in/8)`` bytes) as the kernels' rows (whole 64-bit words): a view when they agree."""
    out = bitmask.shape[0]
    width = 8 * -(-in_features // 64)
    if bitmask.shape[1] == width:
        return bitmask if bitmask.is_contiguous() else bitmask.contiguous()
    padded = torch.zeros(out, width, dtype=torch.uint8)
    padded[:, : bitmask.shape[1]] = bitmask
    return padded


def _check_layer(name: str, layer: SparseLayer) -> None:
    out, cols = layer.shape
    if tuple(layer.bitmask.shape) != (out, -(-cols // 8)) or layer.bitmask.dtype != torch.uint8:
        raise ModelLoadError(
            f"{name}: bitmask must be uint8 [{out}, {-(-cols // 8)}], "
            f"got {layer.bitmask.dtype} {tuple(layer.bitmask.shape)}"
        )
    if tuple(layer.row_ptr.shape) != (out + 1,) or layer.row_ptr.dtype != torch.int64:
        raise ModelLoadError(f"{name}: row_ptr must be int64 [{out + 1}]")


def _pack_float(name: str, layer: SparseLayer) -> PackedWeight:
    values = layer.values
    if values.dtype == torch.float16:  # no fp16 kernels; fp32 holds every fp16 value exactly
        values = values.float()
    elif values.dtype not in (torch.float32, torch.bfloat16):
        raise ModelLoadError(f"{name}: float encoding with {values.dtype} values is not supported")
    return PackedWeight(
        tuple(layer.shape),
        _kernel_bitmask(layer.bitmask, layer.shape[1]),
        layer.row_ptr,
        _padded_values(values, layer.row_ptr),
    )


def _pack_int8(name: str, layer: SparseLayer) -> PackedWeight:
    out = layer.shape[0]
    if layer.values.dtype != torch.int8:
        raise ModelLoadError(f"{name}: int8 encoding needs int8 values, got {layer.values.dtype}")
    if layer.group_size is not None:
        raise UnsupportedLayer(
            f"{name}: the INT8 kernels need per-channel scales, this layer has groups of {layer.group_size} columns"
        )
    if layer.scales is None or layer.scales.numel() != out:
        raise ModelLoadError(f"{name}: int8 encoding needs one scale per output channel ({out})")
    if layer.activation_bits not in (None, 8):
        raise UnsupportedLayer(f"{name}: activation bits {layer.activation_bits} are not supported (8 or none)")
    codes = layer.values
    # bf16/fp16/fp32 scales are exact in fp32: the dequantized weight is the stored model's.
    scales = layer.scales.reshape(out).float().contiguous()
    return PackedWeight(
        tuple(layer.shape),
        _kernel_bitmask(layer.bitmask, layer.shape[1]),
        layer.row_ptr,
        _padded_values(codes, layer.row_ptr),
        scales,
        row_sums(codes, layer.row_ptr),
        act_int8=layer.activation_bits == 8,
    )


def _int4_kept_codes(name: str, layer: SparseLayer) -> Tensor:
    """The export's INT4 codes of the set bits, row-major, from the bitmask's per-row counts (no dense
    mask or weight), after checking the stored row offsets agree with those counts."""
    counts = popcount_rows(layer.bitmask)
    if not torch.equal(layer.row_ptr, torch.cat([counts.new_zeros(1), ((counts + 1) // 2).cumsum(0)])):
        raise ModelLoadError(f"{name}: int4 row offsets do not match the bitmask's counts")
    return int4_row_codes(layer.values, counts)


def _pack_int4(name: str, layer: SparseLayer) -> PackedWeight:
    out, cols = layer.shape
    if layer.values.dtype != torch.uint8:
        raise ModelLoadError(f"{name}: int4 encoding needs uint8 values, got {layer.values.dtype}")
    g = layer.group_size
    if g is not None and (g % 64 or cols % g):
        raise UnsupportedLayer(
            f"{name}: the INT4 kernels need groups that are a multiple of 64 columns dividing "
            f"{cols}, this layer has groups of {g}; load the compressed-tensors checkpoint with "
            "transformers instead"
        )
    groups = 1 if g is None else cols // g
    if layer.scales is None or layer.scales.numel() != out * groups:
        raise ModelLoadError(f"{name}: int4 encoding needs {out} x {groups} scales")
    if layer.activation_bits not in (None, 8):
        raise UnsupportedLayer(f"{name}: activation bits {layer.activation_bits} are not supported (8 or none)")
    try:
        kept = _int4_kept_codes(name, layer)
        # bf16/fp16/fp32 scales are exact in fp32: the dequantized weight is the stored model's.
        return pack_int4_kept(
            tuple(layer.shape),
            _kernel_bitmask(layer.bitmask, cols),
            kept,
            layer.scales.reshape(out, groups).float(),
            g,
            act_int8=layer.activation_bits == 8,
        )
    except ValueError as err:
        raise ModelLoadError(f"{name}: stored int4 layer is inconsistent: {err}") from err


_PACKERS = {"float": _pack_float, "int8": _pack_int8, "int4": _pack_int4}


def packed_from_layer(name: str, layer: SparseLayer) -> PackedWeight:
    """The kernels' :class:`PackedWeight` of one layer of the sparse format, without densifying it."""
    packer = _PACKERS.get(layer.encoding)
    if packer is None:
        raise ModelLoadError(f"{name}: unknown encoding {layer.encoding!r} (known: {sorted(_PACKERS)})")
    _check_layer(name, layer)
    packed = packer(name, layer)
    try:
        packed.validate()
    except ValueError as err:
        raise ModelLoadError(f"{name}: stored layer is inconsistent: {err}") from err
    return packed


# --------------------------------------------------------------------------- whole models


@dataclass
class RuntimeModel:
    """A model on the sparse runtime, its tokenizer, and what was loaded."""

    model: nn.Module
    tokenizer: Any
    path: Path
    format: str  # "sparse" (the project's format) or "hf"
    sparse_layers: dict[str, float] = field(default_factory=dict)  # module name -> sparsity

    @property
    def name(self) -> str:
        return self.path.name if self.path.name != "sparse" else self.path.parent.name


def find_sparse_file(path: Path) -> Path | None:
    """The sparse-format file of ``path``: in it, or in its ``sparse/`` subfolder (the quantize stage's layout)."""
    for candidate in (path / SPARSE_FILE, path / "sparse" / SPARSE_FILE):
        if candidate.is_file():
            return candidate
    return None


def _generation_config(*folders: Path):
    """The first ``generation_config.json`` in ``folders``, or None."""
    from transformers import GenerationConfig

    for folder in folders:
        if (folder / "generation_config.json").is_file():
            try:
                return GenerationConfig.from_pretrained(folder, local_files_only=True)
            except Exception as err:
                raise ModelLoadError(f"cannot read {folder / 'generation_config.json'}: {err}") from err
    return None


def _meta_model(config_dir: Path) -> nn.Module:
    """The model of ``config_dir/config.json`` with its parameters on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read {config_dir / 'config.json'}: {type(err).__name__}: {err}") from err
    # Buffers (e.g. the rotary inv_freq) are computed for real: only parameters are empty.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def load_sparse_format(file: Path) -> tuple[nn.Module, dict[str, float]]:
    """The model stored in the project's sparse format, its sparse Linears as SparseLinear."""
    try:
        tensors, metadata = read_safetensors_mmap(file)
    except SafetensorsReadError as err:
        raise ModelLoadError(str(err)) from err
    check_sparse_header(file, metadata)
    model = _meta_model(file.parent)
    modules = dict(model.named_modules())
    sparse: dict[str, float] = {}
    for name, info in json.loads(metadata["layers"]).items():
        module_name = name.removesuffix(".weight")
        linear = modules.get(module_name)
        if not isinstance(linear, nn.Linear) or not name.endswith(".weight"):
            raise ModelLoadError(f"{file}: sparse weight {name!r} is not the weight of an nn.Linear of this model")
        if tuple(info["shape"]) != (linear.out_features, linear.in_features):
            raise ModelLoadError(
                f"{file}: {name} has shape {info['shape']}, the model's Linear is "
                f"{[linear.out_features, linear.in_features]}"
            )
        try:
            layer = SparseLayer(
                shape=tuple(info["shape"]),
                dtype=getattr(torch, info["dtype"]),
                encoding=info["encoding"],
                bitmask=tensors.pop(f"{name}.bitmask"),
                values=tensors.pop(f"{name}.values"),
                row_ptr=tensors.pop(f"{name}.row_ptr"),
                scales=tensors.pop(f"{name}.scales", None),
                group_size=info["group_size"],
                activation_bits=info["activation_bits"],
            )
        except KeyError as err:
            raise ModelLoadError(f"{file}: {name} is missing its tensor {err}") from err
        packed = packed_from_layer(name, layer)
        bias = tensors.pop(f"{module_name}.bias", None)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, SparseLinear(packed, bias))
        sparse[module_name] = packed.sparsity
    for alias, source in json.loads(metadata.get("tied", "{}")).items():
        tensors[alias] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ModelLoadError(f"{file}: tensors the model does not have: {sorted(unexpected)[:5]}")
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ModelLoadError(f"{file}: no stored tensor for {on_meta[:5]} (missing: {sorted(missing)[:5]})")
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in sparse:
        model.tie_weights()
    use_decode_attention(model)  # model.generate()'s decode steps on the kernel, as sparsify_model sets for HF folders
    return model.eval(), sparse


def load_runtime_model(path: str | os.PathLike, *, min_sparsity: float = 0.3) -> RuntimeModel:
    """Load ``path`` (a sparse-format folder, a folder with a ``sparse/`` one, or a HF folder) onto the runtime.

    ``min_sparsity`` applies to HF folders only: decoder Linears at least that sparse run on the
    kernels, in the model's dtype (bf16 or fp32; other float dtypes stay dense). The tokenizer is
    the folder's own, else (for ``<output>/sparse``) its parent's.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"cannot load {path}: not a directory (models load from local folders only)")
    file = find_sparse_file(path)
    if file is not None:
        model, sparse = load_sparse_format(file)
        tokenizer = load_tokenizer(file.parent, file.parent.parent)
        generation = _generation_config(file.parent, file.parent.parent)
        if generation is not None:  # e.g. Llama 3's list of EOS ids, which config.json may not hold
            model.generation_config = generation
        fmt = "sparse"
        root = file.parent
    else:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"cannot load {path}: no config.json and no {SPARSE_FILE}")
        model = load_model(path)
        tokenizer = load_tokenizer(path)
        dtype = next(model.parameters()).dtype
        sparse = {}
        if getattr(model.config, "quantization_config", None) is not None:
            # A compressed-tensors checkpoint: its Linears hold compressed weights and their own activation
            # quantization, which transformers' integration runs; packing them would drop that. The quantize
            # stage writes the same model in the project's sparse format (<output>/sparse) for the kernels.
            logger.warning(
                "%s: a compressed-tensors checkpoint runs through transformers (not on the sparse "
                "kernels); load the project's sparse format of it for the kernels",
                path,
            )
        elif dtype in (torch.bfloat16, torch.float32):
            sparse = sparsify_model(model, min_sparsity=min_sparsity, dtype=dtype)
        else:
            logger.warning("%s: %s weights stay dense (the kernels store bf16, fp32 or int8)", path, dtype)
        fmt, root = "hf", path
    logger.info("loaded %s (%s format): %d Linear layers on the sparse kernels", path, fmt, len(sparse))
    return RuntimeModel(model=model, tokenizer=tokenizer, path=root, format=fmt, sparse_layers=sparse)
