"""Atomic file writes that respect the user's umask."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "give_umask_mode", "write_text_atomic"]


def give_umask_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode of a file the user creates (0o666 less the umask): some writers,
    safetensors' among them, create files readable by their owner only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (parents created); it replaces ``path`` only if the
    block succeeds, with the umask's mode whatever wrote it, and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        give_umask_mode(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
