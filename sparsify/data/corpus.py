"""Pretraining-data subsetting: mix sources by weight under a token budget, dedup, split, pack.

The paper pretrains on a SparsePajama subset mixed with Python from The Stack.
`build_corpus` does that for any sources, streaming: documents are read one at a
time, tokenized in small batches and appended to flat token files, so peak memory
does not grow with the corpus (only the exact-dedup digest set does, 16 bytes a
document). The sources are interleaved document by document, so any prefix of a split
is a sample of the whole mix.

Outputs (in `out_dir`):
  train.bin / val.bin    flat token streams (uint16 or uint32), each document framed as the
                         tokenizer frames a text (BOS for Llama) and ended by EOS; block i of
                         size B is tokens[i*B:(i+1)*B] (memory-mappable)
  spans.json             which source wrote each run of tokens, per split
  calib.safetensors      `input_ids` [calib_samples, calib_seq_len] sampled from train
  tokenizer/             an HF tokenizer (trained byte-level BPE, or the base model's)
  meta.json, stats.json  layout and per-source/per-split counts
"""

from __future__ import annotations

import ast
import collections
import glob as globlib
import hashlib
import io
import json
import logging
import random
import resource
import sysconfig
import time
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sparsify.checkpoint import load_tokenizer
from sparsify.config import Section
from sparsify.errors import DataError
from sparsify.io import atomic_write_json, jsonl_objects

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZE_BATCH = 64
SPANS_FILE = "spans.json"
# The trained BPE's chat format: plain "role: content" lines, the transcript format the chat
# task used before tokenizers carried templates. A real checkpoint's tokenizer brings its own.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class SourceConfig(Section):
    """One corpus source. `kind` selects how documents are read."""

    name: str = Field(min_length=1)
    kind: Literal["stdlib_code", "stdlib_prose", "files", "hf"]
    weight: float = Field(gt=0)
    glob: str | None = None  # files: e.g. "corpus/**/*.txt" (.jsonl files: one record a line)
    path: str | None = None  # hf: dataset name, or a builder such as "json"
    config_name: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    text_field: str = "text"  # hf and .jsonl files
    max_doc_chars: int = Field(default=200_000, gt=0)  # longer documents are truncated

    @model_validator(mode="after")
    def _needs_location(self) -> SourceConfig:
        if self.kind == "files" and not self.glob:
            raise ValueError(f"source '{self.name}': kind 'files' needs 'glob'")
        if self.kind == "hf" and not self.path:
            raise ValueError(f"source '{self.name}': kind 'hf' needs 'path' (a dataset name)")
        return self


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    train_tokens: int = Field(gt=0)
    val_tokens: int = Field(gt=0)
    val_fraction: float = Field(default=0.05, gt=0, lt=1)  # share of documents hashed to validation
    block_size: int = Field(default=256, ge=8)
    # None: the base checkpoint's own tokenizer (base.source), or a byte-level BPE trained on the corpus
    # for the embedded default. Another tokenizer than base.source's is an error.
    tokenizer: str | None = None
    vocab_size: int = Field(default=4096, ge=300, le=65535)
    tokenizer_train_chars: int = Field(default=8_000_000, gt=0)
    calib_samples: int = Field(default=128, gt=0)
    calib_seq_len: int = Field(default=256, gt=0)
    dedup: bool = True
    shuffle_buffer: int = Field(default=10_000, gt=0)  # hf streaming shuffle buffer

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return v


# --------------------------------------------------------------------------- sources


def stdlib_files(seed: int) -> list[Path]:
    """The running interpreter's standard-library `.py` files, in a seeded order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    return files


def extract_prose(source: str) -> str:
    """Docstrings and comments of a Python file, as one prose document (blank-line separated)."""
    pieces: list[str] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                pieces.append(doc.strip())
    comments: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith("!"):
                    comments.append(text)
            elif tok.type in (tokenize.NEWLINE, tokenize.NL) and comments and tok.line.strip() == "":
                pieces.append(" ".join(comments))
                comments = []
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    if comments:
        pieces.append(" ".join(comments))
    return "\n\n".join(p for p in pieces if len(p) > 1)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _iter_files(src: SourceConfig, seed: int) -> Iterator[str]:
    paths = sorted(Path(p) for p in globlib.glob(src.glob, recursive=True) if Path(p).is_file())
    if not paths:
        raise DataError(f"source '{src.name}': glob {src.glob!r} matched no files")
    random.Random(seed).shuffle(paths)
    for path in paths:
        if path.suffix == ".jsonl":
            yield from _jsonl_texts(path, src)
        else:
            raw = path.read_bytes()
            if b"\0" in raw[:8192]:  # text has no NUL bytes; decoding with 'replace' would feed garbage on
                raise DataError(
                    f"source '{src.name}': {path} is a binary file (glob {src.glob!r}); narrow the glob to text files"
                )
            yield raw.decode("utf-8", errors="replace")


def _jsonl_texts(path: Path, src: SourceConfig) -> Iterator[str]:
    """The text field of each record of a JSONL file, streamed; a line that is not a JSON object is a DataError."""
    lineno = 0
    with path.open(encoding="utf-8") as f:
        try:
            for lineno, record in jsonl_objects(f, f"source '{src.name}': {path}"):
                yield _field(record, src, f"{path}:{lineno}")
        except UnicodeDecodeError as err:
            raise DataError(f"source '{src.name}': {path} (after line {lineno}) is not UTF-8 text: {err}") from None


def _field(record: dict, src: SourceConfig, where: str) -> str:
    if src.text_field not in record:
        raise DataError(
            f"source '{src.name}': record {where} has no field {src.text_field!r} "
            f"(fields: {sorted(record)}); set text_field"
        )
    return str(record[src.text_field] or "")


def _iter_hf(src: SourceConfig, seed: int, shuffle_buffer: int) -> Iterator[str]:
    import datasets  # heavy import, only for this source kind

    kwargs = {"data_files": src.data_files} if src.data_files else {}
    try:
        ds = datasets.load_dataset(src.path, src.config_name, split=src.split, streaming=True, **kwargs)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        raise DataError(f"source '{src.name}': cannot open dataset {src.path!r}: {exc}") from exc
    for i, record in enumerate(ds.shuffle(seed=seed, buffer_size=shuffle_buffer)):
        yield _field(record, src, f"#{i}")


def iter_source(src: SourceConfig, seed: int, shuffle_buffer: int = 10_000) -> Iterator[str]:
    """Documents of one source, deterministic for a seed; raises DataError if it yields nothing."""
    if src.kind == "stdlib_code":
        docs: Iterable[str] = (_read_text(p) for p in stdlib_files(seed))
    elif src.kind == "stdlib_prose":
        docs = (extract_prose(_read_text(p)) for p in stdlib_files(seed))
    elif src.kind == "files":
        docs = _iter_files(src, seed)
    elif src.kind == "hf":
        docs = _iter_hf(src, seed, shuffle_buffer)
    else:  # guarded by the config's Literal; kept for direct library use
        raise DataError(f"source '{src.name}': unknown kind {src.kind!r}")
    n = 0
    for doc in docs:
        doc = doc[: src.max_doc_chars]
        if doc.strip():
            n += 1
            yield doc
    if n == 0:
        where = f", glob {src.glob!r}" if src.kind == "files" else ""
        raise DataError(f"source '{src.name}' ({src.kind}{where}) yielded no non-empty documents")


# --------------------------------------------------------------------------- split, dedup


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


def split_of(text_digest: bytes, val_fraction: float) -> str:
    """Train/validation by document hash: the same document always lands in the same split."""
    u = int.from_bytes(text_digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def quotas(sources: list[SourceConfig], total: int) -> dict[str, int]:
    """Split a token budget by normalized weight, summing exactly to `total`."""
    wsum = sum(s.weight for s in sources)
    raw = {s.name: total * s.weight / wsum for s in sources}
    out = {k: int(v) for k, v in raw.items()}
    # Largest remainders get the leftover tokens so the sum is exact.
    for name in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: total - sum(out.values())]:
        out[name] += 1
    return out


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE on `texts` and save it as an HF tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


def check_tokenizer_for_model(tokenizer, model_source: str | Path, *, tokenizer_name: str = "data.tokenizer") -> None:
    """Raise DataError unless `tokenizer` writes ids that mean to the model what they meant in training.

    Two checks: every id the tokenizer can emit has a row in the model's embedding, and, when
    the checkpoint ships a tokenizer of its own, both map every token to the same id. A
    different tokenizer of a plausible size is the silent failure: every number comes out
    wrong and nothing says so.
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(model_source))
    except (OSError, ValueError) as exc:
        raise DataError(f"base.source {model_source}: cannot read its config: {exc}") from exc
    rows = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 0)
    bound = vocab_bound(tokenizer)
    if bound > rows:
        raise DataError(
            f"{tokenizer_name} emits token ids up to {bound - 1}, but base.source {model_source} has "
            f"an embedding of {rows} rows: they are not the same tokenizer; leave data.tokenizer "
            "unset to use the model's own"
        )
    try:
        own = AutoTokenizer.from_pretrained(str(model_source))
    except (OSError, ValueError):
        return  # a checkpoint without tokenizer files: the size check is all we can do
    ours, theirs = tokenizer.get_vocab(), own.get_vocab()
    if ours != theirs:
        differ = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))
        example = differ[0]
        raise DataError(
            f"{tokenizer_name} is not base.source {model_source}'s tokenizer: {len(differ):,} tokens "
            f"have other ids (e.g. {example!r}: {ours.get(example)} vs {theirs.get(example)}); "
            "leave data.tokenizer unset to use the model's own"
        )


def _tokenizer_texts(cfg: DataConfig, seed: int) -> Iterator[str]:
    """Train-split documents for tokenizer training, each source by weight up to the char budget."""
    wsum = sum(s.weight for s in cfg.sources)
    for src in cfg.sources:
        budget = int(cfg.tokenizer_train_chars * src.weight / wsum)
        for doc in iter_source(src, seed, cfg.shuffle_buffer):
            if budget <= 0:
                break
            if split_of(digest(doc), cfg.val_fraction) == "train":
                budget -= len(doc)
                yield doc


# --------------------------------------------------------------------------- packing


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def vocab_bound(tokenizer) -> int:
    """One past the largest token id the tokenizer can emit.

    Usually ``len(tokenizer)``, but a vocabulary with gaps (special tokens placed at fixed high
    ids) can emit ids beyond it; the token files' dtype and the embedding-size check need the bound.
    """
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (Llama: its BOS), or [] when it adds none.

    Found by encoding a probe with and without special tokens rather than read from flags:
    what matters is what the model saw in pretraining, and that is what its tokenizer does.
    """
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n <= 0 or with_special[n:] != plain:
        return []
    return list(with_special[:n])


class TokenWriter:
    """Appends token arrays to a flat binary file; counts what it wrote and which source wrote it."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.count = path, dtype, 0
        self.spans: list[list[int]] = []  # [source index, start, end): contiguous runs of one source
        self.max_id = -1
        self._f = path.open("wb")

    def write(self, ids: np.ndarray, source: int = 0) -> None:
        top = int(ids.max()) if len(ids) else -1
        if top > np.iinfo(self.dtype).max:
            raise DataError(f"token id {top} does not fit the corpus dtype {self.dtype.name}")
        self._f.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        if self.spans and self.spans[-1][0] == source and self.spans[-1][2] == self.count:
            self.spans[-1][2] += len(ids)
        else:
            self.spans.append([source, self.count, self.count + len(ids)])
        self.count += len(ids)
        self.max_id = max(self.max_id, top)

    def close(self) -> None:
        self._f.close()


def read_tokens(path: Path, dtype: str | np.dtype) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


@dataclass
class SourceStats:
    docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    duplicates: int = 0
    truncated_docs: int = 0


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _Stream:
    """One source being written: its documents, tokenized a batch at a time and queued per split,
    and what it still owes each split."""

    index: int
    src: SourceConfig
    batches: Iterator[list[str]]
    want: dict[str, int]
    need: dict[str, int]
    stats: SourceStats
    queued: dict[str, collections.deque] = field(default_factory=lambda: {s: collections.deque() for s in SPLITS})

    def behind(self, split: str) -> float:
        """Share of this source's `split` budget still unwritten: the stream furthest behind goes next."""
        return self.need[split] / max(1, self.want[split])

    def shortfall(self, split: str) -> DataError:
        key = f"data.{split}_tokens"
        return DataError(
            f"source '{self.src.name}' has only {self.stats.tokens[split]:,} {split} tokens "
            f"({self.stats.docs[split]:,} documents after dedup), but the budget asks for {self.want[split]:,} "
            f"({key} × its weight share); lower {key}, lower its weight, or add data"
        )


def _pull(stream: _Stream, cfg: DataConfig, tokenizer, prefix: list[int], seen: set[bytes]) -> bool:
    """Dedup, split by hash and tokenize the stream's next batch of documents into its queues;
    False when the source has no more documents.

    Each document becomes prefix (the tokenizer's BOS, if it adds one) + text + EOS, the way the
    model's tokenizer frames a text, so pretraining sees what generation will feed it.
    """
    batch = next(stream.batches, None)
    if batch is None:
        return False
    keep: list[tuple[str, str]] = []
    for doc in batch:
        d = digest(doc)
        if cfg.dedup:
            if d in seen:
                stream.stats.duplicates += 1
                continue
            seen.add(d)
        split = split_of(d, cfg.val_fraction)
        if stream.need[split] > 0:
            keep.append((split, doc))
    if keep:
        encoded = tokenizer([doc for _, doc in keep], add_special_tokens=False)["input_ids"]
        for (split, _), ids in zip(keep, encoded, strict=True):
            stream.queued[split].append(np.asarray([*prefix, *ids, tokenizer.eos_token_id], dtype=np.int64))
    return True


def _interleave_sources(
    streams: list[_Stream], pull: Callable[[_Stream], bool], writers: dict[str, TokenWriter], eos: int, bar
) -> None:
    """Write every split document by document, each from the source furthest behind its share.

    Interleaving (rather than one source after the other) makes every prefix of a split a sample
    of the whole mix: the first validation blocks, which the trainer's evaluation and `ppl/val`
    read, then hold every source in proportion to its weight.
    """
    while True:
        pending = [(st.behind(split), -st.index, split, st) for st in streams for split in SPLITS if st.need[split] > 0]
        if not pending:
            return
        _, _, split, stream = max(pending, key=lambda p: p[:2])
        while not stream.queued[split]:
            if not pull(stream):
                raise stream.shortfall(split)
        ids = stream.queued[split].popleft()
        if len(ids) > stream.need[split]:  # the last document is cut so the quota is exact,
            ids = ids[: stream.need[split]]  # still ending in EOS so it never runs into the next one
            ids[-1] = eos
            stream.stats.truncated_docs += 1
        writers[split].write(ids, stream.index)
        stream.need[split] -= len(ids)
        stream.stats.docs[split] += 1
        stream.stats.tokens[split] += len(ids)
        bar.update(len(ids))


def sample_calibration(train: np.ndarray, n: int, length: int, seed: int) -> torch.Tensor:
    """`n` windows of `length` tokens at seeded random offsets of the train stream."""
    if len(train) < length + 1:
        raise DataError(f"train split has {len(train)} tokens, fewer than calib_seq_len={length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - length, (n,), generator=gen).tolist()
    return torch.from_numpy(np.stack([np.asarray(train[s : s + length], dtype=np.int64) for s in starts]))


def build_corpus(cfg: DataConfig, out_dir: Path, seed: int, progress: bool = True) -> dict:
    """Build the tokenized, packed corpus in `out_dir` (which the caller makes atomic). Returns stats.

    `cfg.tokenizer` is the tokenizer every token is written with (a path or hub name: the base
    model's own when the pipeline starts from a checkpoint); None trains a byte-level BPE.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = out_dir / "tokenizer"
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer, hub=True)
        tokenizer.save_pretrained(tok_dir)
    else:
        log.info("training a %d-token byte-level BPE on up to %d chars", cfg.vocab_size, cfg.tokenizer_train_chars)
        tokenizer = train_tokenizer(_tokenizer_texts(cfg, seed), cfg.vocab_size, tok_dir)
    bound = vocab_bound(tokenizer)
    dtype = token_dtype(bound)
    prefix = bos_prefix(tokenizer)

    budgets = {"train": quotas(cfg.sources, cfg.train_tokens), "val": quotas(cfg.sources, cfg.val_tokens)}
    writers = {s: TokenWriter(out_dir / f"{s}.bin", dtype) for s in SPLITS}
    seen: set[bytes] = set()
    streams = [
        _Stream(
            i,
            src,
            _batched(iter_source(src, seed, cfg.shuffle_buffer), TOKENIZE_BATCH),
            want={s: budgets[s][src.name] for s in SPLITS},
            need={s: budgets[s][src.name] for s in SPLITS},
            stats=SourceStats(),
        )
        for i, src in enumerate(cfg.sources)
    ]
    total = cfg.train_tokens + cfg.val_tokens
    try:
        with tqdm(total=total, unit="tok", unit_scale=True, desc="data", disable=not progress) as bar:
            _interleave_sources(
                streams, lambda st: _pull(st, cfg, tokenizer, prefix, seen), writers, tokenizer.eos_token_id, bar
            )
    finally:
        for w in writers.values():
            w.close()

    train = read_tokens(out_dir / "train.bin", dtype)
    calib = sample_calibration(train, cfg.calib_samples, cfg.calib_seq_len, seed)
    save_file({"input_ids": calib.contiguous()}, str(out_dir / "calib.safetensors"))

    names = [src.name for src in cfg.sources]
    atomic_write_json(out_dir / SPANS_FILE, {"sources": names, **{s: writers[s].spans for s in SPLITS}})
    meta = {
        "dtype": dtype.name,
        "block_size": cfg.block_size,
        "vocab_size": bound,
        "max_token_id": max(w.max_id for w in writers.values()),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_prefix": prefix,
        "sources": names,
        "tokens": {s: writers[s].count for s in SPLITS},
        "blocks": {s: writers[s].count // cfg.block_size for s in SPLITS},
    }
    atomic_write_json(out_dir / "meta.json", meta)
    per_source = {st.src.name: st.stats for st in streams}
    stats = {
        "sources": {
            name: {
                "docs": st.docs,
                "tokens": st.tokens,
                "duplicates_removed": st.duplicates,
                "truncated_docs": st.truncated_docs,
            }
            for name, st in per_source.items()
        },
        "tokens": meta["tokens"],
        "duplicates_removed": sum(st.duplicates for st in per_source.values()),
        "vocab_size": bound,
        "calibration": list(calib.shape),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out_dir / "stats.json", stats)
    return stats


# --------------------------------------------------------------------------- reading the corpus


def _allocate(source: np.ndarray, limit: int) -> tuple[list[np.ndarray], list[int]]:
    """Split `limit` picks among the sources of documents (`source[i]` = document i's source):
    (each source's document indices, how many to take from it), by document share, at least one
    per source while `limit` allows, never more than a source has."""
    members = [np.flatnonzero(source == s) for s in np.unique(source)]
    counts = [min(1, len(m)) for m in members] if limit >= len(members) else [0] * len(members)
    for _ in range(limit - sum(counts)):  # hand out the rest one at a time to the most under-served source
        room = [i for i, m in enumerate(members) if counts[i] < len(m)]
        if not room:
            break
        i = min(room, key=lambda j: (counts[j] / len(members[j]), j))
        counts[i] += 1
    return members, counts


@dataclass(frozen=True)
class Corpus:
    """A built corpus directory, opened read-only (token streams memory-mapped)."""

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> Corpus:
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{path} is not a built corpus (no meta.json); run the data stage first")
        return cls(path, json.loads(meta_path.read_text()))

    def tokens(self, split: str) -> np.memmap:
        return read_tokens(self.path / f"{split}.bin", self.meta["dtype"])

    def blocks(self, split: str, block_size: int | None = None) -> np.ndarray:
        """[n_blocks, block_size] view of a split (the tail shorter than a block is dropped)."""
        bs = block_size or self.meta["block_size"]
        toks = self.tokens(split)
        n = len(toks) // bs
        if n == 0:
            raise DataError(f"{self.path}: {split} split has {len(toks)} tokens, less than one block of {bs}")
        return toks[: n * bs].reshape(n, bs)

    def documents(self, split: str, tokenizer, limit: int | None = None) -> Iterator[str]:
        """Decoded documents of a split (the EOS-separated runs of its token stream, without the
        tokenizer's BOS), in split order.

        With `limit`, a sample of that many drawn from every source: each source gets a share of
        `limit` by its share of the split's documents (at least one while `limit` allows), taken
        evenly spaced through its documents, so a held-out set represents the whole mix.
        """
        toks = np.asarray(self.tokens(split))
        ends = np.flatnonzero(toks == self.meta["eos_token_id"])
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        picked = np.arange(len(ends))
        if limit is not None and limit < len(ends):
            owner = self.token_sources(split)
            source = owner[starts] if owner is not None else np.zeros(len(ends), dtype=np.int16)
            picked = np.sort(
                np.concatenate(
                    [
                        members[np.linspace(0, len(members) - 1, k).round().astype(np.int64)]
                        for members, k in zip(*_allocate(source, limit), strict=True)
                        if k
                    ]
                )
            )
        prefix = self.meta.get("bos_prefix", [])
        for i in picked:
            ids = toks[starts[i] : ends[i]].tolist()
            if prefix and ids[: len(prefix)] == prefix:
                ids = ids[len(prefix) :]
            if ids:
                yield tokenizer.decode(ids)

    @property
    def source_names(self) -> list[str]:
        return list(self.meta.get("sources", []))

    def token_sources(self, split: str) -> np.ndarray | None:
        """The index (into `source_names`) of the source each token of a split came from; None for a
        corpus written before sources were recorded."""
        path = self.path / SPANS_FILE
        if not path.is_file():
            return None
        owner = np.full(self.meta["tokens"][split], -1, dtype=np.int16)
        for source, start, end in json.loads(path.read_text())[split]:
            owner[start:end] = source
        return owner

    def calibration(self) -> torch.Tensor:
        return load_file(str(self.path / "calib.safetensors"))["input_ids"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer"
