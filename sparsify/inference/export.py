"""Writing quantized and sparse models: compressed-tensors checkpoints and the project's sparse format.

compressed-tensors (what transformers and vLLM read)
----------------------------------------------------
:func:`save_compressed_tensors` writes a Hugging Face folder whose quantized Linears are
compressed by the compressed-tensors library itself — its ``int-quantized`` compressor for
W8A8 (int8 ``weight`` + ``weight_scale``) and ``pack-quantized`` otherwise (INT4 or
weight-only INT8: codes packed into int32 ``weight_packed`` + ``weight_shape`` +
``weight_scale``) — with the library's ``QuantizationConfig`` in config.json
(``quantization_config``, written by ``ModelCompressor.update_config``). The scheme is
symmetric, per channel (``strategy: channel``) or per group, with dynamic per-token INT8
input activations for W8A8 (``strategy: token, dynamic: true``); the Linears that were not
quantized (``lm_head``, ignored ones) are listed in ``ignore``.

Loading it back: ``AutoModelForCausalLM.from_pretrained(path)`` (transformers'
compressed-tensors integration) works on the CPU with the default options: the weights
load compressed and are decompressed (``codes · scale``, the same arithmetic as
:func:`sparsify.quant.quantization.dequantize`, hence bit-identical weights) on the first
forward; ``dequantize=True`` in a ``CompressedTensorsConfig`` decompresses at load time
instead. For W8A8 the loaded model fake-quantizes activations per token with
compressed-tensors' grid, which :func:`sparsify.quant.quantization.fake_quantize_per_token`
reproduces, so the loaded model's logits match the in-memory model's (fp32: to float
rounding).

Sparsity is not encoded in this format: compressed-tensors 0.20 removed its sparse
compressors (``sparse-bitmask``, ``sparse-24-bitmask``: only their config classes remain,
and ``ModelCompressor.update_config`` writes an empty ``sparsity_config``), so the zeros are
stored as zeros. The project's own format below carries the sparsity.

The project's sparse (+ quantized) format, for the CPU runtime
---------------------------------------------------------------
:func:`save_sparse_model` writes a folder with the model's ``config.json`` and
``sparse_model.safetensors``. Every masked or quantized 2-D weight ``W [out, in]`` named
``<name>`` (e.g. ``model.layers.0.mlp.up_proj.weight``) is stored as

* ``<name>.bitmask`` uint8 ``[out, ceil(in/8)]``: bit ``k`` (least significant first) of
  byte ``b`` of row ``r`` is set iff ``W[r, 8b + k]`` is nonzero (for quantized weights:
  its code). A subset of the mask: kept weights that are (or round to) zero are not stored.
* ``<name>.values``: the nonzero entries of each row in column order, rows concatenated —
  int8 codes for 8-bit weights; for 4-bit codes, uint8 with two codes per byte (first in
  the low nibble, two's complement), each row padded to whole bytes; for unquantized
  weights, their own dtype (bf16/fp32) — then 64 bytes of zeros, the padding the CPU kernels
  need, so the runtime uses the memory-mapped values in place (files written before it have
  no padding and are still read; readers go by ``row_ptr``).
* ``<name>.row_ptr`` int64 ``[out + 1]``: row r's values are ``values[row_ptr[r]:row_ptr[r+1]]``
  (bytes for INT4), so a kernel can start any row without a popcount scan.
* ``<name>.scales`` (quantized only) ``[out, groups]`` in the weight's dtype: per channel
  (groups = 1) or per group of ``group_size`` input columns; ``W = code · scale``.

Every other tensor of the state dict is stored as is; a tied tensor (``lm_head.weight``
sharing the embeddings) is stored once and listed under ``tied`` in the header. The header
metadata (``__metadata__``) holds ``format``, ``version`` and a JSON ``layers`` entry per
sparse weight: shape, dtype, encoding (``float``, ``int8`` or ``int4``), group size and
activation bits. :func:`sparse_model_writer` writes the same file one weight at a time, for
models too big to hold whole (e.g. a 7B model built layer by layer); :func:`save_sparse_model`
is a model's walk through it. :func:`load_sparse_tensors` decodes all of it back to a dense state dict
with exactly the model's weights; :func:`load_sparse_layers` gives the encoded layers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from sparsify.errors import MissingFileError, ModelLoadError
from sparsify.inference.kernels.format import PAD_BYTES
from sparsify.io import atomic_dir
from sparsify.quant.quantization import QuantScheme, dequantize, quant_state, quantized_linears
from sparsify.safetensors_io import SafetensorsWriter
from sparsify.sparsity.masks import check_masks

log = logging.getLogger(__name__)

SPARSE_FILE = "sparse_model.safetensors"
SPARSE_FORMAT = "sparsellama-sparse"
SPARSE_VERSION = "1"

Encoding = Literal["float", "int8", "int4"]


# --------------------------------------------------------------------------- shared checks


def _checked_quant_state(name: str, linear: nn.Linear) -> tuple[QuantScheme, Tensor, Tensor]:
    """A Linear's scheme, codes and scales, after checking its weight is still exactly ``codes · scales``.

    Catches a model changed after quantization (e.g. trained further), whose integers
    would no longer describe its weights.
    """
    state = quant_state(linear)
    expected = dequantize(state.codes, state.scales, state.scheme.group_size, linear.weight.dtype)
    if not torch.equal(expected, linear.weight.detach()):
        raise ValueError(f"{name}: the weight no longer equals its codes × scales (changed after quantizing?)")
    return state.scheme, state.codes, state.scales


# --------------------------------------------------------------------------- compressed-tensors


def _ct_scheme(scheme: QuantScheme) -> QuantizationScheme:
    """The compressed-tensors scheme of a :class:`QuantScheme` (symmetric ints, dynamic per-token inputs)."""
    weights = QuantizationArgs(
        num_bits=scheme.weight_bits,
        type=QuantizationType.INT,
        symmetric=True,
        dynamic=False,
        strategy=QuantizationStrategy.GROUP if scheme.group_size else QuantizationStrategy.CHANNEL,
        group_size=scheme.group_size,
    )
    inputs = None
    if scheme.activation_bits is not None:
        inputs = QuantizationArgs(
            num_bits=scheme.activation_bits,
            type=QuantizationType.INT,
            symmetric=True,
            dynamic=True,
            strategy=QuantizationStrategy.TOKEN,
        )
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def compression_format(scheme: QuantScheme) -> CompressionFormat:
    """``int-quantized`` for 8-bit weights with quantized activations (W8A8), else ``pack-quantized``."""
    if scheme.weight_bits == 8 and scheme.activation_bits is not None:
        return CompressionFormat.int_quantized
    return CompressionFormat.pack_quantized


def save_compressed_tensors(model: nn.Module, path: str | os.PathLike, *, tokenizer=None) -> None:
    """Write ``model`` (quantized by :func:`sparsify.sparsity.layerwise.quantize_model`) as a compressed-tensors folder.

    The folder is written atomically (a temporary sibling, then renamed); see the module
    docstring for the format and for loading it back. The model is not modified.
    """
    linears = quantized_linears(model)
    if not linears:
        raise ValueError("the model has no quantized Linear: run sparsify.sparsity.layerwise.quantize_model first")
    schemes = {quant_state(linear).scheme for linear in linears.values()}
    if len(schemes) > 1:
        raise ValueError(f"the quantized Linears use {len(schemes)} different schemes; one is supported: {schemes}")
    scheme = schemes.pop()
    ct_scheme = _ct_scheme(scheme)
    fmt = compression_format(scheme)
    compressor = BaseCompressor.get_value_from_registry(fmt.value)

    state = model.state_dict()
    for name, linear in linears.items():
        _, codes, scales = _checked_quant_state(name, linear)
        # The compressor recomputes the codes as round(weight / scale): hand it codes · scale in fp32, which is
        # exact, so the division gives the codes back even when the model (and the scales) are bf16.
        exact = dequantize(codes, scales.float(), scheme.group_size)
        compressed = compressor.compress({"weight": exact, "weight_scale": scales}, ct_scheme)
        del state[f"{name}.weight"]
        state |= {f"{name}.{key}": tensor.contiguous() for key, tensor in compressed.items()}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears]
    qconfig = QuantizationConfig(
        config_groups={"group_0": ct_scheme},
        format=fmt.value,
        ignore=ignore,
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("wrote %d %s Linears (%s) to %s", len(linears), fmt.value, scheme, path)


# --------------------------------------------------------------------------- bit and nibble packing


def pack_bitmask(mask: Tensor) -> Tensor:
    """bool ``[out, in]`` → uint8 ``[out, ceil(in/8)]``, column 8b+k in bit k of byte b."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(bits: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_bitmask`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).bool().reshape(bits.shape[0], -1)[:, :cols]


def _padded_positions(mask: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    """For each set entry of ``mask`` (row-major), its slot when rows are padded to ``multiple`` entries;
    and the padded row offsets ``[out + 1]``."""
    counts = mask.sum(1)
    padded = (counts + multiple - 1) // multiple * multiple
    offsets = torch.cat([padded.new_zeros(1), padded.cumsum(0)])
    within_row = mask.long().cumsum(1) - 1  # index of each kept entry within its row
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    return offsets[rows[mask]] + within_row[mask], offsets


def pack_int4_rows(codes: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The int4 ``codes`` at ``mask``'s entries, two per byte, each row padded to whole bytes.

    Returns (uint8 values, int64 byte row offsets ``[out + 1]``).
    """
    slots, offsets = _padded_positions(mask, 2)
    nibbles = torch.zeros(int(offsets[-1]), dtype=torch.uint8, device=codes.device)
    nibbles[slots] = (codes[mask] & 0xF).to(torch.uint8)  # two's complement low 4 bits
    return nibbles[0::2] | (nibbles[1::2] << 4), offsets // 2


def unpack_int4_rows(packed: Tensor, mask: Tensor) -> Tensor:
    """The int8 codes at ``mask``'s entries (row-major) from :func:`pack_int4_rows`' bytes."""
    return int4_row_codes(packed, mask.sum(1))


def int4_row_codes(packed: Tensor, counts: Tensor) -> Tensor:
    """The int8 codes of :func:`pack_int4_rows`' bytes, row-major, from each row's code count alone
    (no dense mask: what a loader has from a bitmask's popcounts)."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1).to(torch.int8)
    signed = (nibbles ^ 8) - 8  # sign-extend 4-bit two's complement
    counts = counts.long()
    byte_starts = torch.cat([counts.new_zeros(1), ((counts + 1) // 2).cumsum(0)[:-1]])  # rows padded to bytes
    code_starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return signed[2 * byte_starts[rows] + torch.arange(int(counts.sum())) - code_starts[rows]]


# --------------------------------------------------------------------------- the sparse format


class SparseLayer(NamedTuple):
    """One weight in the project's sparse format (see the module docstring)."""

    shape: tuple[int, int]
    dtype: torch.dtype  # of the dense weight
    encoding: Encoding
    bitmask: Tensor
    values: Tensor
    row_ptr: Tensor
    scales: Tensor | None = None
    group_size: int | None = None
    activation_bits: int | None = None

    def nonzero_mask(self) -> Tensor:
        return unpack_bitmask(self.bitmask, self.shape[1])

    def dense(self) -> Tensor:
        """The dense weight, exactly as the model held it."""
        nonzero = self.nonzero_mask()
        if self.encoding == "float":
            return torch.zeros(self.shape, dtype=self.dtype).masked_scatter_(nonzero, self.values)
        codes = self.values if self.encoding == "int8" else unpack_int4_rows(self.values, nonzero)
        dense_codes = torch.zeros(self.shape, dtype=torch.int8).masked_scatter_(nonzero, codes)
        return dequantize(dense_codes, self.scales, self.group_size, self.dtype)


def encode_sparse(weight: Tensor, quant: tuple[QuantScheme, Tensor, Tensor] | None = None) -> SparseLayer:
    """A 2-D weight in the sparse format: float values, or the codes of ``quant`` = (scheme, codes, scales)."""
    weight = weight.detach().cpu()
    if quant is None:
        nonzero = weight != 0
        values, encoding, scales, scheme = weight[nonzero], "float", None, None
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), nonzero.sum(1).cumsum(0)])
    else:
        scheme, codes, scales = quant
        codes, scales = codes.cpu(), scales.cpu()
        nonzero = codes != 0
        if scheme.weight_bits == 8:
            values, encoding = codes[nonzero], "int8"
            row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), nonzero.sum(1).cumsum(0)])
        else:
            (values, row_ptr), encoding = pack_int4_rows(codes, nonzero), "int4"
    return SparseLayer(
        shape=tuple(weight.shape),
        dtype=weight.dtype,
        encoding=encoding,
        bitmask=pack_bitmask(nonzero),
        values=values,
        row_ptr=row_ptr,
        scales=scales,
        group_size=None if scheme is None else scheme.group_size,
        activation_bits=None if scheme is None else scheme.activation_bits,
    )


class SparseModelWriter:
    """Collects the project's sparse format one weight at a time (see :func:`sparse_model_writer`)."""

    def __init__(self, tensors: SafetensorsWriter, folder: Path):
        self._tensors = tensors
        self.folder = folder  # the temporary folder, for other files that belong to the model (a tokenizer)
        self.layers: dict[str, dict] = {}
        self.tied: dict[str, str] = {}

    def add_layer(self, name: str, layer: SparseLayer) -> None:
        """Store the encoded weight ``name`` (e.g. ``model.layers.0.mlp.up_proj.weight``)."""
        # Wide dtypes first: every tensor of a Llama-shaped layer then starts aligned to its element size
        # (bitmask rows are whole 8-byte words), so the memory-mapped loader can use it in place.
        self._tensors.add(f"{name}.row_ptr", layer.row_ptr)
        if layer.scales is not None:
            self._tensors.add(f"{name}.scales", layer.scales)
        self._tensors.add(f"{name}.bitmask", layer.bitmask)
        # The values are followed by the kernels' 64 bytes of zeros (vector loads may read past the last row),
        # so the runtime can use them in place from a memory map instead of copying GBs at load time.
        pad = torch.zeros(PAD_BYTES // layer.values.element_size(), dtype=layer.values.dtype)
        self._tensors.add(f"{name}.values", torch.cat([layer.values.reshape(-1), pad]))
        self.layers[name] = {
            "shape": list(layer.shape),
            "dtype": str(layer.dtype).removeprefix("torch."),
            "encoding": layer.encoding,
            "group_size": layer.group_size,
            "activation_bits": layer.activation_bits,
        }

    def add_tensor(self, name: str, tensor: Tensor) -> None:
        """Store a tensor as is (embeddings, norms, a dense ``lm_head``)."""
        self._tensors.add(name, tensor)

    def tie(self, alias: str, source: str) -> None:
        """Record that ``alias`` is the stored tensor ``source`` (tied embeddings), stored once."""
        self.tied[alias] = source

    def metadata(self) -> dict[str, str]:
        return {
            "format": SPARSE_FORMAT,
            "version": SPARSE_VERSION,
            "layers": json.dumps(self.layers),
            "tied": json.dumps(self.tied),
        }


@contextmanager
def sparse_model_writer(path: str | os.PathLike, config=None) -> Iterator[SparseModelWriter]:
    """Write a model in the sparse format to the folder ``path``, weight by weight, atomically.

    Each weight goes to disk as it is added, so a model need never be in memory whole (a 7B model
    can be built, pruned and stored one Linear at a time). ``config`` (a transformers config) is
    saved beside it. On an error nothing is left at ``path`` (an existing folder stays as it was).
    """
    with atomic_dir(path) as tmp, SafetensorsWriter(tmp / SPARSE_FILE) as tensors:
        writer = SparseModelWriter(tensors, tmp)
        yield writer
        tensors.finish(writer.metadata())
        if config is not None:
            config.save_pretrained(tmp)


def save_sparse_model(model: nn.Module, masks: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write ``model`` in the project's sparse (+ quantized) format to the folder ``path``.

    The weights named by ``masks`` and every quantized Linear's weight are encoded sparse;
    ``masks`` must match the model (names, shapes, zeros where they prune: ValueError
    otherwise). The folder is written atomically.
    """
    check_masks(model, masks)
    modules = dict(model.named_modules())
    quantized = {f"{name}.weight": linear for name, linear in quantized_linears(model).items()}
    params = dict(model.named_parameters())
    sparse_names = [n for n in params if n in masks or n in quantized]  # module order
    for name in sparse_names:
        if params[name].ndim != 2:
            raise ValueError(f"mask {name!r}: the sparse format stores 2-D weights, this one is {params[name].ndim}-D")

    with sparse_model_writer(path, getattr(model, "config", None)) as writer:
        for name in sparse_names:
            linear = modules[name.removesuffix(".weight")]
            writer.add_layer(
                name, encode_sparse(params[name], _checked_quant_state(name, linear) if name in quantized else None)
            )
        stored: dict[tuple, str] = {}
        for name, tensor in model.state_dict().items():
            if name in writer.layers:
                continue
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if key in stored:  # tied weights share storage: store once
                writer.tie(name, stored[key])
                continue
            stored[key] = name
            writer.add_tensor(name, tensor)
    nnz = sum(int(torch.count_nonzero(params[n])) for n in sparse_names)
    total = sum(params[n].numel() for n in sparse_names)
    log.info("wrote %d sparse weights (%.1f%% nonzero) to %s", len(sparse_names), 100 * nnz / max(total, 1), path)


def _read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    file = Path(path) / SPARSE_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise MissingFileError(f"no {SPARSE_FILE} in {path}")
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except SafetensorError as err:
        raise ModelLoadError(f"{file} is corrupt or not a safetensors file: {err}") from err
    check_sparse_header(file, metadata)
    return tensors, metadata


def check_sparse_header(file: Path, metadata: dict[str, str]) -> None:
    """ModelLoadError unless ``file``'s safetensors metadata says it is this format, in a version this code reads."""
    if metadata.get("format") != SPARSE_FORMAT:
        raise ModelLoadError(f"{file} is not in the {SPARSE_FORMAT} format (format={metadata.get('format')!r})")
    if metadata.get("version") != SPARSE_VERSION:
        raise ModelLoadError(f"{file}: unsupported {SPARSE_FORMAT} version {metadata.get('version')!r}")


def load_sparse_layers(path: str | os.PathLike) -> tuple[dict[str, SparseLayer], dict[str, Tensor]]:
    """The encoded sparse weights by name, and every other tensor (tied names included) by name."""
    tensors, metadata = _read(path)
    layers: dict[str, SparseLayer] = {}
    for name, info in json.loads(metadata["layers"]).items():
        row_ptr = tensors.pop(f"{name}.row_ptr")
        layers[name] = SparseLayer(
            shape=tuple(info["shape"]),
            dtype=getattr(torch, info["dtype"]),
            encoding=info["encoding"],
            bitmask=tensors.pop(f"{name}.bitmask"),
            values=tensors.pop(f"{name}.values")[: int(row_ptr[-1])],  # without the kernels' padding
            row_ptr=row_ptr,
            scales=tensors.pop(f"{name}.scales", None),
            group_size=info["group_size"],
            activation_bits=info["activation_bits"],
        )
    for alias, source in json.loads(metadata["tied"]).items():
        tensors[alias] = tensors[source]
    return layers, tensors


def load_sparse_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The dense state dict stored by :func:`save_sparse_model` (identical to the model's weights)."""
    layers, tensors = load_sparse_layers(path)
    return tensors | {name: layer.dense() for name, layer in layers.items()}
