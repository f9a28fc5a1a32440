"""Run sparse (+ INT8) Llama models on the sparse CPU kernels.

``sparsify_model(model)`` swaps every decoder-layer ``nn.Linear`` whose weight is sparse enough
for a :class:`SparseLinear` holding the compressed weight (:mod:`sparsify.kernels.format`), so
``model(...)`` and ``model.generate(...)`` run on the kernels. Embeddings stay as they are;
``lm_head`` stays dense and unquantized (the paper prunes neither) unless ``lm_head=True`` with
INT8, which stores it as dense per-channel INT8 on the same kernel: at batch 1 it is the
largest single matrix (32000x4096 in Llama-2-7B), so on a 2-layer benchmark model it dominates
the decode time once the decoder layers are sparse.

INT8 (``int8=True`` or ``"w8a8"``): per-output-channel symmetric weight codes, activations
quantized per token at run time and multiplied with VNNI (the fastest kernel: 1 byte per kept
weight, 64 columns per instruction) — W8A8, the scheme the paper deploys. ``"w8a16"`` keeps float
activations (the codes are widened to fp32 in registers): slower to compute, no activation error.
A Linear already quantized by :mod:`sparsify.quantization` (per-channel INT8) keeps its exact
codes and scales, and its activation scheme decides W8A8 vs W8A16.

``SparseLinear`` is an inference module: its compressed tensors are plain attributes, not
parameters or buffers, so ``model.to(dtype)`` cannot re-type them and ``state_dict()`` does not
hold them (save sparse checkpoints with :mod:`sparsify.export`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparsify.kernels import PackedWeight, dequantize, kernel_isa, pack, sparse_linear
from sparsify.masks import find_decoder_layers, matches_any

logger = logging.getLogger(__name__)

INT8_MODES = ("w8a8", "w8a16")


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with W compressed; x ``[..., in]`` float32/bfloat16 (float16 via fp32) on the CPU,
    y in x's dtype."""

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        packed.validate()
        out_features, in_features = packed.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.packed = packed
        self.in_features = in_features
        self.out_features = out_features
        # fp32 bias, added in the kernel's fp32 epilogue (before the output's rounding).
        self.bias = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        mask: Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        int8: bool | str = False,
    ) -> SparseLinear:
        """Compress ``linear``'s weight (keep-mask: ``mask`` or its nonzeros) in ``dtype``, or as INT8."""
        mode = _int8_mode(int8)
        weight = linear.weight.detach()
        if weight.device.type != "cpu":
            raise ValueError(f"sparse kernels run on the CPU; the weight is on {weight.device}")
        if mode:
            packed = pack(weight, mask, torch.int8, act_int8=mode == "w8a8")
        else:
            packed = pack(weight, mask, dtype)
        return cls(packed, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.packed, self.bias)

    def dense_weight(self) -> Tensor:
        """The fp32 weight this layer multiplies by (dequantized for INT8)."""
        return dequantize(self.packed)

    def extra_repr(self) -> str:
        kind = str(self.packed.dtype).removeprefix("torch.")
        if self.packed.dtype == torch.int8:
            kind = "int8 w8a8" if self.packed.act_int8 else "int8 w8a16"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"values={kind}, sparsity={self.packed.sparsity:.3f}, kernels={kernel_isa()}")


def _int8_mode(int8: bool | str) -> str | None:
    if int8 is False or int8 is None:
        return None
    if int8 is True:
        return "w8a8"
    if int8 in INT8_MODES:
        return int8
    raise ValueError(f"int8 must be a bool or one of {INT8_MODES}, got {int8!r}")


def _quantized_pack(name: str, linear: nn.Linear, mode: str | None) -> PackedWeight | None:
    """The Linear's own INT8 codes and scales if :mod:`sparsify.quantization` quantized it, else None."""
    from sparsify.quantization import quant_state  # lazy: only needed for quantized models

    state = quant_state(linear)
    if state is None:
        return None
    scheme = state.scheme
    if mode is None:
        if scheme.activation_bits is not None:
            logger.warning("%s: W%dA%d model packed as float weights: its activation quantization is dropped",
                           name, scheme.weight_bits, scheme.activation_bits)
        return None
    if scheme.weight_bits != 8 or scheme.group_size is not None:
        raise ValueError(f"{name}: the INT8 kernels need per-channel 8-bit weights, got {scheme}; "
                         "use int8=False to run its dequantized weights")
    if scheme.activation_bits not in (None, 8):
        raise ValueError(f"{name}: activation bits {scheme.activation_bits} not supported (8 or none)")
    return pack(
        state.codes.detach().cpu(),
        dtype=torch.int8,
        scales=state.scales.detach().float().reshape(-1),
        act_int8=scheme.activation_bits == 8,
    )


@torch.no_grad()
def sparsify_model(
    model: nn.Module,
    *,
    min_sparsity: float = 0.3,
    dtype: torch.dtype = torch.bfloat16,
    int8: bool | str = False,
    ignore: Sequence[str] = (),
    lm_head: bool = False,
) -> dict[str, float]:
    """Replace, in place, the decoder-layer Linears with weight sparsity ≥ ``min_sparsity`` by SparseLinear.

    ``dtype`` (bfloat16 or float32) stores the values of float layers; ``int8`` (True / "w8a8" /
    "w8a16") stores INT8 codes instead. ``ignore``: module-name patterns to leave dense
    (:func:`sparsify.masks.matches_any`). ``lm_head`` (INT8 only): also store the output
    projection as INT8 (dense, per-channel scales). Returns ``{module name: sparsity}`` of the
    replaced layers.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    mode = _int8_mode(int8)
    if lm_head and mode is None:
        raise ValueError("lm_head=True needs int8: a dense float lm_head gains nothing from the sparse kernels")
    prefix, _ = find_decoder_layers(model)
    replaced: dict[str, float] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not name.startswith(prefix + ".") or matches_any(name, ignore):
            continue
        weight = module.weight.detach()
        sparsity = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
        if sparsity < min_sparsity:
            continue
        if weight.device.type != "cpu":
            raise ValueError(f"{name}: sparse kernels run on the CPU; the weight is on {weight.device}")
        packed = _quantized_pack(name, module, mode)
        if packed is not None:
            sparse = SparseLinear(packed, module.bias)
        else:
            sparse = SparseLinear.from_linear(module, dtype=dtype, int8=mode or False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, sparse)
        replaced[name] = sparsity
    if lm_head:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"lm_head=True: the output embeddings are a {type(head).__name__}, not an nn.Linear")
        if head.weight.device.type != "cpu":
            raise ValueError(f"lm_head: sparse kernels run on the CPU; the weight is on {head.weight.device}")
        weight, name = head.weight.detach(), _module_name(model, head)
        # A tied lm_head shares its weight with the input embeddings, which keep the float copy.
        model.set_output_embeddings(SparseLinear.from_linear(head, mask=torch.ones_like(weight, dtype=torch.bool),
                                                             int8=mode))
        replaced[name] = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    logger.info("sparsify_model: %d Linear layers on the sparse kernels (%s)", len(replaced), kernel_isa())
    return replaced


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
