"""The training loop: fixed masks, exact resume, config checks on resume, divergence handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from sparsify.evaluation.metrics import mean_nll
from sparsify.sparsity.masks import prunable_linear_names
from sparsify.training import trainer
from sparsify.training.trainer import (
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    PackedBlocks,
    TrainConfig,
    TrainingDiverged,
    bind_masks,
    enforce_masks,
    evaluate,
    mask_gradients,
    train,
)
from tests.conftest import tiny_llama as conftest_tiny_llama

VOCAB = 128


def tiny_llama(seed: int = 0, vocab: int = VOCAB, layers: int = 2) -> LlamaForCausalLM:
    """A ~20k-parameter Llama: big enough to have every module type, fast on one core."""
    return conftest_tiny_llama(seed, vocab_size=vocab, num_hidden_layers=layers, num_key_value_heads=2)


def random_blocks(n: int = 64, length: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n, length), dtype=np.int64)


def half_masks(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random 50% masks on every prunable weight."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {name: torch.rand(params[name].shape, generator=gen) > 0.5 for name in prunable_linear_names(model)}


def tiny_config(**changes) -> TrainConfig:
    base = {
        "steps": 6,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 1e-2,
        "warmup_steps": 2,
        "weight_decay": 0.1,
        "eval_every": 3,
        "eval_blocks": 8,
        "log_every": 1,
    }
    return TrainConfig(**{**base, **changes})


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def kill_at(step: int):
    def on_step(row: dict) -> None:
        if row["step"] == step:
            raise Killed

    return on_step


def test_masks_hold_under_weight_decay_and_momentum(tmp_path):
    model = tiny_llama()
    masks = half_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(
        model,
        random_blocks(),
        None,
        tiny_config(checkpoint_every=6),
        seed=0,
        masks=masks,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    params = dict(model.named_parameters())
    optim = torch.load(tmp_path / OPTIMIZER_FILE, weights_only=True)
    for name, keep in masks.items():
        weight = params[name].detach()
        assert torch.count_nonzero(weight[~keep]) == 0, name
        assert not torch.equal(weight[keep], before[name][keep]), f"{name}: kept weights did not train"
        for moment in ("exp_avg", "exp_avg_sq"):  # Adam's state cannot push pruned weights back
            state = optim["state"][name][moment]
            assert torch.count_nonzero(state[~keep]) == 0, (name, moment)
            assert torch.count_nonzero(state[keep]) > 0, (name, moment)


def test_stale_optimizer_state_cannot_regrow_pruned_weights():
    """Even moments left over from dense training (nonzero where now pruned) do not regrow a weight."""
    layer = torch.nn.Linear(4, 4, bias=False)
    keep = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()  # dense step: moments nonzero everywhere
    bound = [(layer.weight, ~keep)]
    enforce_masks(bound)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(2, 4)).pow(2).sum().backward()
        mask_gradients(bound)
        opt.step()
        enforce_masks(bound, opt)
        assert torch.count_nonzero(layer.weight[~keep]) == 0
        assert torch.count_nonzero(opt.state[layer.weight]["exp_avg"][~keep]) == 0


def test_bad_masks_are_rejected_before_training():
    model = tiny_llama()
    with pytest.raises(ValueError, match="names no parameter"):
        bind_masks(model, {"model.layers.9.mlp.up_proj.weight": torch.ones(64, 32, dtype=torch.bool)})


def test_killed_run_resumes_to_identical_weights_and_loss(tmp_path):
    cfg, blocks = tiny_config(checkpoint_every=2), random_blocks()
    masks = half_masks(tiny_llama())
    full = tiny_llama()
    expected = train(full, blocks, blocks, cfg, seed=7, masks=masks, progress=False, checkpoint_dir=tmp_path / "a")

    with pytest.raises(Killed):  # dies after 5 steps; its last checkpoint holds step 4
        train(
            tiny_llama(),
            blocks,
            blocks,
            cfg,
            seed=7,
            masks=masks,
            progress=False,
            checkpoint_dir=tmp_path / "b",
            on_step=kill_at(4),
        )
    assert json.loads((tmp_path / "b" / STATE_FILE).read_text())["step"] == 4

    fresh = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed = train(fresh, blocks, blocks, cfg, seed=7, masks=masks, progress=False, checkpoint_dir=tmp_path / "b")
    assert resumed.start_step == 4
    for (name, a), b in zip(full.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.final_train_loss == expected.final_train_loss
    assert resumed.history == [
        {**row, "tokens_per_s": row_b["tokens_per_s"]}
        for row, row_b in zip(expected.history, resumed.history, strict=True)
    ]
    assert [e["val_loss"] for e in resumed.evals] == [e["val_loss"] for e in expected.evals]


def test_resume_from_a_different_config_or_masks_is_refused(tmp_path):
    cfg, blocks = tiny_config(steps=2, checkpoint_every=1), random_blocks()
    masks = half_masks(tiny_llama())
    train(tiny_llama(), blocks, None, cfg, seed=0, masks=masks, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"different training configuration.*lr: 0\.01 in the checkpoint, 0\.02"):
        train(
            tiny_llama(),
            blocks,
            None,
            cfg.model_copy(update={"lr": 0.02}),
            seed=0,
            masks=masks,
            progress=False,
            checkpoint_dir=tmp_path,
        )
    with pytest.raises(ValueError, match="seed: 0 in the checkpoint, 1 now"):
        train(tiny_llama(), blocks, None, cfg, seed=1, masks=masks, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different masks"):
        train(
            tiny_llama(),
            blocks,
            None,
            cfg,
            seed=0,
            masks=half_masks(tiny_llama(), seed=2),
            progress=False,
            checkpoint_dir=tmp_path,
        )
    # Logging cadence does not change the trajectory: resuming with it changed is fine.
    train(
        tiny_llama(),
        blocks,
        None,
        cfg.model_copy(update={"log_every": 5}),
        seed=0,
        masks=masks,
        progress=False,
        checkpoint_dir=tmp_path,
    )


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_llama()

    def poison(row: dict) -> None:  # after step index 4 (5 steps; checkpoint at 4): every output turns NaN
        if row["step"] == 4:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*last good checkpoint \(step 4\)"):
        train(
            model,
            random_blocks(),
            None,
            tiny_config(steps=8, checkpoint_every=2),
            seed=0,
            progress=False,
            checkpoint_dir=tmp_path,
            on_step=poison,
        )
    assert json.loads((tmp_path / STATE_FILE).read_text())["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / WEIGHTS_FILE).values())


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    class Overflowing(torch.optim.AdamW):
        """An update that overflows (as a low-precision step can) while loss and gradients were finite."""

        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")

    monkeypatch.setattr(trainer, "make_optimizer", lambda model, cfg: Overflowing(model.parameters(), lr=cfg.lr))
    with pytest.raises(TrainingDiverged, match="weights became non-finite at step 0.*no checkpoint was written"):
        train(
            tiny_llama(),
            random_blocks(),
            None,
            tiny_config(steps=2, checkpoint_every=1),
            seed=0,
            progress=False,
            checkpoint_dir=tmp_path / "ck",
        )
    assert not (tmp_path / "ck").exists()


def test_packed_blocks_are_a_pure_function_of_seed_step_micro():
    source = PackedBlocks(random_blocks())
    a, b = source.batch(3, 1, 4, seed=5), source.batch(3, 1, 4, seed=5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, a.input_ids)
    assert not torch.equal(a.input_ids, source.batch(3, 0, 4, seed=5).input_ids)
    assert a.n_targets == 4 * 15 and a.shard(1, 2).input_ids.shape == (2, 16)


def test_kd_weights_need_a_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        train(tiny_llama(), random_blocks(), None, tiny_config(kd_kl=1.0), seed=0, progress=False)
    with pytest.raises(ValueError, match="at least one of kd_ce"):
        tiny_config(kd_ce=0.0)


def test_bf16_autocast_trains_and_keeps_masks():
    model = tiny_llama()
    masks = half_masks(model)
    result = train(model, random_blocks(), None, tiny_config(steps=3, bf16=True), seed=0, masks=masks, progress=False)
    assert all(np.isfinite(row["loss"]) for row in result.history)
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.float32 and torch.count_nonzero(params[n][~m]) == 0 for n, m in masks.items())


def test_bf16_auto_resolves_to_the_device_and_is_recorded(tmp_path, monkeypatch):
    """train.bf16='auto' means bf16 autocast exactly where the device has native bf16; the checkpoint
    records the resolved choice, so a resume on another kind of machine is refused, not silently mixed."""
    real = trainer._autocast
    for native in (True, False):
        monkeypatch.setattr(trainer, "bf16_supported", lambda device, native=native: native)
        seen = []
        monkeypatch.setattr(
            trainer, "_autocast", lambda device, enabled, seen=seen: seen.append(enabled) or real(device, enabled)
        )
        ckpt = tmp_path / f"native-{native}"
        train(
            tiny_llama(),
            random_blocks(),
            None,
            tiny_config(steps=2, bf16="auto", checkpoint_every=2),
            seed=0,
            progress=False,
            checkpoint_dir=ckpt,
        )
        assert seen == [native]
        assert json.loads((ckpt / STATE_FILE).read_text())["config"]["bf16"] is native
    with pytest.raises(ValueError, match="different training configuration"):  # bf16 then, fp32 now
        train(
            tiny_llama(),
            random_blocks(),
            None,
            tiny_config(steps=2, bf16="auto", checkpoint_every=2),
            seed=0,
            progress=False,
            checkpoint_dir=tmp_path / "native-True",
        )


def test_validation_loss_on_blocks_is_mean_nll():
    model, blocks = tiny_llama(), random_blocks()
    got = evaluate(model, PackedBlocks(blocks), max_rows=10, batch_size=4)
    assert got == pytest.approx(mean_nll(model, blocks, max_blocks=10, batch_size=4), rel=1e-6)


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_training():
    """Same losses and weights with and without it; with it, each decoder layer's forward runs again in backward."""
    runs = {}
    for checkpointing in (False, True):
        model = tiny_llama()
        calls = [0]
        for layer in model.model.layers:
            # HF checkpoints a layer's forward (its own hooks stay outside), and the recomputation may stop
            # once it has what backward needs: count calls of the layer's first module.
            layer.input_layernorm.register_forward_pre_hook(lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))
        result = train(
            model,
            random_blocks(),
            None,
            tiny_config(steps=3, gradient_checkpointing=checkpointing),
            seed=0,
            progress=False,
        )
        assert not model.is_activation_checkpointing  # the caller gets the model back as it gave it
        runs[checkpointing] = (result, model, calls[0])
    (plain, plain_model, plain_calls), (ckpt, ckpt_model, ckpt_calls) = runs[False], runs[True]
    assert ckpt_calls == 2 * plain_calls  # 3 steps × 2 micro-batches × 2 layers, recomputed once each
    assert [r["loss"] for r in ckpt.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-6)
    for (name, a), b in zip(plain_model.state_dict().items(), ckpt_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_teacher_in_bf16_without_gradients_where_supported(caplog):
    student, teacher = tiny_llama(), tiny_llama(seed=1)
    result = train(
        student,
        random_blocks(),
        None,
        tiny_config(steps=2, kd_kl=1.0, teacher_bf16=True),
        seed=0,
        teacher=teacher,
        progress=False,
    )
    assert all(np.isfinite(row["loss"]) and np.isfinite(row["kl"]) for row in result.history)
    assert not any(p.requires_grad for p in teacher.parameters())
    expected = torch.bfloat16 if trainer.bf16_supported(torch.device("cpu")) else torch.float32
    assert {p.dtype for p in teacher.parameters()} == {expected}
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_bf16_is_not_native_under_avx2_caps(monkeypatch):
    """An AVX-512 machine capped to AVX2 (ATEN_CPU_CAPABILITY, or oneDNN's ISA cap below its bf16
    level) emulates bf16, so "auto" must choose fp32 there, as on a real AVX2-only CPU."""
    from sparsify import model as model_mod

    cpu = torch.device("cpu")
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    uncapped = model_mod.bf16_supported(cpu)
    flags = Path("/proc/cpuinfo").read_text()
    assert uncapped == (
        ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not model_mod.bf16_supported(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert model_mod.bf16_supported(cpu) == uncapped
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not model_mod.bf16_supported(cpu)
