"""Small helpers shared across stages: atomic file writes, output checks."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; checkpoints and data are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_writable(path: str | Path, directory: bool = True) -> Path:
    """Fail with a one-line ``OpenGLMError`` unless ``path`` can be written, before any work starts.

    ``directory``: ``path`` is an output directory; otherwise an output file. Writability is tried
    with a real temporary file, so read-only mounts, permissions and a file standing where a folder
    should be are all caught. Folders this check had to create are removed again: a run that fails
    later leaves nothing behind, and the writers create their folders themselves.
    """
    from .errors import OpenGLMError

    path = Path(path)
    folder = path if directory else path.parent
    if directory and path.exists() and not path.is_dir():
        raise OpenGLMError(f"cannot write into {path}: it is a file, not a directory")
    if not directory and path.is_dir():
        raise OpenGLMError(f"cannot write {path}: it is a directory")
    created = folder
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    created = None if created.exists() else created
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OpenGLMError(f"cannot write to {path}: {e.strerror or e}") from None
    finally:
        if created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
