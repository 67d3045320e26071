"""Atomic writes: a reader finds the previous file or folder or the new one whole, never half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``: what is written there replaces ``path`` when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def swap_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``. A folder already at ``final`` is moved aside first and
    removed after (a rename cannot replace a folder that has files), so ``final`` is never missing for long
    and never half written."""
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
