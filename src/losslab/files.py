"""Writing a file whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def replaced_atomically(path: Path) -> Iterator[BinaryIO]:
    """A binary file for ``path``'s new content, which replaces ``path`` in one rename at the end.

    Readers never see a half-written file, and a process that still maps the old one keeps it.
    The temporary name holds the process id: processes that build the same cache at the same
    time never rename each other's file away.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            yield file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
