"""Distillation losses against hand-computed values; the teacher's checks and freezing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparsify.training.distill import (
    IGNORE_INDEX,
    KDWeights,
    check_teacher,
    cross_entropy_sum,
    kl_divergence_sum,
    objective,
    squarehead_loss,
)
from sparsify.training.trainer import train
from tests.test_trainer import random_blocks, tiny_config, tiny_llama


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.fixture()
def case():
    """Logits/hidden states for 2 sequences of 4 tokens: 3 targets, then 1 (prompt and padding hidden)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([[IGNORE_INDEX, 4, 3, 1], [IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX]])
    return SimpleNamespace(
        labels=labels,
        # output position t predicts labels[:, t+1]
        positions=[(0, 0), (0, 1), (0, 2), (1, 1)],
        student=torch.randn(2, 4, 5, generator=gen) * 2,
        teacher=torch.randn(2, 4, 5, generator=gen) * 2,
        hs=[torch.randn(2, 4, 3, generator=gen) for _ in range(2)],
        ht=[torch.randn(2, 4, 3, generator=gen) * 3 for _ in range(2)],
    )


def test_cross_entropy_matches_hand_computation(case):
    logp = _log_softmax(case.student.numpy())
    expected = -sum(logp[b, t, case.labels[b, t + 1]] for b, t in case.positions)
    assert cross_entropy_sum(case.student, case.labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_with_temperature_matches_hand_computation(case, temperature):
    log_q = _log_softmax(case.student.numpy() / temperature)  # student
    log_p = _log_softmax(case.teacher.numpy() / temperature)  # teacher: the target distribution
    expected = sum(float((np.exp(log_p[b, t]) * (log_p[b, t] - log_q[b, t])).sum()) for b, t in case.positions)
    got = kl_divergence_sum(case.student, case.teacher, case.labels, temperature).item()
    assert got == pytest.approx(expected * temperature**2, rel=1e-5)
    assert kl_divergence_sum(case.teacher, case.teacher, case.labels, temperature).item() == pytest.approx(0, abs=1e-6)


def test_squarehead_matches_hand_computation(case):
    ratios = []
    for s, t in zip(case.hs, case.ht, strict=True):
        s_rows = np.stack([s.numpy()[b, p] for b, p in case.positions])
        t_rows = np.stack([t.numpy()[b, p] for b, p in case.positions])
        ratios.append(((s_rows - t_rows) ** 2).mean() / (t_rows**2).mean())
    got = squarehead_loss(case.hs, case.ht, case.labels).item()
    assert got == pytest.approx(float(np.mean(ratios)), rel=1e-5)
    assert squarehead_loss(case.ht, case.ht, case.labels).item() == 0.0


def test_positions_without_a_label_never_count(case):
    """Changing student outputs where the next token has no label (prompt, padding) changes no loss."""
    student, hs = case.student.clone(), [h.clone() for h in case.hs]
    for b, t in [(0, 3), (1, 0), (1, 2), (1, 3)]:
        student[b, t] += 100.0
        for h in hs:
            h[b, t] -= 50.0
    assert cross_entropy_sum(student, case.labels) == cross_entropy_sum(case.student, case.labels)
    assert kl_divergence_sum(student, case.teacher, case.labels, 2.0) == kl_divergence_sum(
        case.student, case.teacher, case.labels, 2.0
    )
    assert squarehead_loss(hs, case.ht, case.labels) == squarehead_loss(case.hs, case.ht, case.labels)


def test_micro_batch_shares_add_up_to_the_whole_batch(case):
    """Normalized by the global target count, the shares of micro-batches with different numbers
    of targets sum to the token mean of the whole batch (what makes accumulation and DDP exact)."""
    weights = KDWeights(ce=0.7, kl=0.3, temperature=2.0)

    def out(logits):
        return SimpleNamespace(logits=logits, hidden_states=None)

    n = int((case.labels[:, 1:] != IGNORE_INDEX).sum())
    whole, _ = objective(out(case.student), out(case.teacher), case.labels, weights, n)
    rows = [slice(0, 1), slice(1, 2)]  # one sequence per micro-batch: 3 and 1 of the n = 4 targets
    parts = [objective(out(case.student[r]), out(case.teacher[r]), case.labels[r], weights, n)[0] for r in rows]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-6)
    expected = (
        0.7 * cross_entropy_sum(case.student, case.labels)
        + 0.3 * kl_divergence_sum(case.student, case.teacher, case.labels, 2.0)
    ) / n
    assert whole.item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_with_another_vocabulary_is_refused():
    student, teacher = tiny_llama(), tiny_llama(vocab=96)
    with pytest.raises(ValueError, match=r"teacher vocabulary \(96 tokens\) differs from the student's \(128\)"):
        check_teacher(student, teacher, KDWeights(kl=1.0))
    with pytest.raises(ValueError, match="teacher vocabulary"):
        train(student, random_blocks(), None, tiny_config(kd_kl=1.0), seed=0, teacher=teacher, progress=False)
    with pytest.raises(ValueError, match="same vocabulary"):
        kl_divergence_sum(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6), torch.zeros(1, 3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="SquareHead needs the same"):
        check_teacher(student, tiny_llama(layers=3), KDWeights(squarehead=1.0))


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_teacher_runs_frozen_and_only_when_a_kd_weight_is_set():
    blocks = random_blocks()
    teacher = tiny_llama(seed=9)
    calls = _count_calls(teacher)
    train(tiny_llama(), blocks, None, tiny_config(steps=2), seed=0, teacher=teacher, progress=False)
    assert calls[0] == 0  # kd_kl = kd_squarehead = 0: never run

    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    teacher.train()
    cfg = tiny_config(steps=8, kd_ce=0.0, kd_kl=1.0, kd_squarehead=1.0, kd_temperature=2.0, warmup_steps=0)
    result = train(tiny_llama(), blocks, None, cfg, seed=0, teacher=teacher, progress=False)
    assert calls[0] == cfg.steps * cfg.grad_accum
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    first, last = result.history[0], result.history[-1]
    assert set(first) >= {"loss", "kl", "squarehead"} and "ce" not in first
    assert last["kl"] < first["kl"] and last["squarehead"] < first["squarehead"]  # the student moves toward it
