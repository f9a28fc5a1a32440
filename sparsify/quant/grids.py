"""The integer grids: one definition of how weights and activations map to integer codes.

Used by quantization (RTN, GPTQ, the activation hooks), the CPU kernels' packing and their torch
reference, and the benchmarks, so that every path rounds the same way (see
:mod:`sparsify.quant.quantization` for the conventions):

* weights: symmetric, ``scale = max|w| / qmax`` over each row's (group's) kept weights, codes in
  ``[−qmax, qmax]`` with ``qmax = 2^(b−1) − 1``; pruned weights are exactly code 0;
* activations (W8A8): dynamic per token, compressed-tensors' grid, ``scale = max|x_t| / 127.5``,
  codes ``round(clamp(x / scale, −128, 127))``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_exact(t: Tensor) -> Tensor:
    """``t`` in fp32 unless fp64: the grid arithmetic (w / scale, its rounding) is done at least in fp32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def grouped(t: Tensor, group_size: int | None) -> Tensor:
    """``[out, in]`` → ``[out, groups, group]`` (one group of ``in`` columns when per-channel)."""
    return t.reshape(t.shape[0], -1, group_size or t.shape[1])


def weight_scales(
    W: Tensor, bits: int, group_size: int | None, keep: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Symmetric scales ``[out, groups]``: max|w| / qmax over each row's (group's) kept weights.

    The largest kept weight lands exactly on ±qmax, so round-to-nearest never clips. Pruned
    entries do not count (in GPTQ's working copy they hold transient compensation that is
    zeroed later). A group without a nonzero weight gets scale 1: its codes are 0 anyway.
    """
    qmax = 2 ** (bits - 1) - 1
    magnitude = as_exact(W.detach()).abs()
    if keep is not None:
        magnitude = magnitude.masked_fill(~keep, 0)
    amax = grouped(magnitude, group_size).amax(-1)
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scales.to(dtype or W.dtype)


def quantize_codes(W: Tensor, scales: Tensor, bits: int, group_size: int | None) -> Tensor:
    """int8 codes ``round(w / scale)`` clamped to ``[−qmax, qmax]`` (computed in W's dtype: pass fp32 or fp64)."""
    qmax = 2 ** (bits - 1) - 1
    codes = torch.round(grouped(W, group_size) / scales.to(W.dtype)[..., None]).clamp_(-qmax, qmax)
    return codes.reshape(W.shape).to(torch.int8)


def dequantize(codes: Tensor, scales: Tensor, group_size: int | None, dtype: torch.dtype | None = None) -> Tensor:
    """``codes · scale`` computed in the scales' dtype — the same arithmetic as compressed-tensors' dequantization,
    so an exported checkpoint reproduces these weights bit for bit."""
    values = grouped(codes, group_size).to(scales.dtype) * scales[..., None]
    return values.reshape(codes.shape).to(dtype or scales.dtype)


def activation_codes(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token codes (as floats, in x's dtype) and scales ``[..., 1]`` of ``x``.

    compressed-tensors' grid (the arithmetic transformers runs on an exported W8A8 checkpoint):
    ``scale = max|x_t| / 127.5`` (half the int8 range; 1 for an all-zero token), codes
    ``round(clamp(x/scale, −128, 127))``; the error stays within scale/2. vLLM's int8 kernels divide
    by 127 instead — a fraction of a step apart.
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((x / scale).clamp_(qmin, qmax)), scale


def fake_quantize_per_token(x: Tensor, bits: int = 8) -> Tensor:
    """Quant-dequant of each token (last-dim row) of ``x`` on :func:`activation_codes`' grid, computed in x's
    dtype as compressed-tensors does, so the in-memory model and the exported one compute the same logits."""
    codes, scale = activation_codes(x, bits)
    return codes * scale
