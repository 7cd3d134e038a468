"""Durable writes on disk: a crash or a full disk leaves the old state or the new one, never half of it.

Files and folders are written beside their destination (same filesystem, so the rename is atomic), fsynced,
renamed into place, and the parent folder is fsynced so that the rename itself survives a power cut.
Used for imported models, published adapters and frozen dataset versions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder some filesystems cannot open for fsync is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder, name))
        fsync_path(Path(folder))


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write data to path via a temporary sibling, fsync it, rename it in place, fsync the folder."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside target; on success it is fsynced and renamed onto target, else removed.

    Raises FileExistsError when target appeared meanwhile (another writer won): the first one is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; these folders are read by other processes
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            raise FileExistsError(f"{target} appeared while it was being written; keeping that one")
        os.rename(tmp, target)
        fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
