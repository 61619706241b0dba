"""The files a run reads and writes: :class:`DataError` for the data files it cannot use (a corpus,
GPT-2's ranks), and writing a file whole or not at all, through a temporary file that no one else
can have planted and that a later writer removes if its own writer was killed."""

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
    """A binary file for ``path``'s new content, which replaces ``path`` in one rename at the end.

    Readers never see a half-written file, and a process that still maps the old one keeps it.
    The temporary file is created new (see :func:`temporary_path`), so processes that build the same
    cache at the same time never write to or rename away each other's file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "xb") as file:
            yield file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
