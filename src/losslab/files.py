"""The files a run reads and writes: :class:`DataError` for the data files it cannot use (a corpus,
GPT-2's ranks), and the one way every file is written whole or not at all (caches, tokenizers,
status.json, checkpoints): through a temporary file that no one else can have planted and that a
later writer removes if its own writer was killed, renamed over the file at the end."""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


class DataError(ValueError):
    """A corpus, or a tokenizer's file, that cannot be used: said in one line that names the file or
    the key, and the fix (train.py prints it alone, as it does a ConfigError)."""


@contextmanager
def replaced_atomically(path: Path) -> Iterator[BinaryIO]:
    """A binary file for ``path``'s new content, which replaces ``path`` in one rename at the end
    (:func:`atomic_replacement`; not synced to disk: caches, tokenizers, status.json).

    Readers never see a half-written file, and a process that still maps the old one keeps it.
    The temporary file is created new (see :func:`temporary_path`), so processes that build the same
    cache at the same time never write to or rename away each other's file.
    """
    with atomic_replacement(path) as tmp, open(tmp, "xb") as file:
        yield file


@contextmanager
def atomic_replacement(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temporary name beside ``path`` (:func:`temporary_path`), at which the block creates ``path``'s
    new content as a new file (``open(tmp, "xb")``, or ``os.link`` to a file it is to equal); renamed
    over ``path`` when the block ends, removed when it fails.

    With ``durable``, the file is synced to disk before the rename, and the folder after it: a machine
    that loses power then keeps the previous file or the new one, whole (without, the rename may
    reach the disk before the file's content). For checkpoints; a cache can be built again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if durable:
            sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        sync(path.parent)


def sync(path: Path) -> None:
    """Write a file's content, or a folder's entries, through to the disk (``fsync``)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_path(path: Path) -> Path:
    """A name beside ``path`` for its next content, once the leftovers of killed writers are removed.

    The name holds this host and process, which tells a later writer whether its writer is gone, and
    a random part: created with ``open(..., "x")`` (``O_CREAT | O_EXCL``), it is a new file, never a
    link or a file that someone planted there beforehand.
    """
    remove_leftovers(path)
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_leftovers(path: Path) -> None:
    """Remove the temporary files in ``path``'s folder (of any file in it: a cache's name changes with
    its corpus) that processes of this host wrote and were killed before renaming. A process of
    another host, which may share the folder, cannot be known to be gone: its files stay."""
    ours = re.compile(rf"\.{re.escape(socket.gethostname())}-(?P<pid>\d+)\.[0-9a-f]{{8}}\.tmp$")
    for leftover in path.parent.glob("*.tmp"):
        writer = ours.search(leftover.name)
        if writer and not is_running(int(writer["pid"])):
            leftover.unlink(missing_ok=True)


def is_running(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
