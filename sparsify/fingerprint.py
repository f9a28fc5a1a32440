"""Resume fingerprints: one hash of what a result is a function of.

A run that resumes from saved state (the layer-wise driver, the trainer's checkpoints, a
pipeline stage) must be the run that wrote it: same configuration, same inputs, same code.
Each of them identifies itself by `fingerprint(...)` of those inputs and refuses (or discards)
state with another fingerprint.

The hash is sha256 of a canonical JSON (sorted keys, no whitespace) of the inputs. Tensors and
numpy arrays stand in it as their dtype, shape and the sha256 of their bytes (so a resume notices
a single changed weight or calibration token); pydantic models as their JSON dump; paths as
strings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel


def tensor_digest(tensor: torch.Tensor | np.ndarray) -> str:
    """sha256 of a tensor's dtype, shape and bytes (on the CPU, contiguous; no copy when it already is)."""
    if isinstance(tensor, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(tensor))
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted); "missing" if absent."""
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def _canonical(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor | np.ndarray):
        return {"tensor": str(obj.dtype), "shape": list(obj.shape), "sha256": tensor_digest(obj)}
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}: pass JSON values, tensors or pydantic models")


def fingerprint(obj: Any, *, length: int | None = None) -> str:
    """sha256 (hex, the first `length` characters if given) of a canonical JSON of `obj`."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
