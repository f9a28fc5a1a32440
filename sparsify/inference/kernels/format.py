"""The compressed weight format the sparse CPU kernels read: per-row bitmask + packed values.

A weight ``W [out, in]`` with a keep-mask (``True`` = stored, as in :mod:`sparsify.sparsity.masks`) becomes

* ``bitmask`` — uint8 ``[out, 8 * ceil(in / 64)]``: each row padded to whole 64-bit words;
  column ``j`` is bit ``j % 8`` of byte ``j // 8`` (the bit order of
  :func:`sparsify.inference.export.pack_bitmask`, which does not pad rows). Padding bits are 0.
* ``offsets`` — int64 ``[out + 1]``: row ``r``'s values are ``values[offsets[r]:offsets[r+1]]``.
* ``values`` — 1-D, the kept entries in row-major order, as bf16, fp32 or int8 codes, followed
  by 64 bytes of zeros: the kernels load 64-byte vectors and may read past the last row.
* ``scales`` — fp32 ``[out]`` (int8 only): ``W ≈ codes · scales[:, None]``, symmetric, no zero point.
* ``row_sums`` — int32 ``[out]`` (int8 only): the sum of each row's codes, which the W8A8 kernel
  needs to undo the +128 offset of its unsigned activations.

INT4 (``dtype=torch.int4``; values are uint8 bytes): symmetric 4-bit codes c in [−7, 7] with one
fp32 scale per row and group of ``group_size`` input columns (``scales`` ``[out, groups]``;
``group_size=None``: one group per row), ``W ≈ c · scale``. The codes of each 64-column mask word
with p set bits fill ceil(p / 2) bytes of their own — code k of the word in the low (k even) or
high (k odd) nibble of byte k // 2 — so every word starts on a byte and a kernel can unpack it
with whole-vector loads; the nibble holds c + 8 (offset binary, 1..15), so the kernels widen it
with a mask and no sign extension. ``offsets`` count bytes. Group sizes are multiples of 64 (whole
mask words per group), the quantize stage's 128 included.

Optionally, for W8A8 and W4A8 (``act_int8``), a *gather index* (``columns``, built by
:func:`with_gather_index`, never stored on disk): uint8, for each row and each of its mask words in
order, a header byte p (the word's set bits) followed by the p in-word column positions (0..63) of
its stored codes (int4: and one byte of padding after an odd p, as its nibbles have), then 64 bytes
of zeros; so row r starts at ``offsets[r] + r · words`` (int4: ``2 · offsets[r] + r · words``). The
AVX2 kernels (below 8 rows of x) read it instead of the bitmask and gather x at those columns (AVX2 has no
VPEXPAND): a byte per stored code instead of 1/8 per column, and fewer instructions per column (see
sparse_gemv_avx2.cpp).

Bytes per weight at sparsity s: 1/8 (mask) + (1 − s) · bytes per value — 0.725 for 70% bf16,
0.425 for 70% int8, ~0.28 for 70% int4 with groups of 128 (dense bf16: 2, fp32: 4). A kept weight
may be zero (an int8 weight that rounds to code 0 stays kept), so the mask, not the values, says
what is stored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sparsify.inference.kernels.loader import load_extension
from sparsify.quant.grids import quantize_codes, weight_scales

VALUE_DTYPES = (torch.bfloat16, torch.float32, torch.int8, torch.int4)
PAD_BYTES = 64  # vector over-read allowance after the last value
INT8_QMAX = 127  # symmetric grid: codes in [-127, 127], as sparsify.quant.quantization uses for weights
INT4_QMAX = 7
INT4_OFFSET = 8  # nibble = code + 8
WORD = 64  # columns per mask word


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A compressed ``[out, in]`` weight (see the module docstring for the layout)."""

    shape: tuple[int, int]
    bitmask: Tensor
    offsets: Tensor
    values: Tensor
    scales: Tensor | None = None
    row_sums: Tensor | None = None
    # int8/int4: quantize activations per token to int8 (W8A8, W4A8) or keep them float (W8A16, W4A16).
    act_int8: bool = True
    # int4 only: input columns per scale (a multiple of 64); None: one scale per row.
    group_size: int | None = None
    # W8A8 and W4A8, optional: the gather index (module docstring); derived from the bitmask.
    columns: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        """What the values hold: bfloat16, float32, int8 or int4 (int4 codes live in uint8 bytes)."""
        return torch.int4 if self.values.dtype == torch.uint8 else self.values.dtype

    @property
    def nnz(self) -> int:
        """Stored entries (the mask's kept count)."""
        return int(popcount_rows(self.bitmask).sum()) if self.dtype == torch.int4 else int(self.offsets[-1])

    @property
    def group_words(self) -> int:
        """Mask words per scale group (int4): the kernels fold a group's sum into the row every this many words."""
        words = self.bitmask.shape[1] // 8
        return words if self.group_size is None else self.group_size // WORD

    @property
    def sparsity(self) -> float:
        numel = self.shape[0] * self.shape[1]
        return 1.0 - self.nnz / numel if numel else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes a kernel call streams: mask + stored values + offsets (+ scales, row sums). A gather index
        (``columns``) is held on top, and read instead of the mask by the AVX2 kernels below 8 rows of x."""
        stored = int(self.offsets[-1]) if self.dtype == torch.int4 else self.nnz * self.values.element_size()
        n = self.bitmask.numel() + stored + self.offsets.numel() * 8
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
        if self.dtype not in VALUE_DTYPES or self.values.dim() != 1:
            raise ValueError(
                f"values must be 1-D {', '.join(map(str, VALUE_DTYPES))} (int4: uint8 bytes), got {self.values.dtype}"
            )
        if self.bitmask.dtype != torch.uint8 or tuple(self.bitmask.shape) != (out, 8 * words):
            raise ValueError(
                f"bitmask must be uint8 {(out, 8 * words)}, got {self.bitmask.dtype} {tuple(self.bitmask.shape)}"
            )
        if self.offsets.dtype != torch.int64 or tuple(self.offsets.shape) != (out + 1,):
            raise ValueError(f"offsets must be int64 [{out + 1}], got {self.offsets.dtype} {tuple(self.offsets.shape)}")
        for name in ("bitmask", "offsets", "values", "scales", "row_sums"):
            t = getattr(self, name)
            if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous CPU tensor")
        counts = _int4_row_bytes(self.bitmask) if self.dtype == torch.int4 else popcount_rows(self.bitmask)
        expected = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        if not torch.equal(self.offsets, expected):
            raise ValueError("offsets do not match the bitmask's per-row counts")
        pad = PAD_BYTES // self.values.element_size()
        stored = int(self.offsets[-1])
        if self.values.numel() < stored + pad:
            raise ValueError(f"values must hold {stored} entries + {pad} padding, got {self.values.numel()}")
        tail = cols % WORD
        if tail and out:  # only a row's last word has bit positions past in_features
            last = self.bitmask.view(out, words, 8)[:, -1, :].contiguous().numpy()
            if np.unpackbits(last, axis=1, bitorder="little")[:, tail:].any():
                raise ValueError("bitmask has bits set past in_features")
        if self.dtype == torch.int4:
            self._validate_int4()
        elif self.values.dtype == torch.int8:
            if self.scales is None or self.scales.dtype != torch.float32 or tuple(self.scales.shape) != (out,):
                raise ValueError(f"int8 values need float32 scales [{out}]")
            if self.row_sums is None or self.row_sums.dtype != torch.int32 or tuple(self.row_sums.shape) != (out,):
                raise ValueError(f"int8 values need int32 row_sums [{out}]")
            if not torch.equal(self.row_sums, row_sums(self.values, self.offsets)):
                raise ValueError("row_sums do not match the codes")
        elif self.scales is not None or self.row_sums is not None:
            raise ValueError("scales/row_sums belong to int8 values only")
        if self.group_size is not None and self.dtype != torch.int4:
            raise ValueError("group_size belongs to int4 values only")
        if self.columns is not None:
            if self.dtype not in (torch.int8, torch.int4) or not self.act_int8:
                raise ValueError("columns (the gather index) belongs to W8A8 and W4A8 values only")
            if self.columns.dtype != torch.uint8 or self.columns.dim() != 1:
                raise ValueError(f"columns must be 1-D uint8, got {self.columns.dtype} {tuple(self.columns.shape)}")
            if not torch.equal(self.columns, gather_index(self.bitmask, pad_odd=self.dtype == torch.int4)):
                raise ValueError("columns do not match the bitmask (see gather_index)")

    def _validate_int4(self) -> None:
        out, cols = self.shape
        g = self.group_size
        if g is not None and (g <= 0 or g % WORD or cols % g):
            raise ValueError(
                f"int4 group_size must be a positive multiple of {WORD} that divides in_features={cols}, got {g}"
            )
        groups = 1 if g is None else cols // g
        if self.scales is None or self.scales.dtype != torch.float32 or tuple(self.scales.shape) != (out, groups):
            raise ValueError(
                f"int4 values need float32 scales [{out}, {groups}], got "
                f"{None if self.scales is None else (self.scales.dtype, tuple(self.scales.shape))}"
            )
        if self.row_sums is not None:
            raise ValueError("int4 values take no row_sums")
        if _int4_off_grid(self.values, self.bitmask):
            raise ValueError(f"int4 codes must lie in [-{INT4_QMAX}, {INT4_QMAX}] (nibbles 1..15)")


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount_rows(bitmask: Tensor) -> Tensor:
    """Set bits per row of a uint8 bitmask (any row width), int64 ``[out]``."""
    bits = bitmask.numpy()
    counts = np.bitwise_count(bits) if hasattr(np, "bitwise_count") else _POPCOUNT8[bits]  # numpy >= 2.0
    return torch.from_numpy(counts.sum(1, dtype=np.int64))


def _word_counts(bitmask: Tensor) -> np.ndarray:
    """Set bits per 64-bit mask word, int64 ``[out, words]``."""
    words = bitmask.numpy().view("<u8")
    counts = (
        np.bitwise_count(words)
        if hasattr(np, "bitwise_count")
        else _POPCOUNT8[bitmask.numpy()].reshape(words.shape[0], words.shape[1], 8).sum(-1)
    )
    return counts.astype(np.int64)


def gather_index(bitmask: Tensor, pad_odd: bool = False) -> Tensor:
    """The gather index of a bitmask (module docstring): per row and word, the count p then the p in-word
    columns of the set bits, in storage order (``pad_odd``, for int4: a zero byte after an odd p); 64 bytes
    of zeros at the end for vector over-reads.

    Built by the compiled kernels' binding, whose AVX2 path is its only reader: the runtime builds it at
    load time for every AVX2 W8A8/W4A8 layer, ~0.02 s per 11008x4096 layer in C++ against ~0.5 s in numpy.
    """
    extension = load_extension()
    if extension is None:
        raise RuntimeError("the gather index is built by the compiled kernels, which are not available here")
    return extension.gather_index(bitmask.contiguous(), pad_odd)


def with_gather_index(packed: PackedWeight) -> PackedWeight:
    """``packed`` (W8A8 or W4A8) with its gather index, for the AVX2 kernels."""
    if packed.dtype not in (torch.int8, torch.int4) or not packed.act_int8:
        raise ValueError("the gather index serves W8A8 and W4A8 weights only")
    return dataclasses.replace(packed, columns=gather_index(packed.bitmask, pad_odd=packed.dtype == torch.int4))


def _int4_row_bytes(bitmask: Tensor) -> Tensor:
    """Bytes of int4 codes per row: ceil(p / 2) for each mask word with p set bits."""
    return torch.from_numpy(((_word_counts(bitmask) + 1) // 2).sum(1))


def _odd_word_ends(counts: np.ndarray) -> np.ndarray:
    """Where the padding nibbles go in the row-major stream of kept entries, given the per-word counts in
    row-major order: after the last entry of each word with an odd count (``np.insert`` positions, in
    kept entries before them)."""
    return np.cumsum(counts)[counts % 2 == 1]


def _int4_off_grid(values: Tensor, bitmask: Tensor) -> bool:
    """Whether a stored int4 code lies below −INT4_QMAX (nibble 0: code −8), off the symmetric grid; the
    top of the grid is the top of a nibble.

    Per byte, not per kept entry (validate() runs on every layer a model loads: ~10x faster than
    locating each entry's nibble): every low nibble is a code, every high nibble too except the
    padding nibble of a word with an odd count, the high nibble of its last byte."""
    counts = _word_counts(bitmask).reshape(-1)
    ends = np.cumsum((counts + 1) // 2)  # one past each word's last byte
    data = values.numpy()[: int(ends[-1]) if ends.size else 0]
    low = INT4_OFFSET - INT4_QMAX  # the smallest nibble on the grid
    high_off = (data >> 4) < low
    high_off[ends[counts % 2 == 1] - 1] = False  # padding
    return bool(((data & 0xF) < low).any() or high_off.any())


def _int4_nibbles(values: Tensor, bitmask: Tensor) -> Tensor:
    """The stored nibbles (code + 8) of every kept entry, row-major, int16."""
    counts = _word_counts(bitmask).reshape(-1)
    pads = _odd_word_ends(counts)
    data = values.numpy()[: (int(counts.sum()) + pads.size) // 2]
    stream = np.empty(2 * data.size, dtype=np.int16)  # every nibble in storage order, padding included
    stream[0::2], stream[1::2] = data & 0xF, data >> 4
    return torch.from_numpy(np.delete(stream, pads + np.arange(pads.size)))  # each pad sits after the ones before


def _pack_int4(kept_codes: Tensor, bitmask: Tensor) -> Tensor:
    """Kept codes (row-major, int8 in [-7, 7]) → the int4 bytes (without padding)."""
    pads = _odd_word_ends(_word_counts(bitmask).reshape(-1))
    nibbles = np.insert(kept_codes.numpy().astype(np.uint8) + INT4_OFFSET, pads, 0)
    return torch.from_numpy(nibbles[0::2] | (nibbles[1::2] << 4))


def quantize_groups(weight: Tensor, mask: Tensor, group_size: int | None) -> tuple[Tensor, Tensor]:
    """Symmetric INT4 round-to-nearest per row and group: (codes int8 in [-7, 7], fp32 scales [out, groups]).

    The grid of :mod:`sparsify.quant.quantization` (``scale = max|w| / 7`` over the kept weights of the group,
    1 for an empty group), so pruned weights stay exactly 0.
    """
    from sparsify.quant.quantization import quantize_codes, weight_scales  # one INT4 grid for the project

    w = weight.float().masked_fill(~mask, 0)
    scales = weight_scales(w, 4, group_size, keep=mask, dtype=torch.float32)
    return quantize_codes(w, scales, 4, group_size), scales


def row_sums(codes: Tensor, offsets: Tensor) -> Tensor:
    """int32 sum of each row's int8 codes (``codes[offsets[r]:offsets[r+1]]``): the W8A8 kernels' zero-point
    correction. One pass over the codes (a segmented sum), no per-entry row index."""
    out = offsets.numel() - 1
    starts = offsets[:-1].numpy()
    nonempty = offsets[1:].numpy() > starts
    sums = np.zeros(out, dtype=np.int64)
    if nonempty.any():
        sums[nonempty] = np.add.reduceat(codes[: int(offsets[-1])].numpy(), starts[nonempty], dtype=np.int64)
    return torch.from_numpy(sums).int()


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
    pruned weights stay exactly 0 — the grid of :func:`sparsify.quant.quantization.weight_scales`.
    """
    w = weight.float().masked_fill(~mask, 0)
    scales = weight_scales(w, 8, None)
    return quantize_codes(w, scales, 8, None), scales[:, 0]


def pack(
    weight: Tensor,
    mask: Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    scales: Tensor | None = None,
    act_int8: bool = True,
    group_size: int | None = None,
) -> PackedWeight:
    """Compress a 2-D weight ``[out, in]``.

    ``mask`` (bool, True = kept) defaults to ``weight != 0``; entries it prunes must be exactly 0
    (ValueError otherwise: dropping them would change the layer). ``dtype`` is the storage:

    * ``torch.bfloat16`` / ``torch.float32`` — values rounded to that dtype (exact when the
      weight already has it);
    * ``torch.int8`` — a float weight is quantized per output channel (:func:`quantize_rows`);
      an int8 weight is taken as the codes and needs ``scales`` (``[out]`` or ``[out, 1]``).
      ``act_int8`` selects W8A8 (activations quantized per token at run time, VNNI) or W8A16.
    * ``torch.int4`` — the same for 4-bit codes with one scale per row and ``group_size`` columns
      (None: per row): a float weight is quantized (:func:`quantize_groups`); int8 codes in [-7, 7]
      need ``scales`` ``[out, groups]``. ``act_int8``: W4A8 or W4A16.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out, in], got {getattr(weight, 'shape', type(weight))}")
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"dtype must be one of {VALUE_DTYPES}, got {dtype}")
    weight = weight.detach().cpu()
    is_codes = weight.dtype == torch.int8
    if not (weight.is_floating_point() or is_codes):
        raise ValueError(f"weight must be floating point (or int8 codes), got {weight.dtype}")
    if is_codes and dtype not in (torch.int8, torch.int4):
        raise ValueError("int8 codes can only be packed with dtype=torch.int8 or torch.int4")
    if group_size is not None and dtype != torch.int4:
        raise ValueError("group_size applies to dtype=torch.int4 only")
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
    if dtype == torch.int4:
        return _pack_int4_weight(weight, mask, scales, act_int8, group_size)
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
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), popcount_rows(bitmask).cumsum(0)])
    pad = PAD_BYTES // kept.element_size()
    values = torch.cat([kept, torch.zeros(pad, dtype=kept.dtype)])
    return PackedWeight(tuple(weight.shape), bitmask, offsets, values, scales, row_sums, act_int8)


def pack_int4_kept(
    shape: tuple[int, int],
    bitmask: Tensor,
    kept_codes: Tensor,
    scales: Tensor,
    group_size: int | None,
    act_int8: bool,
) -> PackedWeight:
    """An INT4 PackedWeight from its kernel bitmask (``[out, 8·words]``), the codes of its set bits in
    row-major order (int8 in [-7, 7]) and fp32 scales ``[out, groups]``: never a dense weight (what
    :func:`pack` and a loader of a stored sparse model both build on). Call ``validate()`` on
    tensors from outside."""
    if kept_codes.dtype != torch.int8 or kept_codes.dim() != 1:
        raise ValueError(f"kept_codes must be 1-D int8, got {kept_codes.dtype} {tuple(kept_codes.shape)}")
    if bool((kept_codes.abs() > INT4_QMAX).any()):
        raise ValueError(f"int4 codes must lie in [-{INT4_QMAX}, {INT4_QMAX}]")
    nnz = int(popcount_rows(bitmask).sum())
    if kept_codes.numel() != nnz:
        raise ValueError(f"{kept_codes.numel()} codes for a bitmask with {nnz} set bits")
    data = _pack_int4(kept_codes, bitmask)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), _int4_row_bytes(bitmask).cumsum(0)])
    values = torch.cat([data, torch.zeros(PAD_BYTES, dtype=torch.uint8)])
    return PackedWeight(tuple(shape), bitmask, offsets, values, scales.float().contiguous(), None, act_int8, group_size)


def _pack_int4_weight(
    weight: Tensor, mask: Tensor, scales: Tensor | None, act_int8: bool, group_size: int | None
) -> PackedWeight:
    out, cols = weight.shape
    if group_size is not None and (group_size <= 0 or group_size % WORD or cols % group_size):
        raise ValueError(
            f"int4 group_size must be a positive multiple of {WORD} that divides in_features={cols}, got {group_size}"
        )
    groups = 1 if group_size is None else cols // group_size
    if weight.dtype == torch.int8:  # the kept codes' range is checked by pack_int4_kept (pruned ones are 0)
        scales = scales.detach().cpu().float().reshape(out, -1).contiguous()
        if scales.shape[1] != groups:
            raise ValueError(f"scales must be [{out}, {groups}] for group_size={group_size}, got {tuple(scales.shape)}")
        codes = weight
    else:
        codes, scales = quantize_groups(weight, mask, group_size)
    return pack_int4_kept((out, cols), _pack_bits(mask), codes[mask], scales, group_size, act_int8)


def unpack(packed: PackedWeight) -> Tensor:
    """The dense weight in the storage dtype (int8 and int4: the codes, as int8; see :func:`dequantize`). Exact."""
    if packed.dtype == torch.int4:
        kept = (_int4_nibbles(packed.values, packed.bitmask) - INT4_OFFSET).to(torch.int8)
        return torch.zeros(packed.shape, dtype=torch.int8).masked_scatter_(packed.mask(), kept)
    dense = torch.zeros(packed.shape, dtype=packed.dtype)
    return dense.masked_scatter_(packed.mask(), packed.values[: packed.nnz])


def group_scales(packed: PackedWeight) -> Tensor:
    """The fp32 scale of every weight position ``[out, in]`` (int8: its row's; int4: its group's)."""
    out, cols = packed.shape
    per = cols if packed.group_size is None else packed.group_size
    return packed.scales.reshape(out, -1).repeat_interleave(per, dim=1)[:, :cols]


def dequantize(packed: PackedWeight) -> Tensor:
    """The dense weight as fp32: values as stored, int8/int4 codes times their scales."""
    dense = unpack(packed).float()
    return dense * group_scales(packed) if packed.dtype in (torch.int8, torch.int4) else dense
