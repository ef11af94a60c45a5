"""Atomic file output shared by every tool: write to a temp file beside the target, then rename.

A crash mid-write leaves the old file (or nothing), never a half-written one; an existing output
is only replaced when the caller says so (the CLIs' `--overwrite`). `file_sha256` is the digest
that outputs record of the files they depend on (a tokenizer, k-means centroids).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pn_base.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """An output already exists and the user did not ask to overwrite it."""


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` exists and may not be replaced."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto `path` on success.

    Works for files and directories. On an exception the temporary is removed and `path` is
    untouched.
    """
    path = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # the caller creates a file or a directory under this name
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_json(path: str | os.PathLike, obj, overwrite: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", overwrite)


def atomic_write_figure(path: str | os.PathLike, fig, overwrite: bool = True, **savefig) -> None:
    """A matplotlib figure (anything with `savefig`), in the format its name's suffix says."""
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or None, **savefig)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
