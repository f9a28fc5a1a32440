"""Run sparse (+ INT8) Llama models on the sparse CPU kernels.

``sparsify_model(model)`` swaps every decoder-layer ``nn.Linear`` whose weight is sparse enough
for a :class:`SparseLinear` holding the compressed weight (:mod:`sparsify.inference.kernels.format`), so
``model(...)`` and ``model.generate(...)`` run on the kernels; so does the decode steps' attention
(:func:`use_decode_attention`). Embeddings stay as they are;
``lm_head`` stays dense and unquantized (the paper prunes neither) unless ``lm_head=True`` with
INT8, which stores it as dense per-channel INT8 on the same kernel: at batch 1 it is the
largest single matrix (32000x4096 in Llama-2-7B), so on a 2-layer benchmark model it dominates
the decode time once the decoder layers are sparse.

INT8 (``int8=True`` or ``"w8a8"``): per-output-channel symmetric weight codes, activations
quantized per token at run time and multiplied with VNNI (the fastest kernel: 1 byte per kept
weight, 64 columns per instruction) — W8A8, the scheme the paper deploys. ``"w8a16"`` keeps float
activations (the codes are widened to fp32 in registers): slower to compute, no activation error.
A Linear already quantized by :mod:`sparsify.quant.quantization` (per-channel INT8, or INT4 in groups
that are a multiple of 64) keeps its exact codes and scales, and its scheme decides the kernel
(W8A8, W8A16, W4A8, W4A16) whichever of ``int8`` / ``int4`` asked for quantized kernels.

INT4 (``int4=True`` or ``"w4a8"``, or ``"w4a16"``): 4-bit codes with one scale per row and
``group_size`` input columns (128, the quantize stage's default) — ~0.28 bytes per weight at 70%,
two thirds of INT8's. W4A8 multiplies with int8 activations (VNNI on AVX-512, VPMADDWD on AVX2);
W4A16 keeps them float and computes exactly the weight-only scheme the quantize stage evaluates.

``SparseLinear`` is an inference module: its compressed tensors are plain attributes, not
parameters or buffers, so ``model.to(dtype)`` cannot re-type them and ``state_dict()`` does not
hold them (save sparse checkpoints with :mod:`sparsify.inference.export`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparsify.errors import UserInputError
from sparsify.inference.kernels import PackedWeight, dequantize, kernel_isa, pack, sparse_linear
from sparsify.inference.kernels.ops import decode_attention, for_isa
from sparsify.sparsity.masks import find_decoder_layers, matches_any

logger = logging.getLogger(__name__)

INT8_MODES = ("w8a8", "w8a16")
INT4_MODES = ("w4a8", "w4a16")


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with W compressed; x ``[..., in]`` float32/bfloat16 (float16 via fp32) on the CPU,
    y in x's dtype."""

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        packed.validate()
        packed = for_isa(packed, kernel_isa())
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
        int4: bool | str = False,
        group_size: int | None = 128,
    ) -> SparseLinear:
        """Compress ``linear``'s weight (keep-mask: ``mask`` or its nonzeros) in ``dtype``, or as INT8 / INT4
        (per-row groups of ``group_size`` columns; None: one scale per row)."""
        mode = _quant_mode(int8, int4)
        weight = linear.weight.detach()
        if weight.device.type != "cpu":
            raise ValueError(f"sparse kernels run on the CPU; the weight is on {weight.device}")
        if mode in INT8_MODES:
            packed = pack(weight, mask, torch.int8, act_int8=mode == "w8a8")
        elif mode in INT4_MODES:
            packed = pack(weight, mask, torch.int4, act_int8=mode == "w4a8", group_size=group_size)
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
        if self.packed.dtype in (torch.int8, torch.int4):
            bits = 8 if self.packed.dtype == torch.int8 else 4
            kind = f"{kind} w{bits}a{8 if self.packed.act_int8 else 16}"
            if self.packed.group_size is not None:
                kind += f" group_size={self.packed.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"values={kind}, sparsity={self.packed.sparsity:.3f}, kernels={kernel_isa()}"
        )


def _quant_mode(int8: bool | str, int4: bool | str) -> str | None:
    """The quantized kernel asked for: one of INT8_MODES + INT4_MODES, or None (float values)."""
    modes = []
    for flag, allowed, name in ((int8, INT8_MODES, "int8"), (int4, INT4_MODES, "int4")):
        if flag is False or flag is None:
            continue
        if flag is True:
            modes.append(allowed[0])
        elif flag in allowed:
            modes.append(flag)
        else:
            raise ValueError(f"{name} must be a bool or one of {allowed}, got {flag!r}")
    if len(modes) > 1:
        raise ValueError("int8 and int4 are exclusive: pick one weight precision")
    return modes[0] if modes else None


def _quantized_pack(name: str, linear: nn.Linear, mode: str | None) -> PackedWeight | None:
    """The Linear's own INT8 codes and scales if :mod:`sparsify.quant.quantization` quantized it, else None."""
    from sparsify.quant.quantization import quant_state  # lazy: only needed for quantized models

    state = quant_state(linear)
    if state is None:
        return None
    scheme = state.scheme
    if mode is None:
        if scheme.activation_bits is not None:
            logger.warning(
                "%s: W%dA%d model packed as float weights: its activation quantization is dropped",
                name,
                scheme.weight_bits,
                scheme.activation_bits,
            )
        return None
    if scheme.activation_bits not in (None, 8):
        raise ValueError(f"{name}: activation bits {scheme.activation_bits} not supported (8 or none)")
    codes, scales = state.codes.detach().cpu(), state.scales.detach().cpu().float()
    if scheme.weight_bits == 4:
        if scheme.group_size is not None and scheme.group_size % 64:
            raise ValueError(
                f"{name}: the INT4 kernels need groups that are a multiple of 64 columns, got {scheme}; "
                "use int4=False to run its dequantized weights"
            )
        return pack(
            codes, dtype=torch.int4, scales=scales, group_size=scheme.group_size, act_int8=scheme.activation_bits == 8
        )
    if scheme.weight_bits != 8 or scheme.group_size is not None:
        raise ValueError(
            f"{name}: the INT8 kernels need per-channel 8-bit weights, got {scheme}; "
            "use int8=False to run its dequantized weights"
        )
    return pack(codes, dtype=torch.int8, scales=scales.reshape(-1), act_int8=scheme.activation_bits == 8)


@torch.no_grad()
def sparsify_model(
    model: nn.Module,
    *,
    min_sparsity: float = 0.3,
    dtype: torch.dtype = torch.bfloat16,
    int8: bool | str = False,
    int4: bool | str = False,
    group_size: int | None = 128,
    ignore: Sequence[str] = (),
    lm_head: bool = False,
) -> dict[str, float]:
    """Replace, in place, the decoder-layer Linears with weight sparsity ≥ ``min_sparsity`` by SparseLinear.

    ``dtype`` (bfloat16 or float32) stores the values of float layers; ``int8`` (True / "w8a8" /
    "w8a16") stores INT8 codes instead, ``int4`` (True / "w4a8" / "w4a16") INT4 codes in groups of
    ``group_size`` columns. ``ignore``: module-name patterns to leave dense
    (:func:`sparsify.sparsity.masks.matches_any`). ``lm_head`` (INT8 or INT4): also store the output
    projection as dense per-channel INT8 (W8A8 with ``w*a8`` modes, else W8A16). Returns
    ``{module name: sparsity}`` of the replaced layers.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise UserInputError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    mode = _quant_mode(int8, int4)
    if lm_head and mode is None:
        raise ValueError("lm_head=True needs int8 or int4: a dense float lm_head gains nothing from the sparse kernels")
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
            sparse = SparseLinear.from_linear(
                module,
                dtype=dtype,
                int8=mode if mode in INT8_MODES else False,
                int4=mode if mode in INT4_MODES else False,
                group_size=group_size,
            )
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
        head_mode = "w8a8" if mode.endswith("a8") else "w8a16"  # INT8 whatever the layers' bits: see the docstring
        model.set_output_embeddings(
            SparseLinear.from_linear(head, mask=torch.ones_like(weight, dtype=torch.bool), int8=head_mode)
        )
        replaced[name] = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    attention = use_decode_attention(model)
    logger.info(
        "sparsify_model: %d Linear layers on the sparse kernels (%s)%s",
        len(replaced),
        kernel_isa(),
        "; decode attention on the kernel" if attention else "",
    )
    return replaced


DECODE_ATTENTION = "sparsellama_decode"  # the transformers attention implementation use_decode_attention sets


def _attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """A transformers attention function: one new token with nothing masked (batch decode without
    padding) goes through the decode_attention kernel, sequence by sequence; everything else
    (prefill, padding or sliding-window masks, dropout, softcapping) through transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    decode = (
        query.shape[2] == 1
        and attention_mask is None
        and not dropout
        and kwargs.get("softcap") is None
        and query.device.type == "cpu"
        and key.dtype in (torch.bfloat16, torch.float32)
        and not (torch.is_grad_enabled() and query.requires_grad)
    )
    if not decode:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    length = key.shape[2]
    out = torch.stack([decode_attention(query[b, :, 0], key[b], value[b], length, scaling) for b in range(len(query))])
    return out[:, None], None  # [batch, 1 token, heads, head_dim], as sdpa_attention_forward returns


def use_decode_attention(model: nn.Module) -> bool:
    """Route ``model``'s decode-step attention (transformers' forward, ``model.generate``) through the
    decode_attention kernel: torch's CPU SDPA reads a bf16 KV cache 4-12x slower when the query is
    one token (docs/results.md). Needs the compiled kernels and a transformers model whose attention
    dispatches through transformers' AttentionInterface (``_supports_attention_backend``: the Llama
    family does); any other model keeps its attention. Returns whether it was set."""
    if kernel_isa() == "torch" or not getattr(model, "_supports_attention_backend", False):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(DECODE_ATTENTION, _attention_forward)
    # The masks SDPA gets: None wherever nothing is masked, which is when the kernel may run.
    AttentionMaskInterface.register(DECODE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(DECODE_ATTENTION)
    return True


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
