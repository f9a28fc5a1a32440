"""The one atomic file writer and the one resume-fingerprint helper."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsify.fingerprint import fingerprint, tensor_digest
from sparsify.io import atomic_path, atomic_write_text, remove_stale_temporaries, restore_moved_aside
from tasks.config import Config


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "w.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        save_file({"w": torch.ones(3)}, tmp)
    assert torch.equal(load_file(target)["w"], torch.ones(3))
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        save_file({"w": torch.zeros(3)}, tmp)
        raise RuntimeError("disk full")
    assert torch.equal(load_file(target)["w"], torch.ones(3))  # the old file, untouched
    assert sorted(os.listdir(target.parent)) == ["w.safetensors"]  # no temporary left behind
    atomic_write_text(target.with_name("a.txt"), "x")
    assert target.with_name("a.txt").read_text() == "x"


def test_fingerprint_is_canonical_and_sees_every_input():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base = fingerprint({"a": 1, "w": t, "names": ["x", "y"]})
    assert fingerprint({"names": ["x", "y"], "w": t.clone(), "a": 1}) == base  # key order, tensor identity
    changed = t.clone()
    changed[1, 2] += 1e-3
    for other in (
        {"a": 2, "w": t, "names": ["x", "y"]},
        {"a": 1, "w": changed, "names": ["x", "y"]},
        {"a": 1, "w": t.double(), "names": ["x", "y"]},
        {"a": 1, "w": t.reshape(3, 2), "names": ["x", "y"]},
        {"a": 1, "w": t, "names": ["y", "x"]},
    ):
        assert fingerprint(other) != base
    assert len(fingerprint(base, length=16)) == 16
    # bf16 and bool tensors (masks) hash by their bytes; numpy arrays as the same tensor
    assert tensor_digest(torch.ones(4, dtype=torch.bfloat16)) != tensor_digest(torch.ones(4, dtype=torch.float16))
    assert fingerprint(torch.tensor([True, False])) != fingerprint(torch.tensor([False, True]))
    assert tensor_digest(np.arange(4, dtype=np.int64)) == tensor_digest(torch.arange(4))
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint({"x": object()})


def test_fingerprint_of_a_config_section(smoke_cfg: Config):
    assert fingerprint(smoke_cfg.prune) == fingerprint(smoke_cfg.prune.model_dump(mode="json"))
    assert fingerprint(smoke_cfg.prune) != fingerprint(smoke_cfg.prune.model_copy(update={"sparsity": 0.6}))


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    """What a process killed inside atomic_path / atomic_dir / replace_dir left beside a target."""
    target = tmp_path / "model"
    (tmp_path / ".model.abc.tmp").write_text("half a file")  # atomic_path
    (tmp_path / ".model.tmp-xyz").mkdir()  # atomic_dir
    (tmp_path / ".model.tmp-xyz" / "weights").write_text("half a folder")
    (tmp_path / ".model.old-123").mkdir()  # replace_dir, killed between its renames
    (tmp_path / ".model2.tmp-xyz").mkdir()  # another target's: kept
    (tmp_path / ".model.json").write_text("{}")  # not a temporary: kept
    removed = remove_stale_temporaries(target)
    assert sorted(p.name for p in removed) == [".model.abc.tmp", ".model.tmp-xyz"]
    assert remove_stale_temporaries(target, replaced=True) == []  # `model` missing: the moved-aside one is kept
    assert restore_moved_aside(target) and target.is_dir() and not (tmp_path / ".model.old-123").exists()
    (tmp_path / ".model.old-456").mkdir()
    assert not restore_moved_aside(target)  # it exists: nothing to restore
    assert [p.name for p in remove_stale_temporaries(target, replaced=True)] == [".model.old-456"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.json", ".model2.tmp-xyz", "model"]
