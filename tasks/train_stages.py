"""Stages `pretrain<NN>` and `ft-<variant>-<task>`: training that keeps the sparsity masks.

- `pretrain<NN>`: sparse continued pretraining of a pruned checkpoint on the corpus
  blocks, masks held fixed, optionally distilling from the dense base model.
- `pretrain-dense`: the control, the dense base trained on the same extra tokens.
- `ft-dense-<task>`: the dense fine-tune of the base model, the teacher.
- `ft-sparse<NN>-<task>` / `ft-baseline<NN>-<task>`: sparse fine-tuning with
  distillation from that teacher, from the sparse-pretrained model (the paper's
  recipe) or from the dense fine-tuned model pruned afterwards (pruning during
  fine-tuning, the baseline).

Training checkpoints go to `<root>/.resume/<stage>`, so an interrupted stage resumes.
"""

from __future__ import annotations

import logging

import torch

from sparsify.checkpoint import PROVENANCE, load_checkpoint, load_model, load_tokenizer, save_checkpoint
from sparsify.data.corpus import Corpus
from sparsify.data.downstream import get_task, read_task_jsonl
from sparsify.errors import ConfigError
from sparsify.io import atomic_dir, atomic_write_json
from sparsify.model import bf16_supported, pick_device
from sparsify.sparsity.masks import check_masks, sparsity_report
from sparsify.training.sft import SFTDataset
from sparsify.training.trainer import PackedBlocks, TrainConfig, TrainResult, train
from tasks.common import (
    Layout,
    StageResult,
    is_main_process,
    provenance,
    release_resume,
    resume_dir,
    val_perplexities,
)
from tasks.config import Config
from tasks.tracking import live_step_logger

log = logging.getLogger(__name__)


def _train_and_save(
    cfg: Config,
    *,
    name: str,
    source: str,
    output: str,
    teacher: str | None,
    train_cfg: TrainConfig,
    train_data,
    val_data,
    variant: str,
    sections: tuple[str, ...],
) -> tuple[StageResult, object]:
    """Load `source` (+ its masks), train with the masks fixed, save to `output` with the same masks."""
    device = pick_device(cfg.project.device)
    src = cfg.root / source
    source_ckpt = load_checkpoint(src)
    model, masks = source_ckpt.model, source_ckpt.masks
    needs_teacher = train_cfg.kd_kl > 0 or train_cfg.kd_squarehead > 0
    teacher_model = None
    if needs_teacher:
        if teacher is None:
            raise ConfigError(f"{name}: KD weights are set (kd_kl/kd_squarehead) but this stage has no teacher")
        # train.teacher_bf16 on a device with native bf16: read the teacher's weights straight into
        # bf16 (the trainer would cast it anyway; at 7B the fp32 copy alone is 27 GB of host memory).
        bf16 = train_cfg.teacher_bf16 and bf16_supported(device)
        teacher_model = load_model(cfg.root / teacher, dtype=torch.bfloat16 if bf16 else None)
    resume = resume_dir(cfg, name)
    result: TrainResult = train(
        model,
        train_data,
        val_data,
        train_cfg,
        seed=cfg.project.seed,
        masks=masks,
        teacher=teacher_model,
        device=device,
        checkpoint_dir=resume,
        on_step=live_step_logger(),
    )
    model.cpu()
    if masks is not None:
        check_masks(model, masks)  # every stage that writes a model asserts its sparsity
    if not is_main_process():  # torchrun: rank 0 saves
        return StageResult(metrics={}, outputs=[], variant=variant), model
    report = sparsity_report(model, masks)
    out = cfg.root / output
    parents = [src] + ([cfg.root / teacher] if needs_teacher else [])
    with atomic_dir(out) as tmp:
        save_checkpoint(model, source_ckpt.tokenizer, tmp, provenance(name, cfg, sections, parents), masks=masks)
        atomic_write_json(tmp / "train_history.json", {"history": result.history, "evals": result.evals})
    release_resume(resume)  # the checkpoint is written; the resume state is spent
    metrics = {
        "sparsity/global": report["global"],
        "train/final_loss": result.final_train_loss,
        "train/tokens_per_s": result.tokens_per_s,
        "time/train_s": result.seconds,
        "train/resumed_from_step": result.start_step,  # > 0 when an interrupted run continued
    }
    if result.val_loss is not None:
        metrics["train/val_loss"] = result.val_loss
    log.info("%s: trained %d steps in %.0f s, sparsity %.3f", name, result.steps, result.seconds, report["global"])
    return StageResult(
        metrics=metrics,
        outputs=[out],
        variant=variant,
        history=result.history,
        artifacts=[out / PROVENANCE, out / "train_history.json"],
    ), model


def pretrain(cfg: Config, *, name: str, source: str, teacher: str, output: str, variant: str) -> StageResult:
    layout = Layout.of(cfg)
    corpus = Corpus.open(layout.corpus)
    val = corpus.blocks("val")
    tc = cfg.pretrain.train
    result, model = _train_and_save(
        cfg,
        name=name,
        source=source,
        output=output,
        teacher=teacher,
        train_cfg=tc,
        train_data=PackedBlocks(corpus.blocks("train")),
        val_data=PackedBlocks(val),
        variant=variant,
        sections=("project", "pretrain"),
    )
    if is_main_process():
        result.metrics.update(val_perplexities(cfg, model, corpus, pick_device(cfg.project.device)))
    return result


def pretrain_dense_control(cfg: Config, *, name: str, source: str, output: str, levels: int) -> StageResult:
    """The dense base trained on as many extra corpus tokens as the most sparse model saw across the
    `levels` sparse-pretraining stages, with cross-entropy only: what the extra tokens alone buy."""
    layout = Layout.of(cfg)
    corpus = Corpus.open(layout.corpus)
    tc = cfg.pretrain.train.model_copy(
        update={"steps": cfg.pretrain.train.steps * levels, "kd_ce": 1.0, "kd_kl": 0.0, "kd_squarehead": 0.0}
    )
    result, model = _train_and_save(
        cfg,
        name=name,
        source=source,
        output=output,
        teacher=None,
        train_cfg=tc,
        train_data=PackedBlocks(corpus.blocks("train")),
        val_data=PackedBlocks(corpus.blocks("val")),
        variant="dense-control",
        sections=("project", "pretrain", "pipeline"),
    )
    if is_main_process():
        result.metrics.update(val_perplexities(cfg, model, corpus, pick_device(cfg.project.device)))
    return result


def finetune(
    cfg: Config, *, name: str, task: str, source: str, output: str, teacher: str | None, variant: str
) -> StageResult:
    layout = Layout.of(cfg)
    spec = get_task(task)
    tc = cfg.finetune.dense if teacher is None else cfg.finetune.sparse
    tokenizer = load_tokenizer(cfg.root / source)
    records = read_task_jsonl(layout.task_data / task / "train.jsonl")
    # Hold out a slice of the training records for validation loss (the test split is for evaluation).
    n_val = max(1, len(records) // 20)

    def make(rows):
        return SFTDataset.from_records(
            rows, tokenizer, cfg.finetune.max_length, render_prompt=spec.render_prompt, render_target=spec.render_target
        )

    result, _ = _train_and_save(
        cfg,
        name=name,
        source=source,
        output=output,
        teacher=teacher,
        train_cfg=tc,
        train_data=make(records[n_val:]),
        val_data=make(records[:n_val]),
        variant=variant,
        sections=("project", "finetune"),
    )
    return result
