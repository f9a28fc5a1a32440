"""Stage `quant-<scheme>-<model>`: quantize a sparse checkpoint, keeping its masks.

GPTQ (or round-to-nearest) on the layer-wise driver, SmoothQuant first for W8A8. The
checkpoint is written in the compressed-tensors format (what transformers and vLLM
load; the evaluation stages load it back with activation quantization in place), with
the masks, plus the project's own bitmask + packed values + scales format under
`sparse/` for the CPU runtime.
"""

from __future__ import annotations

import logging
import statistics

from sparsify.checkpoint import PROVENANCE, load_checkpoint, save_checkpoint
from sparsify.data.corpus import Corpus
from sparsify.inference.export import save_compressed_tensors, save_sparse_model
from sparsify.io import atomic_dir, atomic_write_json
from sparsify.model import pick_device
from sparsify.quant.quantization import check_not_quantized
from sparsify.sparsity.layerwise import quantize_model
from sparsify.sparsity.masks import check_masks, sparsity_report
from tasks.common import (
    Layout,
    StageResult,
    checkpoint_mb,
    provenance,
    release_resume,
    resume_dir,
    val_perplexities,
)
from tasks.config import Config

log = logging.getLogger(__name__)


def run(cfg: Config, *, name: str, scheme: str, source: str, output: str, variant: str) -> StageResult:
    layout = Layout.of(cfg)
    src = cfg.root / source
    check_not_quantized(src)
    qcfg = cfg.quantize.scheme(scheme)
    source_ckpt = load_checkpoint(src)
    model, masks = source_ckpt.model, source_ckpt.masks
    device = pick_device(cfg.project.device)
    corpus = Corpus.open(layout.corpus)
    resume = resume_dir(cfg, name)
    result = quantize_model(model, corpus.calibration(), qcfg, masks=masks, device=device, resume_dir=resume)
    model.cpu()
    if masks is not None:
        check_masks(model, masks)  # the zeros survived quantization
    ppls = val_perplexities(cfg, model, corpus, device)
    ppl = ppls["ppl/val"]
    model.cpu()
    out = cfg.root / output
    with atomic_dir(out) as tmp:
        save_checkpoint(
            model,
            source_ckpt.tokenizer,
            tmp,
            provenance(name, cfg, ("project", "quantize"), [src]),
            masks=masks,
            write_weights=save_compressed_tensors,
        )
        if masks is not None:
            save_sparse_model(model, masks, tmp / "sparse")
        atomic_write_json(
            tmp / "quantize_layers.json",
            {"layers": result.layers, "seconds_per_decoder_layer": result.seconds_per_decoder_layer},
        )
    release_resume(resume)  # the checkpoint is written; the resume state is spent
    errors = [r["error"] for r in result.layers]
    rtn = [r["rtn_error"] for r in result.layers if "rtn_error" in r]
    metrics = {
        **ppls,
        "sparsity/global": sparsity_report(model, masks)["global"],
        "size/mb": checkpoint_mb(out) - (checkpoint_mb(out / "sparse") if (out / "sparse").exists() else 0.0),
        "size/sparse_format_mb": checkpoint_mb(out / "sparse") if (out / "sparse").exists() else 0.0,
        "size/source_mb": checkpoint_mb(src),
        "quant/recon_error_mean": statistics.fmean(errors) if errors else 0.0,
        "time/quantize_s": result.total_seconds,
    }
    if rtn:
        metrics["quant/rtn_error_mean"] = statistics.fmean(rtn)
    log.info(
        "%s: %s %s, val ppl %.2f, %.1f MB (source %.1f MB)",
        name,
        scheme,
        qcfg.method,
        ppl,
        metrics["size/mb"],
        metrics["size/source_mb"],
    )
    return StageResult(
        metrics=metrics,
        outputs=[out],
        variant=variant,
        artifacts=[out / PROVENANCE, out / "quantize_layers.json"],
    )
