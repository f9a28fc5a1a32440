"""Tiny checkpoints and data in the shapes and conventions of real Llama families.

What a user brings, made offline in a few seconds:

* ``llama2`` — Llama-2 style: multi-head attention, untied embeddings, a 32,000-token
  SentencePiece-style BPE (``▁`` word marker, byte fallback, ``<unk>``/``<s>``/``</s>`` at
  0/1/2) that prepends ``<s>``, no pad token and no chat template (a base model).
* ``llama3`` — Llama-3.x-Instruct style: grouped-query attention (2 KV heads for 4 query
  heads), ``rope_scaling`` of type ``llama3``, rope theta 500,000, tied embeddings (as in
  Llama-3.2-1B), a 128,256-token byte-level BPE whose special tokens sit at 128,000+ (so token
  files need 32-bit ids), ``<|begin_of_text|>`` prepended, ``<|eot_id|>`` as EOS, a list of EOS
  ids in the model config, and the Llama-3 chat template.

The vocabularies are trained on a little standard-library text and padded to the real sizes
with tokens no text produces, so ids and embedding sizes are the real ones. Data files use the
real datasets' schemas: SlimPajama (jsonl: ``text`` + ``meta``) and The Stack (parquet:
``content``, ``lang``, ``max_stars_repo_path``, ...), GSM8K, Dolly and UltraChat-200k records.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

LLAMA3_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
}
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def stdlib_texts(limit: int = 400) -> tuple[list[str], list[str]]:
    """(prose, code): docstrings/comments and source of standard-library modules, sorted order."""
    from sparsify.data.corpus import extract_prose

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:limit]
    code = [p.read_text(encoding="utf-8", errors="replace")[:6000] for p in files]
    prose = [extract_prose(c)[:3000] for c in code]
    return [p for p in prose if p.strip()], [c for c in code if c.strip()]


def _trained_bpe(texts: list[str], *, byte_level: bool, vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if byte_level:  # Llama-3: byte-level BPE, no unknown token
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # Llama-2 (SentencePiece-converted): spaces become ▁, a ▁ before the text, bytes as fallback
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _with_vocab(tok, vocab: dict[str, int]):
    """The tokenizer with its BPE vocabulary replaced (same merges, which name tokens, not ids)."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def _padded(trained: dict[str, int], head: list[str], size: int) -> dict[str, int]:
    """`head` tokens first, then the trained ones, then fillers no text produces, up to `size` ids."""
    vocab = {t: i for i, t in enumerate(head)}
    for token, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    for i in range(len(vocab), size):
        vocab[f"<unused_{i}>"] = i
    return vocab


def llama2_tokenizer(texts: list[str]):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = _trained_bpe(texts, byte_level=False, vocab_size=800, specials=specials)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = _with_vocab(tok, _padded(tok.get_vocab(), specials + byte_tokens, 32000))
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama3_tokenizer(texts: list[str]):
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    tok = _trained_bpe(texts, byte_level=True, vocab_size=800, specials=[])
    tok = _with_vocab(tok, _padded(tok.get_vocab(), [], 128000))
    names = [LLAMA3_SPECIALS.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, 128256)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])  # ids 128000..128255
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)],
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = LLAMA3_CHAT_TEMPLATE
    return hf


def llama_checkpoint(family: str, out: Path, *, seed: int = 0) -> Path:
    """A tiny random checkpoint of `family` ('llama2' or 'llama3') with its tokenizer, in `out`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    prose, code = stdlib_texts(120)
    texts = prose + code
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        initializer_range=0.05,
    )
    if family == "llama2":
        tokenizer = llama2_tokenizer(texts)
        config = LlamaConfig(
            vocab_size=32000,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    elif family == "llama3":
        tokenizer = llama3_tokenizer(texts)
        config = LlamaConfig(
            vocab_size=128256,
            num_key_value_heads=2,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=True,
            bos_token_id=128000,
            eos_token_id=[128001, 128008, 128009],
            **common,
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_pretraining_files(folder: Path) -> tuple[Path, Path]:
    """SlimPajama-schema jsonl (prose) and The-Stack-schema parquet (Python code)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prose, code = stdlib_texts(400)
    folder.mkdir(parents=True, exist_ok=True)
    slim = folder / "slimpajama.jsonl"
    with slim.open("w", encoding="utf-8") as fh:
        for text in prose:
            fh.write(json.dumps({"text": text, "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}) + "\n")
    stack = folder / "the_stack_python.parquet"
    pq.write_table(
        pa.table(
            {
                "content": code,
                "lang": ["Python"] * len(code),
                "max_stars_repo_path": [f"src/module_{i}.py" for i in range(len(code))],
                "max_stars_repo_name": ["example/repo"] * len(code),
                "size": [len(c) for c in code],
                "ext": ["py"] * len(code),
            }
        ),
        stack,
    )
    return slim, stack


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task_files(folder: Path, n_train: int = 48, n_test: int = 12) -> dict[str, dict[str, str]]:
    """GSM8K, Dolly and UltraChat-200k records in their own schemas; `downstream.data_files` form."""
    from sparsify.data.downstream import generate_arithmetic

    arith = generate_arithmetic(n_train, n_test, seed=1)
    files: dict[str, dict[str, str]] = {}
    for split, records in arith.items():
        rows = [{"question": r["prompt"], "answer": r["target"]} for r in records]
        files.setdefault("gsm8k", {})[split] = str(_jsonl(folder / "gsm8k" / f"{split}.jsonl", rows))
        dolly = [
            {
                "instruction": f"Restate the question. {r['prompt']}",
                "context": "",
                "response": r["prompt"],
                "category": "open_qa",
            }
            for r in records
        ]
        files.setdefault("dolly", {})[split] = str(_jsonl(folder / "dolly" / f"{split}.jsonl", dolly))
        chat = [
            {
                "prompt": r["prompt"],
                "prompt_id": f"{split}-{i}",
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["target"].split("####")[-1].strip()},
                ],
            }
            for i, r in enumerate(records)
        ]
        files.setdefault("ultrachat", {})[split] = str(_jsonl(folder / "ultrachat" / f"{split}.jsonl", chat))
    return files
