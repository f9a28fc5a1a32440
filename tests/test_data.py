"""Data subsetting: mixture, split, dedup, determinism, tokenizer, packing, memory, bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sparsify.checkpoint import load_tokenizer
from sparsify.data.corpus import (
    Corpus,
    DataConfig,
    DataError,
    SourceConfig,
    build_corpus,
    extract_prose,
    quotas,
    train_tokenizer,
)
from sparsify.io import atomic_dir

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def write_docs(folder: Path, prefix: str, n: int, words: int = 60, seed: int = 0, ext: str = ".txt") -> Path:
    """n unique documents `<prefix>-<i>: ...` (the id lets a test recover which document a token came from)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        (folder / f"{prefix}{i:05d}{ext}").write_text(f"{prefix}-{i:05d}: {body}\n")
    return folder


def data_cfg(sources: list[dict], **kw) -> DataConfig:
    base = dict(
        train_tokens=4000,
        val_tokens=1000,
        val_fraction=0.2,
        block_size=32,
        vocab_size=300,
        tokenizer_train_chars=200_000,
        calib_samples=4,
        calib_seq_len=16,
    )
    base.update(kw)
    return DataConfig(sources=[SourceConfig(**s) for s in sources], **base)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_docs(root / "a", "A", 300, seed=1)
    write_docs(root / "b", "B", 300, seed=2)
    return [
        {"name": "a", "kind": "files", "glob": str(root / "a" / "*.txt"), "weight": 0.7},
        {"name": "b", "kind": "files", "glob": str(root / "b" / "*.txt"), "weight": 0.3},
    ]


@pytest.fixture(scope="module")
def built(two_sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    stats = build_corpus(data_cfg(two_sources), out, seed=0, progress=False)
    return out, stats


def docs_of(corpus: Corpus, split: str) -> list[str]:
    tok = load_tokenizer(corpus.tokenizer_path)
    ids = np.asarray(corpus.tokens(split)).tolist()
    docs, cur = [], []
    for t in ids:
        if t == tok.eos_token_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    if cur:
        docs.append(tok.decode(cur))
    return docs


def test_quotas_sum_exactly():
    srcs = [SourceConfig(name=n, kind="stdlib_code", weight=w) for n, w in [("a", 1), ("b", 1), ("c", 1)]]
    q = quotas(srcs, 100)
    assert sum(q.values()) == 100 and max(q.values()) - min(q.values()) <= 1


def test_mixture_proportions(built):
    _, stats = built
    for split, total in (("train", 4000), ("val", 1000)):
        a = stats["sources"]["a"]["tokens"][split]
        b = stats["sources"]["b"]["tokens"][split]
        assert a + b == total
        assert abs(a / total - 0.7) < 0.01


def test_no_document_in_both_splits(built):
    corpus = Corpus.open(built[0])
    ids = {split: {d.split(":")[0] for d in docs_of(corpus, split)} for split in ("train", "val")}
    assert ids["train"] and ids["val"]
    assert not ids["train"] & ids["val"]


def test_deterministic_by_seed(two_sources, built, tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    build_corpus(data_cfg(two_sources), same, seed=0, progress=False)
    build_corpus(data_cfg(two_sources), other, seed=1, progress=False)
    first = (built[0] / "train.bin").read_bytes()
    assert (same / "train.bin").read_bytes() == first
    assert (same / "calib.safetensors").read_bytes() == (built[0] / "calib.safetensors").read_bytes()
    assert (other / "train.bin").read_bytes() != first


def test_exact_duplicates_removed(tmp_path):
    folder = write_docs(tmp_path / "d", "D", 50)
    for i in range(10):  # ten copies of document 0 under other names
        (folder / f"copy{i}.txt").write_text((folder / "D00000.txt").read_text())
    src = [{"name": "d", "kind": "files", "glob": str(folder / "*.txt"), "weight": 1}]
    stats = build_corpus(data_cfg(src, train_tokens=800, val_tokens=100), tmp_path / "o", seed=0, progress=False)
    assert stats["duplicates_removed"] > 0
    corpus = Corpus.open(tmp_path / "o")
    all_ids = [d.split(":")[0] for s in ("train", "val") for d in docs_of(corpus, s)]
    assert len(all_ids) == len(set(all_ids))


def test_tokenizer_round_trip(tmp_path):
    code = textwrap.dedent('''
        def f(x):\n    """Ünïcode — docstring."""\n\treturn {"k": x ** 2}  # comment\n\n\n    ''')
    tok = train_tokenizer([code * 20, "plain prose text. " * 50], vocab_size=300, out_dir=tmp_path)
    for text in (code, "naïve café 🚀 \t\n  spaces", ""):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    reloaded = load_tokenizer(tmp_path)
    assert reloaded(code)["input_ids"] == tok(code)["input_ids"]


def test_packing_is_concatenation_with_eos(two_sources, built):
    corpus = Corpus.open(built[0])
    stream = np.asarray(corpus.tokens("train"))
    blocks = corpus.blocks("train")
    bs = corpus.meta["block_size"]
    assert blocks.shape == (len(stream) // bs, bs)
    assert np.array_equal(blocks.reshape(-1), stream[: blocks.size])
    assert stream[-1] == corpus.meta["eos_token_id"]
    # Each document between EOS tokens decodes to its source file exactly (a cut one to a prefix of it).
    files = {p.stem: p.read_text() for s in two_sources for p in Path(s["glob"]).parent.glob("*.txt")}
    docs = docs_of(corpus, "train")
    whole = 0
    for d in docs:
        original = files[d.split(":")[0].replace("-", "")]
        whole += d == original
        assert original.startswith(d)
    assert whole >= len(docs) - 2  # at most the last document of each source is cut
    calib = corpus.calibration()
    assert calib.shape == (4, 16) and int(calib.max()) < corpus.meta["vocab_size"]


def test_stdlib_sources_and_prose_extraction():
    src = 'def f():\n    """Return one."""\n    # helpful note\n    return 1  # trailing\n'
    prose = extract_prose(src)
    assert "Return one." in prose and "helpful note" in prose and "return 1" not in prose
    assert extract_prose("def broken(:\n") == ""


def test_hf_source_through_json_builder(tmp_path):
    rows = [{"content": f"record {i} " + "word " * 30, "other": i} for i in range(200)]
    path = tmp_path / "part.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    src = [
        {"name": "hub", "kind": "hf", "path": "json", "data_files": [str(path)], "text_field": "content", "weight": 1}
    ]
    stats = build_corpus(data_cfg(src, train_tokens=1000, val_tokens=100), tmp_path / "o", seed=0, progress=False)
    assert stats["tokens"] == {"train": 1000, "val": 100}
    bad = [{**src[0], "text_field": "body"}]
    with pytest.raises(DataError, match="no field 'body'.*content"):
        build_corpus(data_cfg(bad), tmp_path / "o2", seed=0, progress=False)


def test_bad_sources_fail_clearly(tmp_path):
    missing = [{"name": "m", "kind": "files", "glob": str(tmp_path / "nothing" / "*.txt"), "weight": 1}]
    with pytest.raises(DataError, match="source 'm': glob .* matched no files"):
        build_corpus(data_cfg(missing), tmp_path / "o", seed=0, progress=False)
    (tmp_path / "empty").mkdir()
    for i in range(3):
        (tmp_path / "empty" / f"{i}.txt").write_text("  \n")
    empty = [{"name": "e", "kind": "files", "glob": str(tmp_path / "empty" / "*.txt"), "weight": 1}]
    with pytest.raises(DataError, match="source 'e' .* yielded no non-empty documents"):
        build_corpus(data_cfg(empty), tmp_path / "o", seed=0, progress=False)


def test_budget_larger_than_data_says_how_much_there_is(two_sources, tmp_path):
    with pytest.raises(DataError, match=r"source 'a' has only [\d,]+ train tokens .* asks for 7,000,000"):
        build_corpus(data_cfg(two_sources, train_tokens=10_000_000), tmp_path / "o", seed=0, progress=False)


def test_failed_build_leaves_no_partial_output(two_sources, built, tmp_path):
    out = tmp_path / "corpus"
    with atomic_dir(out) as tmp:
        build_corpus(data_cfg(two_sources), tmp, seed=0, progress=False)
    before = (out / "train.bin").read_bytes()
    with pytest.raises(DataError), atomic_dir(out) as tmp:
        build_corpus(data_cfg(two_sources, train_tokens=10_000_000), tmp, seed=0, progress=False)
    assert (out / "train.bin").read_bytes() == before  # the old output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temp dirs left behind


MEMORY_PROBE = """
import json, sys, tracemalloc
from sparsify.data.corpus import DataConfig, SourceConfig
from sparsify.data.corpus import build_corpus
folder, tok, tokens, out = sys.argv[1:]
cfg = DataConfig(sources=[SourceConfig(name="big", kind="files", glob=folder + "/*.txt", weight=1)],
                 train_tokens=int(tokens), val_tokens=int(tokens) // 20, val_fraction=0.05, block_size=64,
                 tokenizer=tok, calib_samples=4, calib_seq_len=32)
tracemalloc.start()
build_corpus(cfg, out, seed=0, progress=False)
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1]}))
"""


def test_streaming_peak_memory_does_not_grow_with_corpus(tmp_path):
    """Python-heap peak for a corpus 5x larger (consumed whole) stays within 1.5x of the small one."""
    tok_dir = tmp_path / "tok"
    train_tokenizer([" ".join(WORDS) * 20], vocab_size=300, out_dir=tok_dir)
    peaks = {}
    for scale in (1, 5):
        folder = write_docs(tmp_path / f"c{scale}", "X", 60 * scale, words=1500, seed=scale)
        tokens = 60 * scale * 1500 * 8 // 10  # most of the corpus, so the whole stream is read
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(folder), str(tok_dir), str(tokens), str(tmp_path / f"o{scale}")],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[scale] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert peaks[5] < 1.5 * peaks[1], peaks
