"""safetensors files read through a memory map and written one tensor at a time.

Both exist for models bigger than what a process should hold twice: a 7B model in the sparse
format is ~3 GB, its dense bf16 twin 13.5 GB. ``safetensors.torch.save_file`` needs every tensor in
memory at once, and ``load_file`` copies every tensor out of the file.

The file layout (the safetensors specification): an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``, then the
data buffer, in which the tensors lie back to back with no holes (readers check this).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sparsify.errors import DataError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsReadError(DataError):
    """A file that is not a readable safetensors file; the message names it and the cause."""


def read_safetensors_mmap(file: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a safetensors file as a view of a private (copy-on-write) memory map, and its metadata.

    Nothing is read until a tensor is touched; the pages are the OS page cache's. A tensor whose
    offset is not aligned to its element size (the format does not promise alignment) is copied.
    """
    file = Path(file)
    try:
        with file.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or header_len > file.stat().st_size - 8:
                raise ValueError("bad header length")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise SafetensorsReadError(f"{file} is not a readable safetensors file: {err}") from err
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_len
    # "c": copy-on-write, so the buffer is writable for torch (no warning) yet the file is never modified.
    mapping = np.memmap(file, dtype=np.uint8, mode="c")
    tensors: dict[str, Tensor] = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsReadError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = (start + o for o in info["data_offsets"])
        if end > mapping.size:
            raise SafetensorsReadError(f"{file}: tensor {name!r} ends past the end of the file (truncated?)")
        raw = torch.from_numpy(mapping[begin:end])
        itemsize = torch.empty((), dtype=dtype).element_size()
        if begin % itemsize:
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors, metadata


def canonical_bytes(data: bytes) -> bytes:
    """``data`` (a safetensors file, e.g. from ``safetensors.torch.save``) with its ``__metadata__`` in
    sorted key order, so that the same tensors and metadata give the same bytes in every process.

    safetensors writes the metadata from a Rust ``HashMap``, whose order is random per map
    (safetensors issue #584): saved twice, a file with two or more metadata entries differs in its
    header, which breaks byte-identical reruns and content hashes (DVC) while every tensor is equal.
    The tensor entries and the data are kept as they are; only the header is rewritten.
    """
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data stays 8-byte aligned, as safetensors' own writer keeps it
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + header_len :]


class SafetensorsWriter:
    """A safetensors file written one tensor at a time, so peak memory is one tensor rather than the model.

    Tensors go to a side file ``<file>.data-tmp`` as they come; :meth:`finish` writes the header
    into ``file`` and appends the data (a kernel-side copy where the OS has one). Use as a context
    manager: on an error the side file is removed and ``file`` is not written. Write inside an
    atomic folder (:func:`sparsify.io.atomic_dir`) so that no reader ever sees a half-written file.
    """

    def __init__(self, file: str | os.PathLike):
        self.file = Path(file)
        self._data_path = self.file.with_name(self.file.name + ".data-tmp")
        self._data = self._data_path.open("wb")
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor`` (any device, any strides) under ``name``."""
        if name in self._header or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is already in {self.file.name} (or reserved)")
        if tensor.dtype not in _NAMES:
            raise ValueError(f"{name}: safetensors has no dtype for {tensor.dtype}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
        self._data.write(memoryview(raw.numpy()))
        size = flat.numel() * flat.element_size()
        self._header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        self._offset += size

    def finish(self, metadata: dict[str, str] | None = None) -> Path:
        """Write the file (header, then the data) and remove the side file."""
        self._data.close()
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data then starts 8-byte aligned, as safetensors' own writer does
        with self.file.open("wb") as out, self._data_path.open("rb") as data:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            out.flush()
            shutil.copyfileobj(data, out, 64 << 20)  # sequential: seconds for a few GB
            out.flush()
            os.fsync(out.fileno())
        self._data_path.unlink()
        return self.file

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
