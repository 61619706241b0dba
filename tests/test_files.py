"""Files written whole or not at all: the temporary file is always a new one (a link planted beside
the target is never followed), and the leftover of a writer killed before its rename is removed by
the next writer. Both writers: ``replaced_atomically`` (caches, tokenizers, status) and checkpoints."""

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from losslab import files
from losslab.checkpointing import AtomicCheckpointIO
from losslab.files import replaced_atomically

# A writer killed between writing its temporary file and renaming it.
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from losslab.files import replaced_atomically

with replaced_atomically(Path(sys.argv[1])) as file:
    file.write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def save(io: AtomicCheckpointIO, path: Path, step: int) -> None:
    io.save_checkpoint({"global_step": step, "weights": torch.full((3,), float(step))}, path)


def write(writer: str, path: Path) -> None:
    if writer == "replaced_atomically":
        with replaced_atomically(path) as file:
            file.write(b"new")
    else:
        save(AtomicCheckpointIO(), path, 1)


@pytest.mark.parametrize("writer", ["replaced_atomically", "AtomicCheckpointIO"])
def test_a_link_planted_at_a_temporary_name_is_never_followed(tmp_path, monkeypatch, writer):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    path = tmp_path / "last.ckpt"
    os.symlink(target, tmp_path / "last.ckpt.tmp")  # the name the checkpoint writer used before
    write(writer, path)
    assert target.read_text() == "keep me" and path.is_file() and not path.is_symlink()
    # even at the very name the writer picks (its random part is not guessable: made known here)
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "0123abcd")
    os.symlink(target, tmp_path / f"last.ckpt.{socket.gethostname()}-{os.getpid()}.0123abcd.tmp")
    with pytest.raises(FileExistsError):
        write(writer, path)
    assert target.read_text() == "keep me"


def test_checkpoints_of_one_step_are_still_one_file(tmp_path):
    io = AtomicCheckpointIO()
    save(io, tmp_path / "last.ckpt", 6)
    save(io, tmp_path / "best-step6.ckpt", 6)
    assert os.path.samefile(tmp_path / "last.ckpt", tmp_path / "best-step6.ckpt")
    save(io, tmp_path / "last.ckpt", 7)  # a new file: the best keeps step 6
    assert torch.load(tmp_path / "best-step6.ckpt", weights_only=True)["global_step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-step6.ckpt", "last.ckpt"]


def test_a_killed_writer_s_leftover_is_removed_by_the_next_writer(tmp_path):
    path = tmp_path / "tokens.bin"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = tmp_path.glob("tokens.bin.*.tmp")
    # the killed writer's files of other names in the folder go too (a cache's name changes with its
    # corpus); a live writer's, and those of another host (whose processes cannot be seen), stay
    host, dead_pid = socket.gethostname(), re.search(r"-(\d+)\.[0-9a-f]{8}\.tmp$", leftover.name)[1]
    killed_other = tmp_path / f"old-tokens.json.{host}-{dead_pid}.0badc0de.tmp"
    live = tmp_path / f"tokens.bin.{host}-{os.getpid()}.89abcdef.tmp"
    other_host = tmp_path / f"tokens.bin.other-{host}-{dead_pid}.89abcdef.tmp"
    for temporary in (killed_other, live, other_host):
        temporary.touch()
    with replaced_atomically(path) as file:
        file.write(b"whole")
    assert path.read_bytes() == b"whole" and not leftover.exists() and not killed_other.exists()
    assert sorted(tmp_path.iterdir()) == sorted([path, live, other_host])
