"""Tiny sparse models and a tiny tokenizer for the runtime loader, the engine, the CLI and the server.

The tokenizer is a byte-level BPE (as Llama 3) trained on a little standard-library text, 300
entries plus Llama-3-style special tokens and chat template, so multi-byte characters split
across tokens (what incremental detokenization must get right) and ``eos`` ends a chat turn.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from sparsify.inference.export import save_sparse_model
from sparsify.inference.kernels import load_extension
from sparsify.quant.quantization import QuantScheme, attach_quantization, rtn_quantize
from sparsify.sparsity.masks import prunable_linear_names
from tests.llama_fixtures import LLAMA3_CHAT_TEMPLATE, stdlib_texts

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
VOCAB = 320  # trained entries + specials fit below this


def tiny_tokenizer():
    """A 300-entry byte-level BPE with Llama-3 specials (ids 300..304) and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    prose, code = stdlib_texts(40)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(prose + code, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = LLAMA3_CHAT_TEMPLATE
    assert len(hf) <= VOCAB
    return hf


def tiny_config(**overrides) -> LlamaConfig:
    """2 layers, hidden 64, intermediate 160 (down_proj's rows are not whole 64-bit words), GQA 4/2 heads,
    llama3 rope scaling (the engine must take cos/sin from the model's rotary module)."""
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        initializer_range=0.2,
        bos_token_id=300,
        eos_token_id=304,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**(shape | overrides))


@torch.no_grad()
def sparse_llama(sparsity: float = 0.7, seed: int = 0, **config) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    """A tiny Llama with its decoder Linears pruned per row by magnitude, and the keep-masks."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config)).eval()
    model.generation_config = GenerationConfig(bos_token_id=300, eos_token_id=304)
    masks = {}
    for name in prunable_linear_names(model):
        p = model.get_parameter(name)
        k = int(p.shape[1] * sparsity)
        thr = p.abs().kthvalue(k, dim=1, keepdim=True).values if k else torch.zeros(p.shape[0], 1)
        masks[name] = p.abs() > thr
        p.mul_(masks[name])
    return model, masks


@torch.no_grad()
def quantize_rtn(model: LlamaForCausalLM, masks, scheme: QuantScheme) -> LlamaForCausalLM:
    """A copy with every decoder Linear quantized round-to-nearest (weights + activation hooks)."""
    model = copy.deepcopy(model)
    for name in masks:
        linear = model.get_submodule(name.removesuffix(".weight"))
        q = rtn_quantize(linear.weight.detach(), scheme, mask=masks[name])
        attach_quantization(linear, q.weight, q.codes, q.scales, scheme)
    return model


def write_sparse_folder(model, masks, folder: Path, tokenizer=None) -> Path:
    save_sparse_model(model, masks, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


# Fixtures for the serving tests (a test module imports the ones it uses).


@pytest.fixture(scope="module", autouse=True)
def extension():
    """The kernels, built once per module (None: everything runs on the torch fallback)."""
    return load_extension()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()
