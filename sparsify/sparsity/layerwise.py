"""Layer-wise calibration driver: prune or quantize a Llama-family model one decoder layer at a time.

One driver (:func:`_run_layerwise`) serves both: it captures the inputs of decoder layer
0, walks the decoder layers with one on the device at a time, and saves/resumes progress;
what happens to each layer is a job (:class:`_PruneJob`, :class:`_QuantizeJob`). Pruning
is described below; quantization (:func:`quantize_model`) follows the same steps with
GPTQ or round-to-nearest in place of the pruning rule, SmoothQuant folded in first (from
the same forward pass: also records max|X_j| of each Linear's inputs; smoothing X → X/s
turns H into H / (s sᵀ), so no second pass is needed), and the layer's outputs recomputed
with its activations fake-quantized, as the quantized model will compute them.

How it works
------------
1. **Capture.** The model runs on the calibration ids with a pre-hook on decoder layer 0
   that records its input hidden states and stops the forward (nothing after the
   embeddings runs). The layer's keyword inputs — ``position_embeddings`` from
   ``model.model.rotary_emb``, the causal mask, ``position_ids`` — are captured once,
   from a one-sequence forward: calibration rows all have the same length and no
   padding, so these are the same for every row and broadcast over any mini-batch.
2. **Per decoder layer** ``i``: move the layer to ``device``; forward hooks on its
   prunable Linears accumulate ``H = 2XXᵀ/n`` (fp32 running average) over all calibration
   sequences in mini-batches, one H per distinct input (q/k/v share one, gate/up share
   one: :class:`_InputRecorder`); prune every Linear from its H — all from the *dense*
   layer's inputs, as the SparseGPT reference does; recompute the layer's outputs with
   the pruned weights, which overwrite the activation buffer in place and become layer
   ``i+1``'s inputs (so each layer is calibrated on what the pruned model feeds it; the
   last layer's outputs are not needed and not computed); move the layer back.
3. **OWL** (``cfg.owl``): a pre-pass propagates the calibration set through the *dense*
   model layer by layer (only ‖X_j‖², no Hessians), computes each decoder layer's outlier
   ratio over all its prunable Linears, and maps the ratios to per-layer sparsities
   (:func:`sparsify.sparsity.pruning.owl_sparsities`); the activations are then re-captured and the
   normal pass runs with those targets. Cost: one extra forward of the model.

Memory
------
With hidden size d, MLP width f, N calibration sequences of L tokens, mini-batch B,
b bytes per model weight/activation (2 for bf16), and Σin² over a layer's distinct
Linear inputs (Llama: q/k/v share one of width d, o has d, gate/up share one of d, down
has f, so Σin² = 3d² + f²):

* host: the model, plus one activation buffer ``N·L·d·b`` (outputs overwrite inputs).
* device (one decoder layer at a time): its weights ``(4d² + 3df)·b`` + the Hessians
  ``4·Σin²`` bytes (each freed once its Linears are pruned) + the SparseGPT workspace of
  the widest Linear ``≈ 4·(2·in² + 2·out·in)`` bytes (H and U, W's work copy and the
  error's delta; the factorisation itself needs H and one in×in buffer) + one mini-batch's
  forward ``≈ B·L·(3f·b + 8f)`` (MLP activations and the hooks' fp32 copies; plus ``B·heads·L²·b`` for eager attention).

Llama-2-7B (d=4096, f=11008), bf16, N=128, L=2048: host buffer 2.1 GB; device ≈ 0.4 GB
weights + 0.7 GB Hessians + 1.3 GB workspace + the mini-batch. README "Cost at 7B" has
the measured figures and the time formula. Quantization needs the
same (GPTQ's workspace is SparseGPT's) and keeps, next to each fake-quantized weight, its
int8 codes (1 byte per weight) and scales.

Resume
------
With ``resume_dir``, after every finished decoder layer the driver writes (atomically,
temp file + rename) ``layer_XXXXX.safetensors`` (that layer's pruned weights and masks;
for quantization, all its parameters and the integer codes and scales),
then ``state.safetensors`` (the activations for the next layer, the next layer index,
the per-layer records, and a fingerprint of config, calibration, old masks and the
model's embeddings). Writing the state last makes it the commit point. A restart loads
the finished layers into the model and continues; on the same device the result is
bit-identical to an uninterrupted run. A state with another fingerprint is refused. The
directory is kept after success (a rerun returns at once); delete it when done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from sparsify.fingerprint import fingerprint as fingerprint_of
from sparsify.io import atomic_path
from sparsify.quant.quantization import (
    QuantConfig,
    attach_quantization,
    check_not_quantized,
    check_scheme,
    mark_quantized,
    quant_state,
    quantize_linear,
    smooth_decoder_layer,
    smoothing_groups,
)
from sparsify.sparsity.masks import check_masks, find_decoder_layers, matches_any, prunable_linear_names, validate_masks
from sparsify.sparsity.pruning import (
    PruneConfig,
    outlier_ratio,
    owl_sparsities,
    prune_linear,
    reconstruction_error,
    wanda_scores,
)

log = logging.getLogger(__name__)

_FORMAT_VERSION = "1"
_STATE_FILE = "state.safetensors"


@dataclass
class PruneResult:
    """What :func:`prune_model` did. ``masks`` covers every pruned Linear (plus ``old_masks``)."""

    masks: dict[str, Tensor]
    layers: list[dict]  # per Linear: name, decoder_layer, target_sparsity, sparsity, error, seconds, cholesky_retries
    seconds_per_decoder_layer: list[float]
    total_seconds: float
    cholesky_retries: int
    layer_sparsity_targets: list[float] = field(default_factory=list)  # per decoder layer (differs with OWL)


@dataclass
class QuantizeResult:
    """What :func:`quantize_model` did."""

    layers: list[dict]  # per Linear: name, decoder_layer, error, rtn_error (gptq), seconds, cholesky_retries
    seconds_per_decoder_layer: list[float]
    total_seconds: float
    cholesky_retries: int


@dataclass
class _Progress:
    """Everything needed to continue after ``next_layer - 1`` finished (what the resume state holds)."""

    next_layer: int
    activations: Tensor
    targets: list[float]  # pruning: per-layer sparsity (OWL); unused by quantization
    records: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    masks: dict[str, Tensor] = field(default_factory=dict)
    retries: int = 0
    elapsed: float = 0.0


# --------------------------------------------------------------------------- input checks


def _check_calibration(
    model: nn.Module, calib: Tensor, cfg: PruneConfig | QuantConfig, section: str = "prune"
) -> Tensor:
    """The ``[num_samples, seq_len]`` slice of ``calib`` that is used, after checking it."""
    if not isinstance(calib, Tensor) or calib.ndim != 2 or calib.dtype not in (torch.int64, torch.int32):
        got = f"{calib.dtype} {tuple(calib.shape)}" if isinstance(calib, Tensor) else type(calib).__name__
        raise ValueError(f"calibration must be an integer tensor [num_samples, seq_len] of token ids, got {got}")
    n, length = calib.shape
    if n < cfg.num_samples:
        raise ValueError(f"calibration has {n} sequences, fewer than {section}.num_samples={cfg.num_samples}")
    if length < cfg.seq_len:
        raise ValueError(f"calibration sequences have {length} tokens, fewer than {section}.seq_len={cfg.seq_len}")
    ids = calib[: cfg.num_samples, : cfg.seq_len].long().contiguous()
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"calibration token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
    return ids


# check(weight name, linear): raise ValueError if the Linear cannot be processed with the run's config
LinearCheck = Callable[[str, nn.Linear], None]


def _linears_by_layer(
    model: nn.Module, ignore: list[str], check: LinearCheck, section: str = "prune"
) -> list[dict[str, nn.Linear]]:
    """For each decoder layer, its Linears (not ignored) keyed by full weight name, each ``check``-ed."""
    prefix, layers = find_decoder_layers(model)
    by_layer: list[dict[str, nn.Linear]] = [{} for _ in layers]
    for name in prunable_linear_names(model, ignore):
        index = int(name[len(prefix) + 1 :].split(".", 1)[0])
        linear = model.get_submodule(name.removesuffix(".weight"))
        check(name, linear)
        by_layer[index][name] = linear
    linear_modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")]
    for pattern in ignore:
        if not any(matches_any(n, [pattern]) for n in linear_modules):
            log.warning("%s.ignore pattern %r matches no Linear inside the decoder layers", section, pattern)
    return by_layer


def _nm_check(cfg: PruneConfig) -> LinearCheck:
    def check(name: str, linear: nn.Linear) -> None:
        if cfg.nm is not None and linear.in_features % cfg.nm[1]:
            raise ValueError(
                f"structure {cfg.structure!r}: M={cfg.nm[1]} does not divide the input width "
                f"{linear.in_features} of {name}"
            )

    return check


def _scheme_check(cfg: QuantConfig) -> LinearCheck:
    def check(name: str, linear: nn.Linear) -> None:
        try:
            check_scheme(cfg.scheme, linear.in_features)
        except ValueError as err:
            raise ValueError(f"quantize: {err} of {name}") from err

    return check


# --------------------------------------------------------------------------- capture and forward


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _first_layer_inputs(model: nn.Module, layer0: nn.Module, ids: Tensor) -> tuple[Tensor, dict]:
    """Hidden states and keyword arguments that the model passes to decoder layer 0 for ``ids``."""
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids.to(model.get_input_embeddings().weight.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError("the model's forward never reached decoder layer 0")
    return captured["hidden"], captured["kwargs"]


def _capture_activations(model: nn.Module, layer0: nn.Module, calib: Tensor, batch_size: int) -> Tensor:
    """Decoder layer 0's input hidden states for all calibration rows, on the CPU ``[N, L, d]``."""
    acts: Tensor | None = None
    for s in range(0, calib.shape[0], batch_size):
        hidden = _first_layer_inputs(model, layer0, calib[s : s + batch_size])[0]
        if acts is None:  # allocated once: the buffer is the host's main memory cost
            acts = torch.empty((calib.shape[0], *hidden.shape[1:]), dtype=hidden.dtype)
        acts[s : s + batch_size].copy_(hidden)
    if not torch.isfinite(acts).all():
        raise ValueError("non-finite activations at the input of decoder layer 0 (the embeddings)")
    return acts


def _run_layer(layer: nn.Module, acts: Tensor, kwargs: dict, batch_size: int, *, write_back: str | None) -> None:
    """Forward ``acts`` through ``layer`` in mini-batches (kwargs already on the layer's device).

    With ``write_back`` (a description of the layer for errors), each mini-batch's output
    replaces its input in ``acts`` — safe because a mini-batch's input is not needed again.
    """
    device = next(layer.parameters()).device
    for s in range(0, acts.shape[0], batch_size):
        out = layer(acts[s : s + batch_size].to(device), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if write_back is not None:
            if not torch.isfinite(out).all():
                raise ValueError(f"non-finite activations at the output of {write_back}")
            acts[s : s + batch_size].copy_(out)


@contextlib.contextmanager
def _on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the block, and back where it was afterwards."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


class _InputStats:
    """Running statistics of one Linear's inputs over the calibration tokens.

    ``full``: ``H = 2/n · Σ x xᵀ`` as a running average (rescaled at each mini-batch, as in
    the SparseGPT reference, so it never grows with n); else only ``Σ x_j²`` (OWL pre-pass).
    ``absmax``: also ``max |x_j|`` per input channel (SmoothQuant).
    """

    def __init__(self, features: int, device: torch.device, full: bool, *, absmax: bool = False) -> None:
        self.tokens = 0
        self.hessian = torch.zeros(features, features, device=device) if full else None
        self.sq_norms = None if full else torch.zeros(features, device=device)
        self.absmax = torch.zeros(features, device=device) if absmax else None

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        if self.absmax is not None:
            torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)
        if self.hessian is not None:
            # H_new = n/(n+t) · H_old + 2/(n+t) · XᵀX  ==  2/(n+t) · Σ_all x xᵀ
            self.hessian.mul_(self.tokens / (self.tokens + t))
            x = x * math.sqrt(2 / (self.tokens + t))
            self.hessian.addmm_(x.T, x)
        else:
            self.sq_norms.add_(x.square().sum(0))
        self.tokens += t

    def rescale_inputs(self, s: Tensor) -> None:
        """The statistics of the inputs X / s (SmoothQuant): H_ij / (s_i s_j), max|x_j| / s_j, Σ x_j² / s_j²."""
        s = s.to(device=(self.hessian if self.hessian is not None else self.sq_norms).device, dtype=torch.float32)
        if self.hessian is not None:
            self.hessian.div_(s[:, None] * s[None, :])
        else:
            self.sq_norms.div_(s.square())
        if self.absmax is not None:
            self.absmax.div_(s)


class _InputRecorder:
    """Forward-hook target feeding each Linear's inputs into :class:`_InputStats`, one per distinct input.

    Linears called on the very same input tensor in a forward (Llama: q/k/v_proj on the
    normed hidden states, gate/up_proj on the MLP input) share one statistics object: H
    depends only on X, so this is exact, the shared H is bit-identical to each one a
    Linear would accumulate alone, and it costs one accumulation instead of three (or two).
    Sharing is found at run time by tensor identity (weak references: no input is kept
    alive), so it needs no knowledge of the architecture, and every mini-batch must pair
    the same Linears (checked).
    """

    def __init__(self, make: Callable[[nn.Linear], _InputStats], share: bool) -> None:
        self.make, self.share = make, share
        self.stats: dict[str, _InputStats] = {}
        self.owner: dict[str, str] = {}  # Linear name -> the Linear whose stats it uses (itself if it owns them)
        self._seen: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (input, first Linear fed it)

    def __call__(self, name: str, linear: nn.Linear, x: Tensor) -> None:
        entry = self._seen.get(id(x)) if self.share else None
        first = entry[1] if entry is not None and entry[0]() is x else None
        if first is None:  # a new input: this Linear owns (or creates) the stats it goes into
            if self.owner.setdefault(name, name) != name:
                raise RuntimeError(f"{name} shared {self.owner[name]}'s input before but not in this forward")
            self._seen = {k: v for k, v in self._seen.items() if v[0]() is not None}  # drop dead entries
            self._seen[id(x)] = (weakref.ref(x), name)
            if name not in self.stats:
                self.stats[name] = self.make(linear)
            self.stats[name].add(x)
        elif self.owner.setdefault(name, first) != first:
            raise RuntimeError(f"{name} read {first}'s input in this forward, but not before")
        else:
            self.stats[name] = self.stats[first]


@contextlib.contextmanager
def _recording_inputs(
    linears: Mapping[str, nn.Linear], *, full: bool, absmax: bool = False, share: bool = True
) -> Iterator[dict[str, _InputStats]]:
    """Forward hooks feeding each Linear's inputs into its :class:`_InputStats` while the block runs.

    The dict maps every Linear that ran to its statistics; Linears that read the same
    input get the same object (see :class:`_InputRecorder`; ``share=False`` gives each its own).
    """
    recorder = _InputRecorder(
        lambda linear: _InputStats(linear.in_features, linear.weight.device, full, absmax=absmax), share
    )
    handles = [
        linear.register_forward_hook(lambda module, args, output, name=name: recorder(name, module, args[0]))
        for name, linear in linears.items()
    ]
    try:
        yield recorder.stats
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- per decoder layer: pruning


def _prune_decoder_layer(
    index: int,
    layer: nn.Module,
    linears: Mapping[str, nn.Linear],
    progress: _Progress,
    kwargs: dict,
    cfg: PruneConfig,
    old_masks: Mapping[str, Tensor] | None,
    batch_size: int,
    propagate: bool,
) -> None:
    """Prune one decoder layer (already on its device) and advance ``progress`` past it.

    ``propagate``: recompute the layer's outputs into the activation buffer (the next
    layer's inputs); False for the last decoder layer, whose outputs nothing reads.
    """
    acts, target = progress.activations, progress.targets[index]
    with _recording_inputs(linears, full=True) as stats:
        _run_layer(layer, acts, kwargs, batch_size, write_back=None)
    for name, linear in linears.items():
        start = time.perf_counter()
        H = stats.pop(name).hessian  # freed at the end of this iteration
        if not torch.isfinite(H).all():
            raise ValueError(f"non-finite inputs to {name} (decoder layer {index})")
        W = linear.weight
        # Iterative pruning: every weight pruned before stays pruned.
        keep = old_masks[name].to(W.device, torch.bool) if old_masks is not None and name in old_masks else W != 0
        try:
            result = prune_linear(W, H, cfg, sparsity=target, keep_mask=keep)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        W.copy_(result.weight)
        progress.masks[name] = result.mask.cpu()
        progress.retries += result.cholesky_retries
        progress.records.append(
            {
                "name": name,
                "decoder_layer": index,
                "target_sparsity": target,
                "sparsity": 1.0 - result.mask.float().mean().item(),
                "error": result.error,
                "seconds": time.perf_counter() - start,
                "cholesky_retries": result.cholesky_retries,
            }
        )
    if propagate:
        _run_layer(layer, acts, kwargs, batch_size, write_back=f"decoder layer {index}")
    progress.next_layer = index + 1


def _owl_targets(
    layers: nn.ModuleList,
    linears_by_layer: list[dict[str, nn.Linear]],
    acts: Tensor,
    kwargs: dict,
    cfg: PruneConfig,
    device: torch.device,
    batch_size: int,
    show_progress: bool,
) -> list[float]:
    """OWL pre-pass on the dense model: per-layer outlier ratios → per-layer sparsities (consumes ``acts``)."""
    ratios = []
    for index in tqdm(range(len(layers)), desc="owl pre-pass", unit="layer", disable=not show_progress):
        with _on_device(layers[index], device) as layer:
            linears = linears_by_layer[index]
            with _recording_inputs(linears, full=False) as stats:
                _run_layer(layer, acts, _to_device(kwargs, device), batch_size, write_back=f"decoder layer {index}")
            scores = [wanda_scores(lin.weight, stats[name].sq_norms) for name, lin in linears.items()]
            ratios.append(outlier_ratio(scores, cfg.owl_threshold) if scores else 0.0)
    targets = owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda)
    log.info("OWL outlier ratios %s -> sparsities %s", [f"{r:.4f}" for r in ratios], [f"{t:.3f}" for t in targets])
    return targets


# --------------------------------------------------------------------------- per decoder layer: quantization


def _smooth_decoder_layer(layer: nn.Module, layer_name: str, stats: Mapping[str, _InputStats], alpha: float) -> None:
    """SmoothQuant on one decoder layer from the recorded max|X_j|, then its inputs' statistics rescaled to X / s."""
    prefix = layer_name + "."
    absmax = {name[len(prefix) :].removesuffix(".weight"): st.absmax for name, st in stats.items()}
    rescaled: set[int] = set()  # consumers of one input share their statistics: rescale those once
    for consumer, s in smooth_decoder_layer(layer, absmax, alpha).items():
        st = stats.get(f"{prefix}{consumer}.weight")
        if st is not None and id(st) not in rescaled:
            st.rescale_inputs(s)
            rescaled.add(id(st))


def _quantize_decoder_layer(
    index: int,
    layer: nn.Module,
    linears: Mapping[str, nn.Linear],
    progress: _Progress,
    kwargs: dict,
    cfg: QuantConfig,
    masks: Mapping[str, Tensor] | None,
    batch_size: int,
    layer_name: str,
    propagate: bool,
) -> None:
    """Quantize one decoder layer (already on its device) and advance ``progress`` past it.

    Every Linear is quantized from the float layer's inputs (after smoothing), like pruning;
    the outputs passed on (``propagate``, as in :func:`_prune_decoder_layer`) are computed
    with fake-quantized weights and activations.
    """
    acts = progress.activations
    # Zeros to keep, fixed before smoothing rescales the weights: the masks, or the existing zeros.
    keep = {
        name: masks[name].to(lin.weight.device, torch.bool) if masks is not None and name in masks else lin.weight != 0
        for name, lin in linears.items()
    }
    with _recording_inputs(linears, full=True, absmax=cfg.smoothquant) as stats:
        _run_layer(layer, acts, kwargs, batch_size, write_back=None)
    if cfg.smoothquant:
        _smooth_decoder_layer(layer, layer_name, stats, cfg.smoothquant_alpha)
    for name, linear in linears.items():
        start = time.perf_counter()
        H = stats.pop(name).hessian
        if not torch.isfinite(H).all():
            raise ValueError(f"non-finite inputs to {name} (decoder layer {index})")
        W = linear.weight
        try:
            result = quantize_linear(W, H, cfg, mask=keep[name])
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        record = {"name": name, "decoder_layer": index, "error": reconstruction_error(W, result.weight, H)}
        if cfg.method == "gptq":  # the gain over the baseline, for the logs and metrics
            baseline = quantize_linear(W, H, cfg.model_copy(update={"method": "rtn"}), mask=keep[name])
            record["rtn_error"] = reconstruction_error(W, baseline.weight, H)
        attach_quantization(linear, result.weight, result.codes, result.scales, cfg.scheme)
        progress.retries += result.cholesky_retries
        progress.records.append(
            record | {"seconds": time.perf_counter() - start, "cholesky_retries": result.cholesky_retries}
        )
    if propagate:
        _run_layer(layer, acts, kwargs, batch_size, write_back=f"decoder layer {index}")
    progress.next_layer = index + 1


# --------------------------------------------------------------------------- jobs


class _LayerJob(Protocol):
    """What a layer-wise pass does to a decoder layer, and how a finished layer is saved and restored."""

    def process(
        self,
        index: int,
        layer: nn.Module,
        linears: Mapping[str, nn.Linear],
        progress: _Progress,
        kwargs: dict,
        propagate: bool,
    ) -> None: ...

    def saved_tensors(
        self, index: int, layer: nn.Module, linears: Mapping[str, nn.Linear], progress: _Progress
    ) -> dict[str, Tensor]: ...

    def restore(self, model: nn.Module, tensors: Mapping[str, Tensor], progress: _Progress) -> None: ...


@dataclass
class _PruneJob:
    cfg: PruneConfig
    old_masks: Mapping[str, Tensor] | None
    batch_size: int

    def process(
        self,
        index: int,
        layer: nn.Module,
        linears: Mapping[str, nn.Linear],
        progress: _Progress,
        kwargs: dict,
        propagate: bool,
    ) -> None:
        _prune_decoder_layer(
            index, layer, linears, progress, kwargs, self.cfg, self.old_masks, self.batch_size, propagate
        )

    def saved_tensors(
        self, index: int, layer: nn.Module, linears: Mapping[str, nn.Linear], progress: _Progress
    ) -> dict[str, Tensor]:
        tensors = {f"weight/{n}": lin.weight.detach().cpu().contiguous() for n, lin in linears.items()}
        return tensors | {f"mask/{n}": progress.masks[n] for n in linears}

    def restore(self, model: nn.Module, tensors: Mapping[str, Tensor], progress: _Progress) -> None:
        params = dict(model.named_parameters())
        for key, tensor in tensors.items():
            kind, name = key.split("/", 1)
            if kind == "weight":
                params[name].copy_(tensor)
            else:
                progress.masks[name] = tensor


@dataclass
class _QuantizeJob:
    cfg: QuantConfig
    masks: Mapping[str, Tensor] | None
    batch_size: int
    prefix: str  # module path of the decoder layers, e.g. "model.layers"

    def process(
        self,
        index: int,
        layer: nn.Module,
        linears: Mapping[str, nn.Linear],
        progress: _Progress,
        kwargs: dict,
        propagate: bool,
    ) -> None:
        _quantize_decoder_layer(
            index,
            layer,
            linears,
            progress,
            kwargs,
            self.cfg,
            self.masks,
            self.batch_size,
            f"{self.prefix}.{index}",
            propagate,
        )

    def saved_tensors(
        self, index: int, layer: nn.Module, linears: Mapping[str, nn.Linear], progress: _Progress
    ) -> dict[str, Tensor]:
        # Every parameter of the layer (smoothing also changed the norms and up_proj's rows), codes and scales.
        layer_name = f"{self.prefix}.{index}"
        tensors = {f"param/{layer_name}.{k}": v.detach().cpu().contiguous() for k, v in layer.named_parameters()}
        for name, linear in linears.items():
            state = quant_state(linear)
            tensors[f"codes/{name}"] = state.codes.cpu().contiguous()
            tensors[f"scales/{name}"] = state.scales.cpu().contiguous()
        return tensors

    def restore(self, model: nn.Module, tensors: Mapping[str, Tensor], progress: _Progress) -> None:
        params = dict(model.named_parameters())
        for key, tensor in tensors.items():
            kind, name = key.split("/", 1)
            if kind == "param":
                params[name].copy_(tensor)
        for key, codes in tensors.items():
            kind, name = key.split("/", 1)
            if kind == "codes":
                linear = model.get_submodule(name.removesuffix(".weight"))
                attach_quantization(linear, linear.weight, codes, tensors[f"scales/{name}"], self.cfg.scheme)


# --------------------------------------------------------------------------- resume state


def _fingerprint(
    model: nn.Module,
    calib: Tensor,
    cfg: PruneConfig | QuantConfig,
    masks: Mapping[str, Tensor] | None,
    batch_size: int,
) -> str:
    """Identifies a run: a resume must use the same config, calibration, masks and model.

    The model is identified by its embeddings (never pruned or quantized) and its
    processed weight names; the mini-batch size is included because it changes the fp32
    accumulation order. The config's JSON also tells pruning and quantization runs apart.
    """
    return fingerprint_of(
        {
            "version": _FORMAT_VERSION,
            "config": cfg,
            "batch": batch_size,
            "calibration": calib,
            "embeddings": model.get_input_embeddings().weight,
            "layers": prunable_linear_names(model, cfg.ignore),
            "masks": dict(masks or {}),
        }
    )


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Stream tensors to a temp file, fsync, rename (the activations may be GBs: no bytes copy)."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _layer_file(root: Path, index: int) -> Path:
    return root / f"layer_{index:05d}.safetensors"


def _save_progress(root: Path, fingerprint: str, layer_tensors: dict[str, Tensor], progress: _Progress) -> None:
    index = progress.next_layer - 1
    _atomic_save(layer_tensors, _layer_file(root, index), {"fingerprint": fingerprint})
    meta = {
        "fingerprint": fingerprint,
        "next_layer": str(progress.next_layer),
        "targets": json.dumps(progress.targets),
        "records": json.dumps(progress.records),
        "seconds": json.dumps(progress.seconds),
        "retries": str(progress.retries),
        "elapsed": repr(progress.elapsed),
    }
    _atomic_save({"activations": progress.activations}, root / _STATE_FILE, meta)


def _load_progress(root: Path, fingerprint: str, model: nn.Module, job: _LayerJob) -> _Progress | None:
    """The saved progress with the finished layers restored into ``model`` by ``job``; None if nothing saved."""
    state_path = root / _STATE_FILE
    if not state_path.exists():
        return None
    try:
        with safe_open(state_path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"resume_dir {root} holds progress of a different run (config, calibration data, masks "
                    "or model differ); delete it or choose another resume_dir"
                )
            progress = _Progress(
                next_layer=int(meta["next_layer"]),
                activations=f.get_tensor("activations"),
                targets=json.loads(meta["targets"]),
                records=json.loads(meta["records"]),
                seconds=json.loads(meta["seconds"]),
                retries=int(meta["retries"]),
                elapsed=float(meta["elapsed"]),
            )
        with torch.no_grad():
            for index in range(progress.next_layer):
                job.restore(model, load_file(_layer_file(root, index)), progress)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the resume state in {root} ({err}); delete the folder to start over") from err
    log.info("resuming at decoder layer %d from %s", progress.next_layer, root)
    return progress


# --------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _run_layerwise(
    model: nn.Module,
    calib: Tensor,
    linears_by_layer: list[dict[str, nn.Linear]],
    job: _LayerJob,
    *,
    start: Callable[[Tensor, dict], _Progress],
    device: torch.device,
    root: Path | None,
    fingerprint: str,
    batch_size: int,
    show_progress: bool,
    desc: str,
) -> tuple[_Progress, float]:
    """Walk the decoder layers with ``job`` (see the module docstring); returns the progress and total seconds.

    ``start(activations, kwargs)`` makes the initial progress of a fresh run from decoder
    layer 0's captured inputs (pruning's OWL pre-pass runs there). The caller holds
    ``torch.no_grad()`` and eval mode.
    """
    begin = time.perf_counter()
    _, layers = find_decoder_layers(model)
    state = _load_progress(root, fingerprint, model, job) if root is not None else None
    _, kwargs = _first_layer_inputs(model, layers[0], calib[:1])  # batch-1 kwargs broadcast over batches
    kwargs = _to_device(kwargs, torch.device("cpu"))
    if state is None:
        state = start(_capture_activations(model, layers[0], calib, batch_size), kwargs)
    elapsed_before = state.elapsed

    bar = tqdm(total=len(layers), initial=state.next_layer, desc=desc, unit="layer", disable=not show_progress)
    with bar:
        for index in range(state.next_layer, len(layers)):
            layer_start = time.perf_counter()
            with _on_device(layers[index], device) as layer:
                job.process(
                    index,
                    layer,
                    linears_by_layer[index],
                    state,
                    _to_device(kwargs, device),
                    propagate=index + 1 < len(layers),
                )
            state.seconds.append(time.perf_counter() - layer_start)
            state.elapsed = elapsed_before + time.perf_counter() - begin
            errors = [r["error"] for r in state.records if r["decoder_layer"] == index]
            if errors:
                mean_error = sum(errors) / len(errors)
                bar.set_postfix(err=f"{mean_error:.4f}")
                log.info("decoder layer %d: mean relative error %.5f (%.1fs)", index, mean_error, state.seconds[-1])
            if root is not None:
                tensors = job.saved_tensors(index, layers[index], linears_by_layer[index], state)
                _save_progress(root, fingerprint, tensors, state)
            bar.update()
    return state, elapsed_before + time.perf_counter() - begin


def prune_model(
    model: nn.Module,
    calib: Tensor,
    cfg: PruneConfig,
    *,
    old_masks: Mapping[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
    resume_dir: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> PruneResult:
    """Prune ``model``'s decoder-layer Linears in place with ``cfg``; see the module docstring.

    ``calib``: token ids ``[N ≥ cfg.num_samples, L ≥ cfg.seq_len]`` (the first rows and
    tokens are used). ``old_masks``: masks of a previous round (iterative pruning); without
    them, existing zeros are kept as pruned. ``batch_size``: calibration sequences per
    forward. All inputs are checked before any work or write.
    """
    cfg = PruneConfig.model_validate(cfg.model_dump())  # re-check: model_construct skips validation
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _, layers = find_decoder_layers(model)
    calib = _check_calibration(model, calib, cfg)
    linears_by_layer = _linears_by_layer(model, cfg.ignore, _nm_check(cfg))
    if old_masks is not None:
        validate_masks(model, old_masks)
    device = torch.device(device)
    root = Path(resume_dir) if resume_dir is not None else None
    fingerprint = _fingerprint(model, calib, cfg, old_masks, batch_size) if root is not None else ""

    def start(acts: Tensor, kwargs: dict) -> _Progress:
        targets = [cfg.sparsity] * len(layers)
        if cfg.owl:
            targets = _owl_targets(layers, linears_by_layer, acts, kwargs, cfg, device, batch_size, progress)
            acts = _capture_activations(model, layers[0], calib, batch_size)
        return _Progress(next_layer=0, activations=acts, targets=targets)

    with torch.no_grad(), _eval_mode(model):
        state, total = _run_layerwise(
            model,
            calib,
            linears_by_layer,
            _PruneJob(cfg, old_masks, batch_size),
            start=start,
            device=device,
            root=root,
            fingerprint=fingerprint,
            batch_size=batch_size,
            show_progress=progress,
            desc=f"{cfg.method} {cfg.structure if cfg.nm else f'{cfg.sparsity:.0%}'}",
        )

    check_masks(model, state.masks)  # every stage that writes a model asserts its sparsity
    pruned = sum(int((~m).sum()) for m in state.masks.values())
    numel = sum(m.numel() for m in state.masks.values())
    log.info("pruned %d Linears to %.4f sparsity in %.1fs", len(state.masks), pruned / max(numel, 1), total)
    return PruneResult(
        masks={**(old_masks or {}), **state.masks},
        layers=state.records,
        seconds_per_decoder_layer=state.seconds,
        total_seconds=total,
        cholesky_retries=state.retries,
        layer_sparsity_targets=state.targets,
    )


def quantize_model(
    model: nn.Module,
    calib: Tensor,
    cfg: QuantConfig,
    *,
    masks: Mapping[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
    resume_dir: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> QuantizeResult:
    """Quantize ``model``'s decoder-layer Linears in place with ``cfg`` (GPTQ or RTN, SmoothQuant first).

    Afterwards each quantized Linear holds fake-quantized weights plus its integer codes
    and scales (:func:`sparsify.quant.quantization.attach_quantization`), dynamic per-token
    activation quantization runs in its forward when ``cfg.activation_bits`` is set, and
    ``model.config`` is marked quantized. ``masks``: the sparsity masks, checked against
    the model and kept (without them, existing zeros are kept). Inputs are checked before
    any work or write: calibration as in :func:`prune_model`, a bit width or group size
    that does not fit a layer, an already quantized model, masks that do not match it.
    """
    cfg = QuantConfig.model_validate(cfg.model_dump())  # re-check: model_construct skips validation
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    check_not_quantized(model)
    prefix, layers = find_decoder_layers(model)
    calib = _check_calibration(model, calib, cfg, "quantize")
    linears_by_layer = _linears_by_layer(model, cfg.ignore, _scheme_check(cfg), "quantize")
    if masks is not None:
        check_masks(model, masks)  # names, shapes, and zeros where the masks prune
    if cfg.smoothquant and not any(smoothing_groups(layer) for layer in layers):
        raise ValueError(
            f"smoothquant: the decoder layers ({type(layers[0]).__name__}) have none of the Llama-style "
            "norm -> Linear groups it folds into (input_layernorm -> q/k/v_proj, ...); set smoothquant to false"
        )
    device = torch.device(device)
    root = Path(resume_dir) if resume_dir is not None else None
    fingerprint = _fingerprint(model, calib, cfg, masks, batch_size) if root is not None else ""

    def start(acts: Tensor, kwargs: dict) -> _Progress:
        return _Progress(next_layer=0, activations=acts, targets=[])

    scheme = f"W{cfg.weight_bits}A{cfg.activation_bits or 16}" + (f" g{cfg.group_size}" if cfg.group_size else "")
    with torch.no_grad(), _eval_mode(model):
        state, total = _run_layerwise(
            model,
            calib,
            linears_by_layer,
            _QuantizeJob(cfg, masks, batch_size, prefix),
            start=start,
            device=device,
            root=root,
            fingerprint=fingerprint,
            batch_size=batch_size,
            show_progress=progress,
            desc=f"{cfg.method} {scheme}",
        )

    if masks is not None:
        check_masks(model, masks)
    mark_quantized(model, cfg)
    log.info("quantized %d Linears (%s, %s) in %.1fs", len(state.records), cfg.method, scheme, total)
    return QuantizeResult(
        layers=state.records,
        seconds_per_decoder_layer=state.seconds,
        total_seconds=total,
        cholesky_retries=state.retries,
    )
