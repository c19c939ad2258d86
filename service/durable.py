"""Durable, all-or-nothing file writes: what the spool and the result folder both need.

A file is written under a temporary name, flushed and fsynced, then renamed
over its target, so a reader sees the old file or the whole new one, never
half of one; the rename is durable only once the directory that holds the
entry is fsynced too (a power cut otherwise may lose it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a rename into it, a file made in it)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_synced(path: Path, content: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``content`` (bytes, or a function writing to the open stream) to a new file at ``path`` and fsync it.

    The file is removed if anything fails. No rename and no folder fsync: :func:`write_durably` adds those, and
    the spool, which stages an instance's bytes before it knows the name they get, does them itself.
    """
    try:
        with path.open("wb") as stream:
            if isinstance(content, bytes):
                stream.write(content)
            else:
                content(stream)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_durably(
    path: Path,
    content: bytes | Callable[[BinaryIO], object],
    tmp_dir: Path,
    *,
    hidden: bool = False,
    sync_directory: bool = True,
) -> None:
    """Put ``content`` at ``path`` atomically: temporary file, fsync, rename, fsync of the directory.

    Parameters
    ----------
    path
        The target; an existing file there is replaced.
    content
        The bytes, or a function that writes them to the open stream
        (e.g. ``dataset.save_as``).
    tmp_dir
        Where the temporary file is written: on ``path``'s file system,
        so that the rename is atomic.
    hidden
        Start the temporary file's name with a dot, so that a reader
        listing ``tmp_dir`` (a folder someone else watches) passes it over.
    sync_directory
        Fsync ``path``'s directory before returning. A caller that writes
        many files into few folders passes ``False`` and calls
        :func:`fsync_directory` once per folder itself.

    The temporary file is removed when anything fails.
    """
    tmp = tmp_dir / f"{'.' if hidden else ''}{path.name}.{uuid.uuid4().hex}.tmp"
    write_synced(tmp, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_directory:
        fsync_directory(path.parent)
