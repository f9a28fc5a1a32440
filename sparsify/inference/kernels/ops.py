"""``sparse_linear(x, packed, bias)`` and ``decode_attention``: the kernel calls with input checks and
pure-torch fallbacks.

The fallback (no compiler, non-CPU-kernel platform, or autograd through x) computes the same
function as the kernels: float formats in fp32 from the exact stored values; W8A8 and W4A8 with the
same per-token int8 codes and exact integer sums (per scale group for INT4). It unpacks the weight
on every call — slow, never wrong.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from sparsify.inference.kernels.format import PackedWeight, dequantize, unpack, with_gather_index
from sparsify.inference.kernels.hugepages import packed_in_huge_pages
from sparsify.inference.kernels.loader import ISA_NAMES, available_isa, load_extension
from sparsify.quant.grids import activation_codes

logger = logging.getLogger(__name__)

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
_isa_cache: dict = {}


def kernel_isa() -> str:
    """Instruction set the kernels use here: 'avx512', 'avx2', 'generic', or 'torch' (fallback).

    Chosen once, at the first call (CPU features, torch's dispatch cap, ``SPARSELLAMA_ISA``), and logged.
    """
    if "isa" not in _isa_cache:
        _isa_cache["isa"] = available_isa()
        isa = _isa_cache["isa"]
        logger.info(
            "sparse kernels: the %s path%s",
            "pure-torch" if isa < 0 else ISA_NAMES[isa],
            f" (SPARSELLAMA_ISA={os.environ['SPARSELLAMA_ISA']})" if os.environ.get("SPARSELLAMA_ISA") else "",
        )
    isa = _isa_cache["isa"]
    return "torch" if isa < 0 else ISA_NAMES[isa]


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token int8 codes (as float) and scales, exactly as the C++ kernels compute them.

    compressed-tensors' grid: ``scale = max|x_t| / 127.5`` (1 for an all-zero row), codes
    ``round(clamp(x / scale, -128, 127))``, all in fp32. Rows with a non-finite entry get a nan scale.
    """
    codes, scale = activation_codes(x.float())
    scale = scale[:, 0]
    return codes, torch.where(torch.isfinite(scale), scale, torch.full_like(scale, float("nan")))


def torch_sparse_linear(x: Tensor, packed: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """Reference/fallback: ``x [M, in]`` (float) → fp32 ``[M, out]``, the kernels' arithmetic in torch."""
    if packed.dtype == torch.int4:
        y = _int4_reference(x, packed)
    elif packed.dtype == torch.int8 and packed.act_int8:
        codes, xs = quantize_activations(x)
        # Integer dot products in float64 are exact (|sum| < 2^53), like the kernels' int32 sums.
        acc = (codes.double() @ unpack(packed).double().T).float()
        y = acc * (xs[:, None] * packed.scales[None, :])
    elif packed.dtype == torch.int8:  # W8A16: Σ x·code, then the row scale (the kernels' order)
        y = (x.float() @ unpack(packed).float().T) * packed.scales[None, :]
    else:
        y = x.float() @ dequantize(packed).T
    return y + bias if bias is not None else y


def _int4_reference(x: Tensor, packed: PackedWeight) -> Tensor:
    """INT4: each group's dot product (exact integers for W4A8, fp32 for W4A16) times its scale, summed."""
    out, cols = packed.shape
    per = cols if packed.group_size is None else packed.group_size
    codes = unpack(packed).reshape(out, -1, per)  # [out, groups, per]
    if packed.act_int8:
        q, xs = quantize_activations(x)
        acc = torch.einsum("mgk,ngk->mng", q.double().reshape(len(q), -1, per), codes.double())
        return ((acc * packed.scales.double()).sum(-1) * xs.double()[:, None]).float()
    acc = torch.einsum("mgk,ngk->mng", x.float().reshape(len(x), -1, per), codes.float())
    return (acc * packed.scales).sum(-1)


def _check_input(x: Tensor, packed: PackedWeight) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"sparse kernels run on the CPU; x is on {x.device}")
    if x.dtype not in FLOAT_INPUTS:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != packed.shape[1]:
        raise ValueError(f"x's last dimension must be in_features={packed.shape[1]}, got shape {tuple(x.shape)}")


def sparse_linear(x: Tensor, packed: PackedWeight, bias: Tensor | None = None, *, isa: str | None = None) -> Tensor:
    """``x [..., in] · Wᵀ + bias`` → ``[..., out]`` in x's dtype (float16 computes in fp32).

    ``bias`` is fp32 ``[out]`` or None. ``isa`` forces a path: 'avx512', 'avx2', 'generic' (must be
    supported here) or 'torch'; default: the best available. Inputs that need gradients take the
    torch path (differentiable in x). Non-contiguous x is copied.
    """
    _check_input(x, packed)
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (packed.shape[0],)):
        raise ValueError(f"bias must be float32 [{packed.shape[0]}], got {bias.dtype} {tuple(bias.shape)}")
    name = _check_isa(isa)
    if name == "torch" or (x.requires_grad and torch.is_grad_enabled()):
        y = torch_sparse_linear(x.reshape(-1, packed.shape[1]), packed, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])
    if x.dtype == torch.float16:  # no fp16 kernels: fp32 holds every fp16 exactly
        return sparse_linear(x.float(), packed, bias, isa=name).half()
    # Fast path (decode calls this ~7 times per layer per token): the C++ side views x as [M, in].
    return call_extension(load_extension(), x if x.is_contiguous() else x.contiguous(), packed, bias, name)


# From this sparsity on, the AVX2 W8A8 and W4A8 kernels below 8 rows of x gather x by the gather
# index instead of expanding the bitmask; at batch 1: W8A8 1.36-1.42x at 60%, 1.47-1.69x at 70%,
# 1.46-1.54x at 80%, W4A8 1.25-1.48x at 60-80%; at 50% 0.99-1.02x, where the index (a byte per stored
# code) makes a W8A8 weight read more than a dense INT8 one (11008x4096, Zen 4 with the AVX2 path,
# benchmarks/kernel_ab.py in three runs, docs/results.md).
GATHER_MIN_SPARSITY = 0.6
# The most rows of x the gather kernels take (kernels.h: kOuterMin − 1); from kOuterMin on, the
# outer-product kernel reads the bitmask.
GATHER_MAX_BATCH = 7


def for_isa(packed: PackedWeight, isa: str) -> PackedWeight:
    """``packed`` as the ``isa`` kernels read it fastest: on AVX2, a W8A8 or W4A8 weight of at least
    GATHER_MIN_SPARSITY gains its gather index (:func:`with_gather_index`, ~1 byte per stored code more
    in memory); on every compiled path, the streamed tensors move to huge pages where the OS offers them
    (:func:`~sparsify.inference.kernels.hugepages.packed_in_huge_pages`). The pure-torch path gets
    ``packed`` as is."""
    gathers = isa == "avx2" and packed.dtype in (torch.int8, torch.int4) and packed.act_int8
    if gathers and packed.columns is None and packed.sparsity >= GATHER_MIN_SPARSITY:
        packed = with_gather_index(packed)
    return packed if isa == "torch" else packed_in_huge_pages(packed)


def _check_isa(isa: str | None) -> str:
    """The path to run: ``isa`` if given and available here (ValueError if not), else the best one."""
    name = isa or kernel_isa()
    if name != "torch":
        if name not in ISA_NAMES:
            raise ValueError(f"isa must be one of {ISA_NAMES + ('torch',)}, got {name!r}")
        best = kernel_isa()
        if best == "torch" or ISA_NAMES.index(name) > ISA_NAMES.index(best):
            raise ValueError(f"isa {name!r} is not available here (best: {best!r})")
    return name


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, length: int, scale: float | None = None, *, isa: str | None = None
) -> Tensor:
    """One token's attention: ``q [heads, head_dim]`` against cache positions ``[0, length)`` of
    ``k, v [kv_heads, capacity, head_dim]`` (grouped-query: query head i reads kv head
    ``i // (heads // kv_heads)``) → ``[heads, head_dim]`` in q's dtype. ``scale`` defaults to
    ``head_dim ** -0.5``. fp32 arithmetic on every path; a nan query gives its head a nan output.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"{name} must be a float32 or bfloat16 CPU tensor")
    if q.dim() != 2 or k.dim() != 3 or k.shape != v.shape or k.dtype != v.dtype or k.shape[2] != q.shape[1]:
        raise ValueError(
            f"expected q [heads, head_dim] and k, v [kv_heads, capacity, head_dim] of one shape and dtype, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
        )
    heads, head_dim = q.shape
    kv_heads, capacity = k.shape[:2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not 1 <= length <= capacity:
        raise ValueError(f"length must be in [1, {capacity}], got {length}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    name = _check_isa(isa)
    if name == "torch":
        # Written out rather than SDPA, which returns finite numbers for a nan query on the CPU.
        group = heads // kv_heads
        keys, values = (t[:, :length].float().repeat_interleave(group, 0) for t in (k, v))
        p = (torch.einsum("hd,hld->hl", q.float(), keys) * scale).softmax(-1)
        return torch.einsum("hl,hld->hd", p, values).to(q.dtype)
    return load_extension().decode_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), length, scale, ISA_NAMES.index(name)
    )


def call_extension(module, x: Tensor, packed: PackedWeight, bias: Tensor | None, isa: str) -> Tensor:
    """The compiled binding's ``sparse_linear`` on contiguous ``x``, unchecked: the one place that
    knows its argument order (``module``: this build, or another revision's in benchmarks/kernel_ab.py;
    the gather index goes only where a weight has one, so older builds still take the others)."""
    extra = {} if packed.columns is None else {"columns": packed.columns}
    return module.sparse_linear(
        x,
        packed.bitmask,
        packed.offsets,
        packed.values,
        packed.scales,
        packed.row_sums,
        bias,
        packed.act_int8,
        ISA_NAMES.index(isa),
        packed.group_size or 0,
        **extra,
    )
