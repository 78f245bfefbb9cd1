"""Atomic file writes: a file is either its old whole self or its new whole self, never half of one.

The lowest layer of the apps: :mod:`rowcol.apps.checkpoint` (run directories), :mod:`rowcol.apps.data`
(split files) and :mod:`rowcol.apps.plots` (figures) write through :func:`atomic_write`. It imports
nothing of rowcol.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ['atomic_write', 'write_text', 'write_json']


def atomic_write(path: str | Path, write: Callable[[str], None], overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, rename it to ``path``.

    With ``overwrite=False`` an existing ``path`` (even one that appeared while writing) is
    never replaced: ``FileExistsError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a run directory is meant to be shared
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: never clobbers a file that appeared meanwhile
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """``text`` into ``path``, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON (and a final newline) into ``path``, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
            f.write('\n')
    atomic_write(path, write)
