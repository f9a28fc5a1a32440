"""The bad-input table (issue #19, item 2): one bad input per row, fed to the real stage or library function.

Each row asserts that the failure (a) is one of the project's error types (`SparsellamaError`: the CLI prints
it as one line), (b) names the file or key, and (c) leaves no partial output that a later run would trust:
the output does not exist, or the old one is byte-for-byte what it was, and no temporary file is left.

`docs/bad_inputs.md` holds the same table; `test_doc_table_matches_the_cases` keeps the two in step.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsify import io as sio
from sparsify.checkpoint import load_checkpoint, load_model, save_checkpoint
from sparsify.data.corpus import SourceConfig, check_tokenizer_for_model, iter_source
from sparsify.data.downstream import load_records, read_task_jsonl
from sparsify.errors import ConfigError, DataError, MissingFileError, ModelLoadError, OutputWriteError, SparsellamaError
from sparsify.inference.export import SPARSE_FILE, save_sparse_model
from sparsify.inference.loading import load_runtime_model
from sparsify.io import atomic_dir
from sparsify.sparsity.masks import check_masks, load_masks, save_masks
from sparsify.training.trainer import TrainingDiverged, train
from tasks.config import load_config
from tests.conftest import PARAMS, smoke_config, tiny_llama
from tests.serve_fixtures import VOCAB, sparse_llama, tiny_tokenizer, write_sparse_folder
from tests.test_trainer import random_blocks
from tests.test_trainer import tiny_config as train_config

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_inputs.md"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Row:
    """What one bad input must give: the error type, text the message must name, and the state left on disk."""

    call: Callable[[], object]
    error: type[SparsellamaError]
    names: str  # the file or key, as the message must name it
    untouched: dict[Path, bytes | None] = field(default_factory=dict)  # path -> its bytes before (None: absent)
    no_temp_in: list[Path] = field(default_factory=list)  # folders that must hold no leftover temporary file


CASES: dict[str, Callable[[Path, pytest.MonkeyPatch], Row]] = {}


def case(case_id: str):
    def register(fn):
        CASES[case_id] = fn
        return fn

    return register


def snapshot(path: Path) -> bytes | None:
    """The bytes of a file, a folder's files (names and bytes), or None when absent."""
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return json.dumps(
            {str(p.relative_to(path)): p.read_bytes().hex() for p in sorted(path.rglob("*")) if p.is_file()}
        ).encode()
    return None


@functools.cache
def _tokenizer():
    return tiny_tokenizer()


def hf_folder(folder: Path, *, tokenizer: bool = False) -> Path:
    """A tiny Llama saved as an HF checkpoint folder (model.safetensors + config.json)."""
    model = tiny_llama(vocab_size=VOCAB)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        _tokenizer().save_pretrained(folder)
    return folder


def truncate(file: Path) -> Path:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return file


def corrupt_header(file: Path) -> Path:
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header's first bytes
    file.write_bytes(bytes(data))
    return file


def half_write_then_full(write_some: Callable[[object], None]):
    """A writer that puts some bytes down, then hits a full disk (ENOSPC), as a real one would."""

    def writer(*args, **kwargs):
        write_some(*args)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return writer


def make_unwritable(folder: Path, mp: pytest.MonkeyPatch) -> None:
    """`folder` refuses new files: chmod 0o555, or, as root (where chmod stops nothing), the temporary-file
    calls of sparsify.io raise EACCES for it, as the kernel would."""
    folder.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT:
        folder.chmod(0o555)
        return
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def refuse(real):
        def call(*args, dir=None, **kwargs):  # noqa: A002 (tempfile's own name)
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
            return real(*args, dir=dir, **kwargs)

        return call

    mp.setattr(sio.tempfile, "mkstemp", refuse(real_mkstemp))
    mp.setattr(sio.tempfile, "mkdtemp", refuse(real_mkdtemp))


# --------------------------------------------------------------------------- params.yaml


def _config_row(tmp: Path, override: str, names: str) -> Row:
    root = tmp / "root"
    return Row(
        lambda: load_config(PARAMS, profile="smoke", overrides=[f"project.root={root}", override]),
        ConfigError,
        names,
        untouched={root: None},
    )


@case("config-unknown-key")
def _(tmp, mp):
    return _config_row(tmp, "base.train.learning_rate=0.1", "base.train.learning_rate")


@case("config-wrong-type")
def _(tmp, mp):
    return _config_row(tmp, "base.train.steps=many", "base.train.steps")


@case("config-out-of-range")
def _(tmp, mp):
    return _config_row(tmp, "pipeline.sparsities=[0.5, 1.5]", "pipeline.sparsities")


@case("config-bad-yaml")
def _(tmp, mp):
    file = tmp / "params.yaml"
    file.write_text("train:\n  lr: [0.1\n")
    return Row(lambda: load_config(file), ConfigError, str(file), untouched={file: file.read_bytes()})


@case("config-unknown-profile")
def _(tmp, mp):
    return Row(lambda: load_config(PARAMS, profile="smoek"), ConfigError, "'smoek'")


@case("config-file-missing")
def _(tmp, mp):
    file = tmp / "nope.yaml"
    return Row(lambda: load_config(file), ConfigError, str(file))


# --------------------------------------------------------------------------- corpus files (data stage)


def _data_stage_row(tmp: Path, glob: str, error: type, names: str) -> Row:
    from tasks import data
    from tasks.common import Layout

    source = "data.sources=[{name: mine, kind: files, glob: '" + glob + "', weight: 1}]"
    cfg = smoke_config(tmp / "root", "tracking.enabled=false", source)
    out = Layout.of(cfg).corpus
    out.mkdir(parents=True)  # a corpus from an earlier run: a failed rerun must leave it as it was
    (out / "meta.json").write_text('{"from": "the earlier run"}\n')
    return Row(lambda: data.run(cfg), error, names, untouched={out: snapshot(out)}, no_temp_in=[out.parent])


@case("corpus-files-missing")
def _(tmp, mp):
    return _data_stage_row(tmp, str(tmp / "corpus" / "*.txt"), DataError, str(tmp / "corpus" / "*.txt"))


@case("corpus-files-empty")
def _(tmp, mp):
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "a.txt").write_text("")
    (tmp / "corpus" / "b.txt").write_text("  \n")
    return _data_stage_row(tmp, str(tmp / "corpus" / "*.txt"), DataError, "source 'mine'")


@case("corpus-files-binary")
def _(tmp, mp):
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "a.txt").write_bytes(bytes(range(256)) * 8)
    return _data_stage_row(tmp, str(tmp / "corpus" / "*.txt"), DataError, str(tmp / "corpus" / "a.txt"))


@case("corpus-jsonl-malformed")
def _(tmp, mp):
    file = tmp / "docs.jsonl"
    file.write_text('{"text": "fine"}\n{"text": "cut off\n')
    src = SourceConfig(name="mine", kind="files", glob=str(file), weight=1)
    return Row(lambda: list(iter_source(src, seed=0)), DataError, f"{file}:2")


@case("corpus-jsonl-missing-field")
def _(tmp, mp):
    file = tmp / "docs.jsonl"
    file.write_text('{"content": "no text field"}\n')
    src = SourceConfig(name="mine", kind="files", glob=str(file), weight=1)
    return Row(lambda: list(iter_source(src, seed=0)), DataError, "'text'")


# --------------------------------------------------------------------------- task records


@case("task-jsonl-missing")
def _(tmp, mp):
    file = tmp / "train.jsonl"
    return Row(lambda: read_task_jsonl(file), MissingFileError, str(file))


@case("task-jsonl-empty")
def _(tmp, mp):
    file = tmp / "train.jsonl"
    file.write_text("\n")
    return Row(lambda: read_task_jsonl(file), DataError, str(file))


@case("task-jsonl-binary")
def _(tmp, mp):
    file = tmp / "train.jsonl"
    file.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    return Row(lambda: read_task_jsonl(file), DataError, str(file))


@case("task-jsonl-malformed")
def _(tmp, mp):
    file = tmp / "train.jsonl"
    file.write_text('{"id": "a", "prompt": "p", "target": "t"}\nnot json\n')
    return Row(lambda: read_task_jsonl(file), DataError, f"{file}:2")


@case("task-record-missing-field")
def _(tmp, mp):
    file = tmp / "train.jsonl"
    file.write_text('{"id": "a", "prompt": "p"}\n')
    return Row(lambda: read_task_jsonl(file), DataError, "'target'")


@case("dataset-record-missing-field")
def _(tmp, mp):
    file = tmp / "gsm8k.jsonl"
    file.write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n{"question": "2+2?"}\n')
    return Row(
        lambda: load_records("gsm8k", data_files=file, cache_dir=tmp / "cache"),
        DataError,
        f"{file}: gsm8k record 1: missing field 'answer'",
    )


@case("dataset-file-missing")
def _(tmp, mp):
    file = tmp / "gsm8k.jsonl"
    return Row(lambda: load_records("gsm8k", data_files=file, cache_dir=tmp / "cache"), MissingFileError, str(file))


@case("dataset-file-empty")
def _(tmp, mp):
    file = tmp / "gsm8k.jsonl"
    file.write_text("")
    return Row(lambda: load_records("gsm8k", data_files=file, cache_dir=tmp / "cache"), DataError, str(file))


@case("dataset-file-binary")
def _(tmp, mp):
    file = tmp / "gsm8k.jsonl"
    file.write_bytes(bytes(range(256)) * 4)
    return Row(lambda: load_records("gsm8k", data_files=file, cache_dir=tmp / "cache"), DataError, str(file))


# --------------------------------------------------------------------------- checkpoints


@case("model-truncated-safetensors")
def _(tmp, mp):
    folder = hf_folder(tmp / "model")
    truncate(folder / "model.safetensors")
    return Row(lambda: load_model(folder), ModelLoadError, str(folder))


@case("eval-corrupt-safetensors")
def _(tmp, mp):
    folder = hf_folder(tmp / "model", tokenizer=True)
    corrupt_header(folder / "model.safetensors")
    return Row(lambda: load_checkpoint(folder), ModelLoadError, str(folder))


@case("runtime-truncated-safetensors")
def _(tmp, mp):
    folder = hf_folder(tmp / "model", tokenizer=True)
    truncate(folder / "model.safetensors")
    return Row(lambda: load_runtime_model(folder), ModelLoadError, str(folder))


@case("sparse-format-truncated")
def _(tmp, mp):
    folder = write_sparse_folder(*sparse_llama(0.7), tmp / "sparse", tokenizer=_tokenizer())
    truncate(folder / SPARSE_FILE)
    return Row(lambda: load_runtime_model(folder), ModelLoadError, str(folder / SPARSE_FILE))


@case("sparse-format-corrupt-header")
def _(tmp, mp):
    folder = write_sparse_folder(*sparse_llama(0.7), tmp / "sparse", tokenizer=_tokenizer())
    corrupt_header(folder / SPARSE_FILE)
    return Row(lambda: load_runtime_model(folder), ModelLoadError, str(folder / SPARSE_FILE))


# --------------------------------------------------------------------------- masks


def _masks_of(model) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("proj.weight")}


@case("masks-unknown-parameter")
def _(tmp, mp):
    model = tiny_llama()
    masks = _masks_of(model)
    masks["model.layers.9.mlp.up_proj.weight"] = masks.pop("model.layers.1.mlp.up_proj.weight")
    save_masks(masks, tmp / "masks.safetensors")
    return Row(
        lambda: check_masks(model, load_masks(tmp / "masks.safetensors")),
        DataError,
        "model.layers.9.mlp.up_proj.weight",
    )


@case("masks-wrong-shape")
def _(tmp, mp):
    masks = _masks_of(tiny_llama(hidden_size=64))
    save_masks(masks, tmp / "masks.safetensors")
    return Row(lambda: check_masks(tiny_llama(), load_masks(tmp / "masks.safetensors")), DataError, "model.layers.0.")


@case("masks-not-the-models")
def _(tmp, mp):
    model = tiny_llama()  # dense: every weight is nonzero where the masks prune half
    masks = {
        n: torch.rand(m.shape, generator=torch.Generator().manual_seed(0)) < 0.5 for n, m in _masks_of(model).items()
    }
    return Row(lambda: check_masks(model, masks), DataError, "model.layers.0.")


@case("masks-wrong-dtype")
def _(tmp, mp):
    file = tmp / "masks.safetensors"
    from safetensors.torch import save_file

    save_file({n: m.float() * 0.5 for n, m in _masks_of(tiny_llama()).items()}, file)  # scores, not keep-masks
    return Row(lambda: load_masks(file), DataError, "model.layers.0.")


@case("masks-corrupt-file")
def _(tmp, mp):
    file = tmp / "masks.safetensors"
    save_masks(_masks_of(tiny_llama()), file)
    truncate(file)
    return Row(lambda: load_masks(file), DataError, str(file))


# --------------------------------------------------------------------------- tokenizer


@case("tokenizer-larger-than-model")
def _(tmp, mp):
    folder = tmp / "model"
    tiny_llama().save_pretrained(folder)  # an embedding of 128 rows; the tokenizer emits ids up to 304
    return Row(lambda: check_tokenizer_for_model(_tokenizer(), folder), DataError, str(folder))


@case("tokenizer-other-vocab")
def _(tmp, mp):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = hf_folder(tmp / "model", tokenizer=True)
    words = {w: i for i, w in enumerate(["<unk>", "</s>", *(f"w{i}" for i in range(100))])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    return Row(lambda: check_tokenizer_for_model(other, folder), DataError, str(folder))


# --------------------------------------------------------------------------- disk full (simulated)


@case("disk-full-masks")
def _(tmp, mp):
    file = tmp / "masks.safetensors"
    save_masks(_masks_of(tiny_llama()), file)
    real_write_bytes = Path.write_bytes
    mp.setattr(Path, "write_bytes", half_write_then_full(lambda self, data: real_write_bytes(self, data[:100])))
    return Row(
        lambda: save_masks(_masks_of(tiny_llama(seed=1)), file),
        OutputWriteError,
        str(file),
        untouched={file: file.read_bytes()},
        no_temp_in=[tmp],
    )


@case("disk-full-checkpoint")
def _(tmp, mp):
    import transformers.modeling_utils as mu

    out = tmp / "base"
    with atomic_dir(out) as t:
        save_checkpoint(tiny_llama(), None, t, {"stage": "base"})
    before = snapshot(out)

    def write_some(state_dict, filename, *args):
        Path(filename).write_bytes(b"\0" * 1000)

    mp.setattr(mu, "safe_save_file", half_write_then_full(write_some))

    def stage_write():  # how every stage writes a checkpoint: save_checkpoint into atomic_dir
        with atomic_dir(out) as t:
            save_checkpoint(tiny_llama(seed=1), None, t, {"stage": "base"})

    return Row(stage_write, OutputWriteError, str(out), untouched={out: before}, no_temp_in=[tmp])


@case("disk-full-sparse-format")
def _(tmp, mp):
    out = write_sparse_folder(*sparse_llama(0.7), tmp / "sparse")
    before = snapshot(out)
    mp.setattr(shutil, "copyfileobj", half_write_then_full(lambda src, dst, *a: dst.write(src.read(100))))
    return Row(
        lambda: save_sparse_model(*sparse_llama(0.7, seed=1), out),
        OutputWriteError,
        str(out),
        untouched={out: before},
        no_temp_in=[tmp],
    )


# --------------------------------------------------------------------------- read-only output folder


@case("readonly-masks")
def _(tmp, mp):
    folder = tmp / "ro"
    make_unwritable(folder, mp)
    file = folder / "masks.safetensors"
    return Row(
        lambda: save_masks(_masks_of(tiny_llama()), file),
        OutputWriteError,
        str(file),
        untouched={file: None},
        no_temp_in=[folder],
    )


@case("readonly-checkpoint")
def _(tmp, mp):
    folder = tmp / "ro"
    make_unwritable(folder, mp)
    out = folder / "base"

    def stage_write():
        with atomic_dir(out) as t:
            save_checkpoint(tiny_llama(), None, t, {"stage": "base"})

    return Row(stage_write, OutputWriteError, str(out), untouched={out: None}, no_temp_in=[folder])


# --------------------------------------------------------------------------- training


@case("nan-loss")
def _(tmp, mp):
    model = tiny_llama(vocab_size=256)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    ckpt = tmp / "ckpt"
    blocks = random_blocks(n=16).astype(np.int64) % 256
    return Row(
        lambda: train(
            model, blocks, None, train_config(steps=2, checkpoint_every=1), seed=0, progress=False, checkpoint_dir=ckpt
        ),
        TrainingDiverged,
        "train.lr",
        untouched={ckpt: None},
    )


def _train_row(tmp: Path, damage: Callable[[Path], object], file_name: str) -> Row:
    from sparsify.training.trainer import STATE_FILE, WEIGHTS_FILE

    ckpt = tmp / "ckpt"
    blocks = random_blocks(n=16).astype(np.int64) % 256
    cfg = train_config(steps=2, checkpoint_every=1)
    train(tiny_llama(vocab_size=256), blocks, None, cfg, seed=0, progress=False, checkpoint_dir=ckpt)
    damage(ckpt / {"weights": WEIGHTS_FILE, "state": STATE_FILE}[file_name])
    before = snapshot(ckpt)
    return Row(
        lambda: train(tiny_llama(vocab_size=256), blocks, None, cfg, seed=0, progress=False, checkpoint_dir=ckpt),
        DataError,
        str(ckpt / {"weights": WEIGHTS_FILE, "state": STATE_FILE}[file_name]),
        untouched={ckpt: before},
    )


@case("train-checkpoint-truncated")
def _(tmp, mp):
    return _train_row(tmp, truncate, "weights")


@case("train-checkpoint-state-corrupt")
def _(tmp, mp):
    return _train_row(tmp, lambda f: f.write_text('{"step": 2, "form'), "state")


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id, tmp_path, monkeypatch):
    try:
        row = CASES[case_id](tmp_path, monkeypatch)
        with pytest.raises(SparsellamaError) as info:
            row.call()
    finally:
        monkeypatch.undo()  # the fault injections end before the checks (and pytest's cleanup) read the disk
        for ro in tmp_path.glob("ro"):
            ro.chmod(0o755)
    err = info.value
    assert isinstance(err, row.error), f"{type(err).__name__}: {err}"
    message = str(err)
    assert row.names in message, f"the message does not name {row.names!r}: {message}"
    for path, before in row.untouched.items():
        assert snapshot(path) == before, f"{path} changed (or was created) by the failed call"
    for folder in row.no_temp_in:
        left = [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []
        assert not left, f"temporary files left in {folder}: {left}"


def doc_case_ids() -> list[str]:
    return re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", DOC.read_text(), flags=re.M)


def test_doc_table_matches_the_cases():
    ids = doc_case_ids()
    assert len(ids) == len(set(ids)), "a case id appears twice in docs/bad_inputs.md"
    assert sorted(ids) == sorted(CASES), (
        f"docs/bad_inputs.md rows and the test cases differ: only in the doc {sorted(set(ids) - set(CASES))}, "
        f"only in the tests {sorted(set(CASES) - set(ids))}"
    )
