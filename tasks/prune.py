"""Stage `prune<NN>`: one-shot pruning of a checkpoint to a sparsity level (SparseGPT by default).

Iterative: when the input checkpoint already has masks (e.g. 50% before 70%), every
existing zero stays zero. Progress is checkpointed after each decoder layer under
`<root>/.resume/<stage>`, so an interrupted stage restarts from the last finished layer.
"""

from __future__ import annotations

import logging
import statistics

from sparsify.checkpoint import load_checkpoint, save_checkpoint
from sparsify.data.corpus import Corpus
from sparsify.io import atomic_dir, atomic_write_json
from sparsify.model import pick_device, weights_dtype
from sparsify.sparsity.layerwise import prune_model
from sparsify.sparsity.masks import plot_sparsity, sparsity_report
from sparsify.sparsity.pruning import PruneConfig
from tasks.common import Layout, StageResult, provenance, release_resume, resume_dir, val_perplexities
from tasks.config import Config

log = logging.getLogger(__name__)


def run(cfg: Config, *, name: str, sparsity: float, source: str, output: str) -> StageResult:
    """Prune `source` to `sparsity` into `output` (the one-shot model: variant sparse<NN>-oneshot)."""
    layout = Layout.of(cfg)
    src, out = cfg.root / source, cfg.root / output
    corpus = Corpus.open(layout.corpus)
    pcfg = PruneConfig.model_validate({**cfg.prune.model_dump(), "sparsity": sparsity})
    device = pick_device(cfg.project.device)
    source_ckpt = load_checkpoint(src, dtype=weights_dtype(pcfg.dtype, device))
    model = source_ckpt.model
    resume = resume_dir(cfg, name)
    result = prune_model(
        model, corpus.calibration(), pcfg, old_masks=source_ckpt.masks, device=device, resume_dir=resume
    )

    ppls = val_perplexities(cfg, model, corpus, device)
    ppl = ppls["ppl/val"]
    report = sparsity_report(model.cpu(), result.masks)
    errors = [r["error"] for r in result.layers]
    metrics = {
        **ppls,
        "sparsity/global": report["global"],
        "sparsity/target": sparsity,
        "time/prune_s": result.total_seconds,
        "time/prune_per_layer_s": statistics.median(result.seconds_per_decoder_layer),
        "prune/recon_error_mean": statistics.fmean(errors) if errors else 0.0,
        "prune/recon_error_max": max(errors, default=0.0),
        "prune/cholesky_retries": result.cholesky_retries,
    }
    log.info(
        "%s: %s %s to %.3f sparsity, val ppl %.2f, %.1f s",
        name,
        pcfg.method,
        pcfg.structure,
        report["global"],
        ppl,
        result.total_seconds,
    )
    with atomic_dir(out) as tmp:
        save_checkpoint(
            model,
            source_ckpt.tokenizer,
            tmp,
            provenance(name, cfg, ("project", "prune"), [src, layout.corpus]),
            masks=result.masks,
        )
        atomic_write_json(tmp / "sparsity.json", report)
        atomic_write_json(
            tmp / "prune_layers.json",
            {
                "layers": result.layers,
                "seconds_per_decoder_layer": result.seconds_per_decoder_layer,
                "targets": result.layer_sparsity_targets,
            },
        )
        plot_sparsity(report, tmp / "sparsity.png")
    release_resume(resume)  # the checkpoint is written; the resume state is spent
    return StageResult(
        metrics=metrics,
        outputs=[out],
        variant=f"sparse{round(sparsity * 100)}-oneshot",
        artifacts=[out / "sparsity.json", out / "sparsity.png", out / "prune_layers.json"],
    )
