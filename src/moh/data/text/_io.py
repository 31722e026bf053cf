"""Small file helpers for the text pipeline: atomic writes (temporary name + rename) and digests."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` (``os.replace`` is
    atomic on one file system), on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; data files are meant to be read by others
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def check_out_dir(out_dir: str | Path, what: str) -> Path:
    """``out_dir`` as a Path; ValueError naming it when it is empty (would mean the current
    directory), a symbolic link, or a file."""
    if not str(out_dir).strip():
        raise ValueError(f"{what} {str(out_dir)!r} is empty; give a directory path")
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise ValueError(f"{what} {str(out_dir)!r} is a symbolic link; refusing to write through it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{what} {str(out_dir)!r} is a file, not a directory")
    return out_dir


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``; ValueError naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {str(path)!r} holds a {type(obj).__name__}, expected a JSON object")
    return obj
