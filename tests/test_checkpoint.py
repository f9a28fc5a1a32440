"""One checkpoint folder: what a stage writes (model, tokenizer, masks, provenance) loads back whole, locally."""

from __future__ import annotations

import pytest
import torch

from sparsify.checkpoint import (
    MASKS,
    PROVENANCE,
    load_checkpoint,
    load_model,
    load_tokenizer,
    save_checkpoint,
)
from sparsify.errors import DataError, ModelLoadError
from tests.conftest import tiny_llama


def word_tokenizer(**specials):
    """A word-level tokenizer over ``<unk> </s> w0..w99``; ``specials`` as PreTrainedTokenizerFast takes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(["<unk>", "</s>", *(f"w{i}" for i in range(100))])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials)


def _masks(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters() if n.endswith("proj.weight")
    }


def test_a_saved_checkpoint_loads_back_whole(tmp_path):
    model = tiny_llama()
    masks = _masks(model)
    provenance = {"stage": "prune50", "parents": ["models/base"]}
    save_checkpoint(model, word_tokenizer(eos_token="</s>"), tmp_path, provenance, masks=masks)
    assert (tmp_path / MASKS).is_file() and (tmp_path / PROVENANCE).is_file()

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == tmp_path and not ckpt.model.training
    assert torch.equal(ckpt.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert ckpt.tokenizer("w1 w7").input_ids == [3, 9]
    assert ckpt.masks.keys() == masks.keys() and all(torch.equal(ckpt.masks[k], masks[k]) for k in masks)
    assert ckpt.provenance == provenance

    bf16 = load_checkpoint(tmp_path, dtype=torch.bfloat16).model  # read straight into bf16 (a 7B teacher)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())


def test_a_dense_folder_the_pipeline_did_not_write_has_no_masks_nor_provenance(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    word_tokenizer(eos_token="</s>").save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.masks is None and ckpt.provenance is None


def test_load_errors_name_the_path_and_the_cause(tmp_path):
    with pytest.raises(ModelLoadError, match=f"cannot load checkpoint {tmp_path / 'absent'}: not a directory"):
        load_checkpoint(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"cannot load checkpoint {tmp_path}: .+"):
        load_model(tmp_path)
    good = tmp_path / "good"
    save_checkpoint(tiny_llama(), word_tokenizer(eos_token="</s>"), good, {"stage": "base"})
    (good / PROVENANCE).write_text('{"stage": ')
    with pytest.raises(DataError, match=f"{good / PROVENANCE} is unreadable"):
        load_checkpoint(good)


def test_the_tokenizer_pads_with_eos_and_needs_one(tmp_path):
    word_tokenizer(eos_token="</s>").save_pretrained(tmp_path / "eos")
    tok = load_tokenizer(tmp_path / "eos")
    assert tok.pad_token_id == tok.eos_token_id == 1  # batches pad with EOS when the tokenizer names no pad
    word_tokenizer().save_pretrained(tmp_path / "no-eos")
    with pytest.raises(DataError, match="has no EOS token"):
        load_tokenizer(tmp_path / "no-eos")


def test_the_tokenizer_is_searched_in_the_fallbacks_locally(tmp_path):
    word_tokenizer(eos_token="</s>").save_pretrained(tmp_path)
    (tmp_path / "sparse").mkdir()  # the runtime's <output>/sparse borrows <output>'s tokenizer
    assert load_tokenizer(tmp_path / "sparse", tmp_path)("w0").input_ids == [2]
    with pytest.raises(ModelLoadError, match=r"no tokenizer found in .*sparse, .*org/model \(not a directory\)"):
        load_tokenizer(tmp_path / "sparse", "org/model")  # a hub id: never fetched unless hub=True
