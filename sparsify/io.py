"""Atomic file and directory writes, and the JSONL reader that matches :func:`atomic_write_jsonl`.

Every output of the pipeline is written to a temporary sibling first and renamed
into place, so an interrupted or failed write never leaves a half-written file
that a later stage (or `dvc repro`) would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sparsify.errors import DataError, OutputWriteError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _read_umask()

# A full disk or quota: whatever wrote into the temporary output hit it.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Creating the temporary output or renaming it into place: the folder refuses writes (or the disk is full).
_UNWRITABLE = _FULL | {errno.EACCES, errno.EPERM, errno.EROFS}


def _output_error(path: Path, err: OSError) -> OutputWriteError:
    """``err`` as a one-line OutputWriteError naming the output ``path`` (the errno is kept)."""
    why = "the disk is full" if err.errno in _FULL else "its folder is not writable"
    detail = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    return OutputWriteError(err.errno, f"cannot write {path}: {why} ({detail}); it was left as it was")


@contextlib.contextmanager
def _creating(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        if isinstance(err, OutputWriteError) or err.errno not in _UNWRITABLE:
            raise
        raise _output_error(path, err) from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; when the block succeeds, the file is fsynced and
    renamed over `path`. On error it is removed and an existing `path` is left untouched.

    The one atomic file writer: for writers that take a file name (safetensors' `save_file`,
    matplotlib's `savefig`), the bytes stream to disk and are never held whole in memory (layer-wise
    activations may be GBs). Same folder, so the rename never crosses a file system.
    """
    path = Path(path)
    with _creating(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with _creating(path):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
            os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, OutputWriteError) and err.errno in _FULL:
            raise _output_error(path, err) from err
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """One JSON document per line (UTF-8 as is, not escaped), replacing `path` atomically."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds.

    On error the temporary directory is removed and an existing `path` is left
    untouched. The swap is two renames (old aside, new into place), so a crash
    between them leaves the old output recoverable under `<name>.old-*`.
    """
    path = Path(path)
    with _creating(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, OutputWriteError) and err.errno in _FULL:
            raise _output_error(path, err) from err
        raise
    try:
        with _creating(path):
            replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the complete directory `tmp` into place as `path` (two renames, see :func:`atomic_dir`).

    For outputs written by several processes into one agreed temporary directory, where the
    single-writer context manager does not fit (sharded checkpoints)."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(path: str | os.PathLike, *, replaced: bool = False) -> list[Path]:
    """Remove what interrupted atomic writes of `path` left beside it; return what was removed.

    A process killed inside :func:`atomic_path` leaves its temporary file (``.<name>.*.tmp``), inside
    :func:`atomic_dir` its temporary folder (``.<name>.tmp-*``): never read (they do not carry the
    target's name), but never removed either, and a killed checkpoint write can leave the size of a
    model and its optimizer state behind, once per kill. With `replaced` (`path` has since been
    written again), also the previous output that :func:`replace_dir` had moved aside
    (``.<name>.old-*``) when it was killed between its two renames.

    Only for a caller that alone writes `path` (a pipeline stage, its outputs, under the root lock):
    another process writing `path` at the same time would lose its temporary.
    """
    path = Path(path)
    removed = []
    for piece in Path(path.parent).glob(f".{glob.escape(path.name)}.*"):
        rest = piece.name[len(path.name) + 2 :]
        if (
            (rest.endswith(".tmp") and piece.is_file())
            or (rest.startswith("tmp-") and piece.is_dir())
            or (replaced and rest.startswith("old-") and path.exists())
        ):
            if piece.is_dir():
                shutil.rmtree(piece, ignore_errors=True)
            else:
                piece.unlink(missing_ok=True)
            removed.append(piece)
    return removed


def restore_moved_aside(path: str | os.PathLike) -> bool:
    """Put back the folder :func:`replace_dir` had moved aside when it was killed between its two
    renames (`path` missing, one ``.<name>.old-*`` beside it: the last complete output). True if it did."""
    path = Path(path)
    if path.exists():
        return False
    old = [p for p in Path(path.parent).glob(f".{glob.escape(path.name)}.old-*") if p.is_dir()]
    if len(old) != 1:
        return False
    os.replace(old[0], path)
    return True


def jsonl_objects(lines: Iterable[str], where: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSONL file, read as it streams; a line that is not a JSON
    object is a DataError naming ``where`` (the file, with any context in front) and the line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}:{lineno}: not a JSON record: {err}") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
        yield lineno, record
