"""Quantization algorithms: round-to-nearest, sparsity-preserving GPTQ, SmoothQuant, fake quantization.

Notation and conventions
------------------------
* ``W`` is a Linear weight ``[out, in]``; ``H = 2XXᵀ/n`` the Hessian of its inputs, as in
  :mod:`sparsify.sparsity.pruning`. A mask is bool ``[out, in]``, True = kept.
* **Symmetric integer grid.** A b-bit code c lies in ``[−qmax, qmax]`` with
  ``qmax = 2^(b−1) − 1`` (127 for INT8, 7 for INT4) and stands for ``c · scale``. There is
  no zero point, so 0 is exactly representable: a pruned weight quantizes to 0, its
  rounding error is 0, and sparse storage keeps only the nonzero codes. The code −2^(b−1)
  is not used, which keeps the grid symmetric (vLLM's INT8 kernels do the same).
* **Weight scales** ``[out, groups]``: one per output channel (``group_size=None``,
  groups = 1) or per run of ``group_size`` consecutive input columns of a row (groups =
  in / group_size), in the weight's dtype. ``scale = max|w| / qmax`` over the kept weights,
  so round-to-nearest never clips and ``|w − ŵ| ≤ scale/2`` elementwise.
* **Activations** (W8A8): dynamic per token — every row of a Linear's input gets its own
  scale at run time, applied by a forward pre-hook (:class:`ActivationQuantHook`) that
  quantizes and dequantizes the input with compressed-tensors' grid (scale = max|x| / 127.5,
  codes in [−128, 127]; see :func:`fake_quantize_per_token`), so the exported checkpoint
  computes what the in-memory model does.
* **The quantized model** stays an ordinary HF model: each quantized Linear's ``weight``
  holds the fake-quantized (dequantized) values ``ŵ = codes · scale`` in float, so
  evaluation code runs unchanged, and the exact integers live next to it as non-persistent
  buffers ``weight_codes`` (int8) and ``weight_scales``, with the scheme in the attribute
  ``sparsify_quant_scheme``; :mod:`sparsify.inference.export` writes them out. Masks do not change.

Sparsity and GPTQ
-----------------
GPTQ (Frantar et al. 2022) fixes the input columns one at a time to their quantized values
and compensates each column's error with the OBS update of the columns still free — the
same sweep as SparseGPT (:func:`sparsify.sparsity.pruning._obs_sweep`), which this module reuses
with a rounding rule. On a pruned layer the target of a weight is its quantized value
where the mask keeps it and 0 where it is pruned (SparseGPT's joint sparsification and
quantization). A pruned weight that is still ahead of the sweep is treated like any free
weight: it absorbs its share of earlier columns' compensation, and when the sweep reaches
it, it is fixed back to 0 and *that* deviation is compensated by the columns after it. The
simpler alternative — re-zeroing the pruned entries after every column update — throws the
share of the compensation that landed on them away uncompensated; on correlated inputs it
gave higher reconstruction error in 13 of 15 trials (≈10% on average, INT4 and INT8). Both
end with exactly the same zeros: pruned weights are exactly 0 in the result and the mask is
unchanged (a kept weight may round to code 0; it stays "kept").

Group scales: without act-order, a group's scale is computed when the sweep reaches the
group's first column, from its current (already compensated) kept weights, as the GPTQ
reference does; later updates inside the group may then clip at ±qmax. With act-order the
columns are swept by descending ``diag(H)`` (most-activated inputs first, while the most
columns are free to compensate) but the groups stay runs of consecutive *original* columns
("static groups"): their scales are computed up front from the unquantized weights. The
alternative, grouping in sweep order, would need a per-column group index (``g_idx``) in
every consumer of the checkpoint; static groups keep the ordinary layout that
compressed-tensors' pack-quantized format, vLLM and the project's CPU kernels read.
Per-channel scales are always computed up front from the unquantized weights.

SmoothQuant
-----------
W8A8 quantizes activations per token, and LLM activations have a few outlier channels that
blow up every token's scale. SmoothQuant (Xiao et al. 2023) moves the difficulty into the
weights: with ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (max over calibration tokens, and over
the rows of all Linears reading X), ``XWᵀ = (X diag(s)⁻¹)(W diag(s))ᵀ``. The division is
folded into whatever produces X — the RMSNorm weight before q/k/v and before gate/up, the
rows of up_proj before down_proj (``act(gate) ⊙ up`` is linear in up's output) — so the
float model computes the same function with smoother activations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from sparsify.config import Section
from sparsify.errors import ConfigError, DataError, UserInputError
from sparsify.quant.grids import as_exact, dequantize, fake_quantize_per_token, quantize_codes, weight_scales
from sparsify.sparsity.pruning import _obs_sweep, _prepare, check_ignore_patterns

log = logging.getLogger(__name__)

SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_ACTIVATION_BITS = (8,)
GROUP_ALIGNMENT = 8  # group sizes are multiples of 8: whole int32 words of packed INT4 codes per group

CODES_BUFFER = "weight_codes"
SCALES_BUFFER = "weight_scales"
SCHEME_ATTR = "sparsify_quant_scheme"
QUANT_MARKER = "sparsellama_quantization"  # config.json key (and model.config attribute) of a quantized model


# --------------------------------------------------------------------------- scheme and configuration


@dataclass(frozen=True)
class QuantScheme:
    """How one Linear is quantized: symmetric ``weight_bits`` integers, scales per channel or group."""

    weight_bits: int
    group_size: int | None = None  # None: one scale per output channel
    activation_bits: int | None = None  # None: weight-only; 8: dynamic per-token INT8 inputs

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1


def check_scheme(scheme: QuantScheme, in_features: int | None = None) -> None:
    """ValueError for an unsupported bit width or group size (or one that does not fit ``in_features``)."""
    if scheme.weight_bits not in SUPPORTED_WEIGHT_BITS:
        raise ConfigError(f"weight_bits must be one of {SUPPORTED_WEIGHT_BITS}, got {scheme.weight_bits}")
    if scheme.activation_bits is not None and scheme.activation_bits not in SUPPORTED_ACTIVATION_BITS:
        raise ConfigError(
            f"activation_bits must be one of {SUPPORTED_ACTIVATION_BITS} or null, got {scheme.activation_bits}"
        )
    g = scheme.group_size
    if g is not None:
        if g <= 0 or g % GROUP_ALIGNMENT:
            raise ConfigError(f"group_size must be a positive multiple of {GROUP_ALIGNMENT} (or null), got {g}")
        if in_features is not None and g > in_features:
            raise ConfigError(f"group_size {g} is larger than the input width {in_features}")
        if in_features is not None and in_features % g:
            raise ConfigError(f"group_size {g} does not divide the input width {in_features}")


class QuantConfig(Section):
    """Options of one quantization run; this is the ``quantize`` section of params.yaml.

    Defaults: the paper's W8A8 — GPTQ per-channel INT8 weights, dynamic per-token INT8
    activations, SmoothQuant α = 0.5. INT4: ``weight_bits: 4, group_size: 128,
    activation_bits: null, smoothquant: false``.
    """

    method: Literal["gptq", "rtn"] = "gptq"  # rtn: round-to-nearest, the baseline of every scheme
    weight_bits: int = 8  # 4 or 8, symmetric
    group_size: int | None = None  # null: one scale per output channel; else per group of input columns
    activation_bits: int | None = 8  # 8: dynamic per-token INT8 activations; null: weight-only
    smoothquant: bool = True  # fold SmoothQuant factors into the preceding norms / up_proj (needs activation_bits)
    smoothquant_alpha: float = Field(default=0.5, ge=0, le=1)  # migration strength α
    act_order: bool = False  # GPTQ: sweep columns by descending diag(H) (with static groups)
    block_size: int = Field(default=128, gt=0)  # GPTQ: columns per lazy-update block (a multiple of group_size)
    dampening: float = Field(default=0.01, gt=0)  # GPTQ: fraction of mean(diag H) added to diag H
    num_samples: int = Field(default=128, gt=0)  # calibration sequences
    seq_len: int = Field(default=256, gt=0)  # tokens per calibration sequence
    ignore: list[str] = []  # module-name patterns left unquantized: globs, or "re:<regex>"

    @field_validator("ignore")
    @classmethod
    def _ignore_patterns(cls, v: list[str]) -> list[str]:
        return check_ignore_patterns(v)

    # One field at a time, so a validation error names the key.
    @field_validator("weight_bits")
    @classmethod
    def _weight_bits(cls, v: int) -> int:
        check_scheme(QuantScheme(v))
        return v

    @field_validator("activation_bits")
    @classmethod
    def _activation_bits(cls, v: int | None) -> int | None:
        check_scheme(QuantScheme(SUPPORTED_WEIGHT_BITS[0], None, v))
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        check_scheme(QuantScheme(SUPPORTED_WEIGHT_BITS[0], v))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QuantConfig:
        if self.smoothquant and self.activation_bits is None:
            raise ValueError(
                "smoothquant moves activation outliers into the weights, which only helps when activations are "
                "quantized: set activation_bits to 8 or smoothquant to false"
            )
        if self.group_size is not None and self.block_size % self.group_size:
            raise ValueError(
                f"block_size ({self.block_size}) must be a multiple of group_size ({self.group_size}): "
                "GPTQ computes a group's scale when the sweep enters it, so a group must not span two blocks"
            )
        return self

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.weight_bits, self.group_size, self.activation_bits)


class ActivationQuantHook:
    """Forward pre-hook of a Linear: dynamic per-token fake quantization of its input.

    A plain picklable object (no closure), so quantized models survive ``copy.deepcopy``.
    """

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.enabled = True

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.enabled:
            return None  # inputs unchanged
        return (fake_quantize_per_token(args[0], self.bits), *args[1:])

    def __repr__(self) -> str:
        return f"ActivationQuantHook(bits={self.bits}, enabled={self.enabled})"


@contextlib.contextmanager
def activation_quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with float activations inside the block (to separate weight and activation error)."""
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, ActivationQuantHook)]
    for hook in hooks:
        hook.enabled = False
    try:
        yield
    finally:
        for hook in hooks:
            hook.enabled = True


# --------------------------------------------------------------------------- RTN and GPTQ


class QuantizedWeight(NamedTuple):
    weight: Tensor  # ŵ = codes · scales, in the input weight's dtype (exactly 0 where pruned)
    codes: Tensor  # int8 [out, in]
    scales: Tensor  # [out, groups], in the input weight's dtype
    cholesky_retries: int = 0


def _check_weight(W: Tensor, scheme: QuantScheme, mask: Tensor | None) -> None:
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor [out, in], got {tuple(W.shape)} {W.dtype}")
    if not torch.isfinite(W).all():
        raise ValueError("weight has nan/inf entries")
    check_scheme(scheme, W.shape[1])
    if mask is not None and (mask.shape != W.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool {tuple(W.shape)}, got {mask.dtype} {tuple(mask.shape)}")


def _result(W: Tensor, codes: Tensor, scales: Tensor, group_size: int | None, retries: int = 0) -> QuantizedWeight:
    return QuantizedWeight(dequantize(codes, scales, group_size, W.dtype), codes, scales, retries)


def rtn_quantize(W: Tensor, scheme: QuantScheme, *, mask: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest: every weight to its closest code, no error compensation (the baseline)."""
    _check_weight(W, scheme, mask)
    W = W.detach() if mask is None else W.detach().masked_fill(~mask.to(W.device), 0)
    scales = weight_scales(W, scheme.weight_bits, scheme.group_size)
    codes = quantize_codes(as_exact(W), scales, scheme.weight_bits, scheme.group_size)
    return _result(W, codes, scales, scheme.group_size)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    scheme: QuantScheme,
    *,
    mask: Tensor | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022) that keeps ``mask``'s zeros: see the module docstring.

    ``H = 2XXᵀ/n`` of the layer's calibration inputs. Computes in fp32 (fp64 for fp64
    input); the result's weight and scales are in W's dtype. Without a mask nothing is
    pruned (a dense layer).
    """
    _check_weight(W, scheme, mask)
    bits, g = scheme.weight_bits, scheme.group_size
    lazy_groups = g is not None and not act_order
    if block_size <= 0 or (lazy_groups and block_size % g):
        raise ValueError(f"block_size must be positive (and a multiple of group_size), got {block_size}")
    if dampening < 0:
        raise ValueError(f"dampening must be >= 0, got {dampening}")
    rows, cols = W.shape
    H = H.to(W.device)
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(W.device)
    W0 = W.detach().masked_fill(~keep, 0)
    # Per-channel and static-group scales come from the weights before any update.
    scales = W0.new_empty((rows, cols // g)) if lazy_groups else weight_scales(W0, bits, g)
    order = torch.argsort(H.diagonal(), descending=True, stable=True).to(W.device) if act_order else None
    if order is not None:
        W0, H, keep = W0[:, order], H[order][:, order], keep[:, order]
    work, U, _, retries, _ = _prepare(W0, H, dampening)
    original_column = order if order is not None else torch.arange(cols, device=W.device)
    group_of = (original_column // (g or cols)).tolist()  # the scale column of each swept column
    qmax = scheme.qmax

    def rounder(block: Tensor, j: int, start: int) -> Tensor:
        col = start + j
        if lazy_groups and col % g == 0:  # the sweep enters a group: its scale from the current kept weights
            scales[:, col // g] = weight_scales(block[:, j : j + g], bits, None, keep[:, col : col + g], W.dtype)[:, 0]
        s = scales[:, group_of[col]].to(block.dtype)
        return torch.round(block[:, j] / s).clamp_(-qmax, qmax) * s

    new_W = _obs_sweep(work, U, block_size, lambda _scores, a, b: keep[:, a:b], None, rounder).weight
    if order is not None:
        new_W = new_W[:, torch.argsort(order)]
    # new_W holds exactly code · scale, so dividing by the scale recovers the codes.
    codes = quantize_codes(new_W, scales, bits, g)
    return _result(W, codes, scales, g, retries)


def quantize_linear(W: Tensor, H: Tensor, cfg: QuantConfig, *, mask: Tensor | None = None) -> QuantizedWeight:
    """Quantize one Linear weight with ``cfg.method`` (RTN ignores ``H``)."""
    if cfg.method == "rtn":
        return rtn_quantize(W, cfg.scheme, mask=mask)
    return gptq_quantize(
        W, H, cfg.scheme, mask=mask, block_size=cfg.block_size, dampening=cfg.dampening, act_order=cfg.act_order
    )


# --------------------------------------------------------------------------- SmoothQuant

# (producer, consumers) inside a Llama-family decoder layer: the producer's output feeds every consumer.
SMOOTHING_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def smoothing_factors(act_absmax: Tensor, weights: Sequence[Tensor], alpha: float) -> Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (fp32), max|W_j| over all consumers' rows.

    A channel that is never active, or whose weights are all zero (possible in a pruned
    layer), keeps s = 1: there is nothing to balance.
    """
    w_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    a_absmax = act_absmax.float().to(w_absmax.device)
    s = a_absmax.pow(alpha) / w_absmax.pow(1 - alpha)
    valid = (a_absmax > 0) & (w_absmax > 0) & torch.isfinite(s)
    return torch.where(valid, s.clamp_min(1e-5), torch.ones_like(s))


@torch.no_grad()
def fold_smoothing(producer: nn.Module, consumers: Sequence[nn.Linear], s: Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' input columns by it.

    ``producer`` is a norm (weight [d]) or a Linear (weight [d, ·], channel = row); a bias,
    if any, is divided too. The composed function is unchanged: ``(x/s)·(W s)ᵀ = x Wᵀ``.
    """
    weight = producer.weight
    weight.div_(s.to(weight).reshape(-1, *([1] * (weight.ndim - 1))))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias))
    for consumer in consumers:
        consumer.weight.mul_(s.to(consumer.weight)[None, :])


def smoothing_groups(layer: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """The :data:`SMOOTHING_GROUPS` present in ``layer`` (all modules exist, channel counts agree)."""
    modules = dict(layer.named_modules())
    found = []
    for producer, consumers in SMOOTHING_GROUPS:
        if producer not in modules or not all(isinstance(modules.get(c), nn.Linear) for c in consumers):
            continue
        width = modules[producer].weight.shape[0]
        if all(modules[c].in_features == width for c in consumers):
            found.append((producer, consumers))
    return found


def smooth_decoder_layer(layer: nn.Module, act_absmax: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """Apply SmoothQuant to one decoder layer; returns ``{consumer: s}`` for every consumer smoothed.

    ``act_absmax`` maps a consumer's name inside the layer (``"self_attn.q_proj"``) to
    max|X_j| of its input over the calibration tokens; consumers of one producer share an
    input, so one entry per group suffices. Groups without an entry are left alone. The
    caller rescales any statistics of the smoothed inputs (X → X / s).
    """
    modules = dict(layer.named_modules())
    factors: dict[str, Tensor] = {}
    for producer, consumers in smoothing_groups(layer):
        absmax = next((act_absmax[c] for c in consumers if c in act_absmax), None)
        if absmax is None:
            continue
        linears = [modules[c] for c in consumers]
        s = smoothing_factors(absmax, [lin.weight for lin in linears], alpha)
        fold_smoothing(modules[producer], linears, s)
        factors |= dict.fromkeys(consumers, s)
    return factors


# --------------------------------------------------------------------------- quantized modules


class LinearQuantState(NamedTuple):
    scheme: QuantScheme
    codes: Tensor
    scales: Tensor


@torch.no_grad()
def attach_quantization(linear: nn.Linear, weight: Tensor, codes: Tensor, scales: Tensor, scheme: QuantScheme) -> None:
    """Make ``linear`` a quantized Linear: fake-quantized weight, integer buffers, activation hook."""
    if quant_state(linear) is not None:
        raise ValueError("this Linear is already quantized")
    device = linear.weight.device
    linear.weight.copy_(weight)
    linear.register_buffer(CODES_BUFFER, codes.to(device), persistent=False)
    linear.register_buffer(SCALES_BUFFER, scales.to(device), persistent=False)
    setattr(linear, SCHEME_ATTR, scheme)
    if scheme.activation_bits is not None:
        linear.register_forward_pre_hook(ActivationQuantHook(scheme.activation_bits))


def quant_state(linear: nn.Module) -> LinearQuantState | None:
    """The scheme, codes and scales attached by :func:`attach_quantization`; None if not quantized."""
    scheme = getattr(linear, SCHEME_ATTR, None)
    if scheme is None:
        return None
    return LinearQuantState(scheme, getattr(linear, CODES_BUFFER), getattr(linear, SCALES_BUFFER))


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Module name → Linear for every Linear quantized by this module, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and quant_state(m) is not None}


def mark_quantized(model: nn.Module, cfg: QuantConfig) -> None:
    """Record ``cfg`` in ``model.config`` (saved in config.json), so the model is never quantized twice."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, QUANT_MARKER, cfg.model_dump())


def _quantized_because(config: Mapping | object) -> str | None:
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    if get("quantization_config"):
        return "it has a quantization_config (e.g. a compressed-tensors checkpoint)"
    if get(QUANT_MARKER):
        return f"it is marked {QUANT_MARKER!r} (quantized by sparsellama)"
    return None


def check_not_quantized(source: nn.Module | str | os.PathLike) -> None:
    """ValueError if ``source`` (a model, or a checkpoint folder's config.json) is already quantized.

    Quantizing twice would round already-rounded weights onto a second grid (and, after
    SmoothQuant, smooth twice): always quantize the float checkpoint.
    """
    if isinstance(source, nn.Module):
        reason = _quantized_because(getattr(source, "config", None) or {})
        if reason is None and any(
            quant_state(m) is not None or hasattr(m, "quantization_scheme") for m in source.modules()
        ):
            reason = "it has quantized Linear modules"
        where = f"the model ({type(source).__name__})"
    else:
        path = Path(source)
        config_file = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except json.JSONDecodeError as err:
            raise DataError(f"{config_file} is not valid JSON: {err}") from err
        reason = _quantized_because(config)
        where = str(path)
    if reason is not None:
        raise UserInputError(f"{where} is already quantized: {reason}; quantize the unquantized checkpoint instead")
