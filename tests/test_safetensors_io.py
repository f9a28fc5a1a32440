"""The streaming safetensors writer and the memory-mapped reader, against the safetensors library."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparsify.inference.export import (
    SPARSE_FILE,
    encode_sparse,
    load_sparse_layers,
    load_sparse_tensors,
    sparse_model_writer,
)
from sparsify.safetensors_io import DTYPES, SafetensorsReadError, SafetensorsWriter, read_safetensors_mmap


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t_{dtype}": (torch.randn(3, 5, generator=g) * 50).to(dtype) for dtype in DTYPES.values()}
    tensors["strided"] = torch.randn(6, 4, generator=g).t()  # not contiguous
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 7)
    tensors["odd_bytes"] = torch.arange(7, dtype=torch.uint8)  # leaves the next tensor misaligned
    tensors["after_odd"] = torch.arange(5, dtype=torch.int64)
    return tensors


def test_streamed_file_reads_back_with_safetensors_and_the_mmap_reader(tmp_path):
    tensors = sample_tensors()
    file = tmp_path / "x.safetensors"
    with SafetensorsWriter(file) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.finish({"format": "pt", "answer": "42"})
    assert not list(tmp_path.glob("*.data-tmp"))
    theirs = load_file(file)  # the library validates offsets: contiguous, no holes, within the file
    ours, metadata = read_safetensors_mmap(file)
    with safe_open(file, framework="pt") as f:
        assert f.metadata() == metadata == {"format": "pt", "answer": "42"}
    assert sorted(theirs) == sorted(ours) == sorted(tensors)
    for name, tensor in tensors.items():
        assert theirs[name].dtype == ours[name].dtype == tensor.dtype, name
        assert torch.equal(theirs[name], tensor) and torch.equal(ours[name], tensor), name
    # The header is padded so that the data starts 8-byte aligned.
    assert int.from_bytes(file.read_bytes()[:8], "little") % 8 == 0


def test_the_mmap_reader_reads_files_the_library_wrote(tmp_path):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"k": "v"})
    ours, metadata = read_safetensors_mmap(tmp_path / "lib.safetensors")
    assert metadata == {"k": "v"}
    assert all(torch.equal(ours[n], t) for n, t in tensors.items())


def test_writer_refuses_duplicates_and_cleans_up_on_error(tmp_path):
    file = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="already in"), SafetensorsWriter(file) as writer:
        writer.add("a", torch.ones(2))
        writer.add("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no dtype"), SafetensorsWriter(file) as writer:
        writer.add("c", torch.ones(2, dtype=torch.complex64))
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_refused_by_name(tmp_path):
    file = tmp_path / "x.safetensors"
    with SafetensorsWriter(file) as writer:
        writer.add("w", torch.randn(64, 64))
        writer.finish()
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(SafetensorsReadError, match="'w' ends past the end"):
        read_safetensors_mmap(file)


def test_sparse_model_writer_streams_the_same_format(tmp_path):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=g).masked_fill(torch.rand(16, 64, generator=g) < 0.7, 0)
    embed = torch.randn(10, 64, generator=g)
    with sparse_model_writer(tmp_path / "m") as writer:
        writer.add_layer("model.layers.0.mlp.up_proj.weight", encode_sparse(weight))
        writer.add_tensor("model.embed_tokens.weight", embed)
        writer.tie("lm_head.weight", "model.embed_tokens.weight")
        (writer.folder / "extra.txt").write_text("beside the weights")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["extra.txt", SPARSE_FILE]
    dense = load_sparse_tensors(tmp_path / "m")
    assert torch.equal(dense["model.layers.0.mlp.up_proj.weight"], weight)
    assert dense["lm_head.weight"] is dense["model.embed_tokens.weight"] and torch.equal(dense["lm_head.weight"], embed)
    layers, _ = load_sparse_layers(tmp_path / "m")
    assert layers["model.layers.0.mlp.up_proj.weight"].encoding == "float"


def test_sparse_model_writer_leaves_nothing_on_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("old output")
    with pytest.raises(RuntimeError, match="boom"), sparse_model_writer(tmp_path / "m") as writer:
        writer.add_tensor("a", torch.ones(3))
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["keep.txt"]
