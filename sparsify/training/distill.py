"""Training objectives: cross-entropy and knowledge distillation from a frozen teacher.

Sparse fine-tuning recovers accuracy best when the sparse student also learns from a
dense fine-tuned teacher (Agarwalla et al. 2024, after Kurtic et al. 2023). The
objective of one optimizer step is

    kd_ce · CE(student, labels)
  + kd_kl · KL(softmax(z_t / T) ‖ softmax(z_s / T)) · T²          (Hinton et al. 2015)
  + kd_squarehead · mean_l MSE(h_s^l, h_t^l) / MSE(h_t^l, 0)      (SquareHead, Kurtic et al. 2023)

Every term uses only the *target positions*: position t whose output predicts a
supervised token (``labels[:, t + 1] != -100``), so prompt and padding tokens of
fine-tuning batches never contribute, to any term.

Reductions. CE and KL are returned as sums over target positions: the trainer divides
them by the number of target tokens in the whole global batch, the one normalization
under which gradient accumulation and data parallelism give exactly the gradient of a
single big batch. SquareHead is a ratio of means that does not decompose over tokens;
like Kurtic et al.'s implementation it is computed per (local) micro-batch, and each
micro-batch's value is weighted by its share of the batch's target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify.errors import ConfigError

#: Label value that excludes a position from every loss (the Hugging Face convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class KDWeights:
    """Weights of the objective's terms and the distillation temperature."""

    ce: float = 1.0
    kl: float = 0.0
    squarehead: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if min(self.ce, self.kl, self.squarehead) < 0 or self.ce + self.kl + self.squarehead <= 0:
            raise ConfigError(f"loss weights must be >= 0 with at least one > 0, got {self}")
        if self.temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}")

    @classmethod
    def from_config(cls, cfg: Any) -> KDWeights:
        """From a `TrainConfig` (its ``kd_*`` fields)."""
        return cls(cfg.kd_ce, cfg.kd_kl, cfg.kd_squarehead, cfg.kd_temperature)

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.squarehead > 0

    @property
    def needs_hidden_states(self) -> bool:
        return self.squarehead > 0


def target_positions(labels: Tensor) -> Tensor:
    """Bool ``[B, T-1]``: whether the output at position t predicts a supervised token.

    A causal LM's output at t predicts token t+1, so ``logits[:, :-1]`` line up with
    ``labels[:, 1:]`` (the same shift Hugging Face applies inside its loss).
    """
    return labels[:, 1:] != IGNORE_INDEX


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy (nats) over target positions, computed in fp32."""
    shifted = logits[:, :-1].flatten(0, 1).float()
    return F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def kl_divergence_sum(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Σ over target positions of KL(softmax(z_t/T) ‖ softmax(z_s/T)) · T².

    The teacher's softened distribution is the target (forward KL). Softening by T
    shrinks the gradients by 1/T², so the T² factor keeps the term's scale independent
    of the temperature (Hinton et al. 2015).
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher logits have {teacher_logits.shape[-1]} classes but the student's have "
            f"{student_logits.shape[-1]}: distillation needs the same vocabulary"
        )
    valid = target_positions(labels)
    log_s = F.log_softmax(student_logits[:, :-1][valid].float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits[:, :-1][valid].float() / temperature, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = Σ p (log p − log q)
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum") * temperature**2


def squarehead_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], labels: Tensor) -> Tensor:
    """SquareHead: the mean over layers of MSE(h_s, h_t) / MSE(h_t, 0) at target positions.

    Dividing each layer's error by the teacher's mean square makes the term scale-free,
    so layers with large activations (typically the deep ones) do not dominate.
    Returns 0 (with a graph) when the batch has no target position.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"SquareHead needs as many layers in student ({len(student_hidden)}) as in teacher ({len(teacher_hidden)})"
        )
    valid = target_positions(labels)
    if not bool(valid.any()):
        return student_hidden[0].sum() * 0.0
    ratios = []
    for h_s, h_t in zip(student_hidden, teacher_hidden, strict=True):
        s = h_s[:, :-1][valid].float()
        t = h_t[:, :-1][valid].float()
        # clamp: a teacher layer that is exactly zero at every position would divide by zero
        ratios.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(ratios).mean()


def layer_outputs(output: Any) -> tuple[Tensor, ...]:
    """The decoder layers' outputs from an HF output with ``hidden_states`` (embeddings dropped).

    In transformers 5 the last entry is the final layer's output after the final norm,
    i.e. what ``lm_head`` sees.
    """
    if output.hidden_states is None:
        raise ValueError("SquareHead needs hidden states: call the model with output_hidden_states=True")
    return tuple(output.hidden_states[1:])


def objective(
    student_out: Any,
    teacher_out: Any | None,
    labels: Tensor,
    weights: KDWeights,
    n_targets: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch's share of the step's loss, and its terms (detached) for logging.

    ``n_targets`` is the number of target tokens in the step's whole global batch; with
    that normalizer the shares of all micro-batches (and ranks) add up to token means
    over the global batch. ``student_out``/``teacher_out`` are HF causal-LM outputs.
    """
    if weights.needs_teacher and teacher_out is None:
        raise ValueError("kd_kl/kd_squarehead > 0 need teacher outputs")
    norm = max(float(n_targets), 1.0)
    terms: dict[str, Tensor] = {}
    if weights.ce > 0:
        terms["ce"] = cross_entropy_sum(student_out.logits, labels) / norm
    if weights.kl > 0:
        terms["kl"] = kl_divergence_sum(student_out.logits, teacher_out.logits, labels, weights.temperature) / norm
    if weights.squarehead > 0:
        share = float(target_positions(labels).sum()) / norm
        terms["squarehead"] = squarehead_loss(layer_outputs(student_out), layer_outputs(teacher_out), labels) * share
    scale = {"ce": weights.ce, "kl": weights.kl, "squarehead": weights.squarehead}
    total = sum(scale[name] * value for name, value in terms.items())  # not empty: KDWeights has a weight > 0
    return total, {name: value.detach() for name, value in terms.items()}


def check_teacher(student: nn.Module, teacher: nn.Module, weights: KDWeights) -> None:
    """Raise ValueError before any work when the teacher cannot teach this student.

    KL needs the same vocabulary (logits compared class by class); SquareHead needs the
    same number of layers and hidden size (hidden states compared element by element).
    """
    s_cfg, t_cfg = student.config, teacher.config
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise ConfigError(
            f"teacher vocabulary ({t_cfg.vocab_size} tokens) differs from the student's "
            f"({s_cfg.vocab_size}): distill from a teacher with the student's tokenizer"
        )
    if weights.squarehead > 0:
        s_shape = (s_cfg.num_hidden_layers, s_cfg.hidden_size)
        t_shape = (t_cfg.num_hidden_layers, t_cfg.hidden_size)
        if s_shape != t_shape:
            raise ConfigError(
                f"SquareHead needs the same (layers, hidden size) in teacher {t_shape} "
                f"and student {s_shape}; set kd_squarehead=0 for this teacher"
            )


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher is a fixed target."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
