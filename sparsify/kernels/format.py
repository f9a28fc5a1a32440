"""The compressed weight format the sparse CPU kernels read: per-row bitmask + packed values.

A weight ``W [out, in]`` with a keep-mask (``True`` = stored, as in :mod:`sparsify.masks`) becomes

* ``bitmask`` — uint8 ``[out, 8 * ceil(in / 64)]``: each row padded to whole 64-bit words;
  column ``j`` is bit ``j % 8`` of byte ``j // 8`` (the bit order of
  :func:`sparsify.export.pack_bitmask`, which does not pad rows). Padding bits are 0.
* ``offsets`` — int64 ``[out + 1]``: row ``r``'s values are ``values[offsets[r]:offsets[r+1]]``.
* ``values`` — 1-D, the kept entries in row-major order, as bf16, fp32 or int8 codes, followed
  by 64 bytes of zeros: the kernels load 64-byte vectors and may read past the last row.
* ``scales`` — fp32 ``[out]`` (int8 only): ``W ≈ codes · scales[:, None]``, symmetric, no zero point.
* ``row_sums`` — int32 ``[out]`` (int8 only): the sum of each row's codes, which the W8A8 kernel
  needs to undo the +128 offset of its unsigned activations.

Bytes per weight at sparsity s: 1/8 (mask) + (1 − s) · bytes per value — 0.725 for 70% bf16,
0.425 for 70% int8 (dense bf16: 2, fp32: 4). A kept weight may be zero (an int8 weight that
rounds to code 0 stays kept), so the mask, not the values, says what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

VALUE_DTYPES = (torch.bfloat16, torch.float32, torch.int8)
PAD_BYTES = 64  # vector over-read allowance after the last value
INT8_QMAX = 127  # symmetric grid: codes in [-127, 127], as sparsify.quantization uses for weights


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A compressed ``[out, in]`` weight (see the module docstring for the layout)."""

    shape: tuple[int, int]
    bitmask: Tensor
    offsets: Tensor
    values: Tensor
    scales: Tensor | None = None
    row_sums: Tensor | None = None
    # int8 only: quantize activations per token to int8 (W8A8, VNNI) or keep them float (W8A16).
    act_int8: bool = True

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the values: bfloat16, float32 or int8."""
        return self.values.dtype

    @property
    def nnz(self) -> int:
        """Stored entries (the mask's kept count)."""
        return int(self.offsets[-1])

    @property
    def sparsity(self) -> float:
        numel = self.shape[0] * self.shape[1]
        return 1.0 - self.nnz / numel if numel else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes a kernel call streams: mask + stored values + offsets (+ scales, row sums)."""
        n = self.bitmask.numel() + self.nnz * self.values.element_size() + self.offsets.numel() * 8
        if self.scales is not None:
            n += self.scales.numel() * 4
        if self.row_sums is not None:
            n += self.row_sums.numel() * 4
        return n

    def mask(self) -> Tensor:
        """The bool keep-mask ``[out, in]``."""
        bits = np.unpackbits(self.bitmask.numpy(), axis=1, count=self.shape[1], bitorder="little")
        return torch.from_numpy(bits).bool()

    def validate(self) -> None:
        """Raise ValueError if the tensors are inconsistent (a kernel would read out of bounds)."""
        out, cols = self.shape
        words = -(-cols // 64)
        if self.values.dtype not in VALUE_DTYPES or self.values.dim() != 1:
            raise ValueError(f"values must be 1-D {', '.join(map(str, VALUE_DTYPES))}, got {self.values.dtype}")
        if self.bitmask.dtype != torch.uint8 or tuple(self.bitmask.shape) != (out, 8 * words):
            raise ValueError(f"bitmask must be uint8 {(out, 8 * words)}, got {self.bitmask.dtype} "
                             f"{tuple(self.bitmask.shape)}")
        if self.offsets.dtype != torch.int64 or tuple(self.offsets.shape) != (out + 1,):
            raise ValueError(f"offsets must be int64 [{out + 1}], got {self.offsets.dtype} {tuple(self.offsets.shape)}")
        for name in ("bitmask", "offsets", "values", "scales", "row_sums"):
            t = getattr(self, name)
            if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous CPU tensor")
        counts = _popcount_rows(self.bitmask)
        expected = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        if not torch.equal(self.offsets, expected):
            raise ValueError("offsets do not match the bitmask's per-row counts")
        pad = PAD_BYTES // self.values.element_size()
        if self.values.numel() < self.nnz + pad:
            raise ValueError(f"values must hold {self.nnz} entries + {pad} padding, got {self.values.numel()}")
        if int(counts.sum()) != int(self.mask().sum()):
            raise ValueError("bitmask has bits set past in_features")
        if self.values.dtype == torch.int8:
            if self.scales is None or self.scales.dtype != torch.float32 or tuple(self.scales.shape) != (out,):
                raise ValueError(f"int8 values need float32 scales [{out}]")
            if self.row_sums is None or self.row_sums.dtype != torch.int32 or tuple(self.row_sums.shape) != (out,):
                raise ValueError(f"int8 values need int32 row_sums [{out}]")
            if not torch.equal(self.row_sums, _row_sums(self.values[: self.nnz], self.offsets)):
                raise ValueError("row_sums do not match the codes")
        elif self.scales is not None or self.row_sums is not None:
            raise ValueError("scales/row_sums belong to int8 values only")



_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_rows(bitmask: Tensor) -> Tensor:
    """Set bits per row of a uint8 bitmask, int64."""
    bits = bitmask.numpy()
    counts = np.bitwise_count(bits) if hasattr(np, "bitwise_count") else _POPCOUNT8[bits]  # numpy >= 2.0
    return torch.from_numpy(counts.sum(1, dtype=np.int64))


def _row_sums(codes: Tensor, offsets: Tensor) -> Tensor:
    rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    return torch.zeros(offsets.numel() - 1, dtype=torch.int64).index_add_(0, rows, codes.long()).int()


def _pack_bits(mask: Tensor) -> Tensor:
    """bool [out, in] → uint8 [out, 8 * ceil(in / 64)], column j in bit j % 8 of byte j // 8."""
    out, cols = mask.shape
    packed = np.packbits(mask.contiguous().numpy(), axis=1, bitorder="little")  # [out, ceil(in / 8)]
    bitmask = torch.zeros(out, 8 * -(-cols // 64), dtype=torch.uint8)
    bitmask[:, : packed.shape[1]] = torch.from_numpy(packed)
    return bitmask


def quantize_rows(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel INT8 round-to-nearest: (codes int8, scales fp32 [out]).

    ``scale = max|w| / 127`` over the kept weights (1 for an empty row), so nothing clips and
    pruned weights stay exactly 0 — the grid of :func:`sparsify.quantization.weight_scales`.
    """
    w = weight.float().masked_fill(~mask, 0)
    scales = w.abs().amax(1) / INT8_QMAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(w / scales[:, None]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return codes, scales


def pack(
    weight: Tensor,
    mask: Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    scales: Tensor | None = None,
    act_int8: bool = True,
) -> PackedWeight:
    """Compress a 2-D weight ``[out, in]``.

    ``mask`` (bool, True = kept) defaults to ``weight != 0``; entries it prunes must be exactly 0
    (ValueError otherwise: dropping them would change the layer). ``dtype`` is the storage:

    * ``torch.bfloat16`` / ``torch.float32`` — values rounded to that dtype (exact when the
      weight already has it);
    * ``torch.int8`` — a float weight is quantized per output channel (:func:`quantize_rows`);
      an int8 weight is taken as the codes and needs ``scales`` (``[out]`` or ``[out, 1]``).
      ``act_int8`` selects W8A8 (activations quantized per token at run time, VNNI) or W8A16.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out, in], got {getattr(weight, 'shape', type(weight))}")
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"dtype must be one of {VALUE_DTYPES}, got {dtype}")
    weight = weight.detach().cpu()
    is_codes = weight.dtype == torch.int8
    if not (weight.is_floating_point() or is_codes):
        raise ValueError(f"weight must be floating point (or int8 codes), got {weight.dtype}")
    if is_codes and dtype != torch.int8:
        raise ValueError("int8 codes can only be packed with dtype=torch.int8")
    if is_codes != (scales is not None):
        raise ValueError("scales go with (and only with) an int8 codes weight")
    if mask is None:
        mask = weight != 0
    else:
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must be bool {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.detach().cpu()
        if bool(((weight != 0) & ~mask).any()):
            raise ValueError("weight has nonzero entries where the mask prunes them")
    out = weight.shape[0]
    row_sums = None
    if dtype == torch.int8:
        if is_codes:
            scales = scales.detach().cpu().float().reshape(-1)
            if scales.numel() != out:
                raise ValueError(f"scales must have one entry per output channel ({out}), got {scales.numel()}")
            if bool((weight == -128).any()):
                raise ValueError("int8 codes must lie in [-127, 127] (symmetric grid)")
            codes = weight
        else:
            codes, scales = quantize_rows(weight, mask)
        kept = codes[mask]
        row_sums = codes.sum(1, dtype=torch.int32)  # codes are 0 where pruned
        scales = scales.contiguous()
    else:
        kept = weight[mask].to(dtype)
    bitmask = _pack_bits(mask)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), _popcount_rows(bitmask).cumsum(0)])
    pad = PAD_BYTES // kept.element_size()
    values = torch.cat([kept, torch.zeros(pad, dtype=kept.dtype)])
    return PackedWeight(tuple(weight.shape), bitmask, offsets, values, scales, row_sums, act_int8)


def unpack(packed: PackedWeight) -> Tensor:
    """The dense weight in the storage dtype (int8: the codes; see :func:`dequantize`). Exact."""
    dense = torch.zeros(packed.shape, dtype=packed.dtype)
    return dense.masked_scatter_(packed.mask(), packed.values[: packed.nnz])


def dequantize(packed: PackedWeight) -> Tensor:
    """The dense weight as fp32: values as stored, int8 codes times their row scales."""
    dense = unpack(packed).float()
    return dense * packed.scales[:, None] if packed.dtype == torch.int8 else dense
