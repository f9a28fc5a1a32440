"""Fine-tuning batches: loss only on targets, truncation keeps the target, record errors, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsify.data.corpus import train_tokenizer
from sparsify.data.downstream import generate_arithmetic, get_task
from sparsify.training.distill import IGNORE_INDEX
from sparsify.training.sft import SFTDataset, fit_length
from sparsify.training.trainer import evaluate, train
from tests.test_trainer import tiny_config, tiny_llama

BOS, EOS, PAD = 1, 2, 0


class CharTokenizer:
    """One token per character (id = ord - 93, so 'a' = 4), a BOS on prompts: easy to read in asserts."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        prefix = [BOS] if add_special_tokens else []
        return {"input_ids": [prefix + [ord(c) - 93 for c in text] for text in texts]}


def ids(text: str) -> list[int]:
    return [ord(c) - 93 for c in text]


def test_labels_cover_the_target_only_with_right_padding():
    data = SFTDataset.from_records(
        [{"id": "0", "prompt": "abc", "target": "de"}, {"id": "1", "prompt": "f", "target": "g"}],
        CharTokenizer(),
        max_length=32,
    )
    batch = data.collate([0, 1])
    assert batch.input_ids.tolist() == [
        [BOS, *ids("abc"), *ids("de"), EOS],
        [BOS, *ids("f"), *ids("g"), EOS, PAD, PAD, PAD],
    ]
    assert batch.labels.tolist() == [
        [IGNORE_INDEX] * 4 + [*ids("de"), EOS],
        [IGNORE_INDEX] * 2 + [*ids("g"), EOS] + [IGNORE_INDEX] * 3,
    ]
    assert batch.attention_mask.tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert batch.n_targets == 5 and batch.n_tokens == 11


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_target():
    prompt, target = [BOS, 10, 11, 12, 13], [20, 21, EOS]
    assert fit_length(prompt, target, 6, keep_prefix=1) == ([BOS, 12, 13, 20, 21, EOS], 3)
    assert fit_length(prompt, target, 8, keep_prefix=1) == ([*prompt, *target], 5)  # fits: unchanged
    assert fit_length(prompt, target, 3, keep_prefix=1) == ([BOS, 20, 21], 1)  # target alone too long
    data = SFTDataset.from_records([{"prompt": "abcdefgh", "target": "xy"}], CharTokenizer(), max_length=6)
    row = data.collate([0])
    assert row.input_ids.tolist() == [[BOS, *ids("gh"), *ids("xy"), EOS]]
    assert row.labels.tolist() == [[IGNORE_INDEX] * 3 + [*ids("xy"), EOS]]


@pytest.mark.parametrize(
    ("record", "field"),
    [({"prompt": "q"}, "target"), ({"target": "a"}, "prompt"), ({"prompt": 3, "target": "a"}, "prompt")],
)
def test_bad_record_names_the_field_and_index(record, field):
    records = [{"prompt": "q", "target": "a"}, record]
    with pytest.raises(ValueError, match=f"record 1: .*field '{field}'"):
        SFTDataset.from_records(records, CharTokenizer(), max_length=16)


def test_sampling_is_a_pure_function_of_seed_step_micro():
    data = SFTDataset.from_records([{"prompt": "p" * i, "target": "t"} for i in range(1, 30)], CharTokenizer(), 64)
    first, again = data.batch(5, 1, 4, seed=3), data.batch(5, 1, 4, seed=3)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.input_ids, data.batch(5, 0, 4, seed=3).input_ids)


def test_templates_render_prompt_and_target():
    data = SFTDataset.from_records(
        [{"prompt": "ab", "target": "c"}],
        CharTokenizer(),
        16,
        render_prompt=lambda r: f"Q{r['prompt']}",
        render_target=lambda r: f" {r['target']}",
        add_eos=False,
    )
    assert data.collate([0]).input_ids.tolist() == [[BOS, *ids("Qab"), *ids(" c")]]


def test_fine_tuning_learns_the_targets(tmp_path):
    """Trainer + SFT batches + a real BPE tokenizer: the target loss falls, masks hold."""
    words = ["red", "green", "blue", "cyan", "black", "white"]
    tok = train_tokenizer([" ".join(words) * 20], vocab_size=300, out_dir=tmp_path / "tok")
    records = [{"id": str(i), "prompt": f"colour {w}:", "target": f" {w[::-1]}"} for i, w in enumerate(words)]
    data = SFTDataset.from_records(records, tok, max_length=24)
    model = tiny_llama(vocab=len(tok))
    name = "model.layers.0.mlp.up_proj.weight"
    masks = {name: torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) > 0.5}
    before = evaluate(model, data, max_rows=6, batch_size=3)
    cfg = tiny_config(steps=30, batch_size=4, grad_accum=1, lr=2e-2, eval_every=30, eval_blocks=6)
    result = train(model, data, data, cfg, seed=0, masks=masks, progress=False)
    assert result.val_loss < before - 1.0, (before, result.val_loss)
    assert torch.count_nonzero(model.get_parameter(name)[~masks[name]]) == 0

    # The validation loss is the mean over target tokens only.
    batch = data.collate(range(6))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    keep = batch.labels[:, 1:] != IGNORE_INDEX
    manual = -logp.gather(-1, batch.labels[:, 1:].clamp_min(0)[..., None])[..., 0][keep].mean()
    assert np.isclose(evaluate(model, data, max_rows=6, batch_size=2), manual.item(), rtol=1e-5)


def test_task_templates_give_the_training_text_evaluation_uses(tmp_path):
    """With a TaskSpec's renderers, the supervised tokens decode to exactly its rendered target."""
    spec = get_task("arithmetic")
    records = generate_arithmetic(n_train=6, n_test=1, seed=0)["train"]
    texts = [spec.render_prompt(r) + spec.render_target(r) for r in records]
    tok = train_tokenizer(texts * 5, vocab_size=300, out_dir=tmp_path / "tok")
    data = SFTDataset.from_records(
        records, tok, max_length=256, render_prompt=spec.render_prompt, render_target=spec.render_target
    )
    batch = data.collate(range(len(records)))
    for row, record in enumerate(records):
        supervised = batch.labels[row] != IGNORE_INDEX
        first = int(supervised.nonzero()[0])
        assert tok.decode(batch.input_ids[row][:first]) == spec.render_prompt(record)
        assert tok.decode(batch.labels[row][supervised]) == spec.render_target(record) + tok.eos_token


def test_target_nll_is_each_targets_log_likelihood_given_its_prompt():
    from sparsify.training.sft import target_nll

    model = tiny_llama().eval()
    records = [
        {"id": "0", "prompt": "abc", "target": "de"},
        {"id": "1", "prompt": "f", "target": "ghij"},
        {"id": "2", "prompt": "klmnop", "target": "q"},
    ]
    data = SFTDataset.from_records(records, CharTokenizer(), max_length=32)
    got = target_nll(model, data, batch_size=2)  # padded batches
    for (nll, n), r in zip(got, records, strict=True):
        prompt, target = [BOS, *ids(r["prompt"])], [*ids(r["target"]), EOS]
        with torch.no_grad():  # brute force: each example alone, no padding, log-softmax by hand
            logp = torch.log_softmax(model(torch.tensor([prompt + target])).logits[0].float(), -1)
        expect = -sum(float(logp[len(prompt) - 1 + k, tok]) for k, tok in enumerate(target))
        assert n == len(target) and nll == pytest.approx(expect, rel=1e-4)
    # Summed and divided by the tokens, it is the mean target loss the trainer's evaluation reports.
    mean = sum(v for v, _ in got) / sum(n for _, n in got)
    assert mean == pytest.approx(evaluate(model, data, max_rows=3, batch_size=3), rel=1e-4)
