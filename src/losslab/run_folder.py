"""A run's folder when more than one job reaches it: who is using it, what a job that does not go on
to train leaves there, and where Hydra records each job.

- ``run.lock``, locked (``fcntl.flock``) for as long as a job runs in the folder, names the job (its
  process id and command): a second job there (resuming the run while it trains) is refused,
  naming the first. The kernel drops a lock when its process ends, however it ends: none is stale.
- Hydra records the first job in ``.hydra/`` and each later one (a resume) in ``.hydra/resume-<n>/``
  (:func:`record_subdir`), so the run's own config stays as it was.
- A job that stops before it trains (a refused resume, nothing left to train, a bad value) leaves
  the folder as it found it (:class:`FolderState`); a new folder goes entirely.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only

from losslab.config_checks import ConfigError
from losslab.run_logs import EVENT_FILES
from losslab.run_status import STATUS_FILE

LOCK_FILE = "run.lock"
RECORD = ".hydra"
# What a job's folder holds before it trains: Hydra's record, its log and the lock.
BEFORE_TRAINING = {RECORD, "train.log", LOCK_FILE}
# A folder of nothing but those, older than this and not locked, is left by a job killed before it trained.
LEFTOVER_AGE_S = 60

log = logging.getLogger(__name__)
recorded: dict[str, str | None] = {}  # the record subfolder of each job folder, once chosen


class FolderInUse(ConfigError):
    """Another job runs in the folder."""


def record_subdir(output_dir: str) -> str | None:
    """Where Hydra records a job (``hydra.output_subdir``): ``.hydra`` in a new folder, else
    ``.hydra/resume-<n>`` (the n-th job after the first); None in every process but the first
    (global rank 0), whose record would be the same. Chosen once per folder and process."""
    if output_dir not in recorded:
        record = Path(output_dir) / RECORD
        if rank_zero_only.rank != 0:
            recorded[output_dir] = None
        elif not (record / "config.yaml").exists():
            recorded[output_dir] = RECORD
        else:
            recorded[output_dir] = f"{RECORD}/resume-{len(list(record.glob('resume-*'))) + 1}"
    return recorded[output_dir]


@contextmanager
def locked(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs; :class:`FolderInUse` (naming ``what`` the job
    would do there and the job that holds it) when another job holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            raise FolderInUse(
                f"{what}: {folder} is in use by {holder}: wait for it to end, or train a copy in a new "
                "folder (branch=true)"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} ({' '.join(['python', *sys.argv])})\n")
        file.flush()
        yield


@dataclass
class FolderState:
    """What a job's folder held when the job began, so that a job that ends before it trains can leave
    it as it found it (:meth:`restore`)."""

    folder: Path
    new: bool  # nothing there but what Hydra wrote for this job
    log_size: int
    status: tuple[int, int] | None  # status.json's inode and time: a job that trains rewrites it
    lock: str | None  # what run.lock said (the job before)

    @classmethod
    def of(cls, folder: Path) -> FolderState:
        names = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
        train_log, lock = folder / "train.log", folder / LOCK_FILE
        return cls(
            folder,
            new=names <= BEFORE_TRAINING and not (folder / RECORD / "resume-1").exists(),
            log_size=train_log.stat().st_size if train_log.exists() else 0,
            status=stamp(folder / STATUS_FILE),
            lock=lock.read_text() if lock.exists() else None,
        )

    def trained(self) -> bool:
        """Whether the job began training: it wrote status.json."""
        return stamp(self.folder / STATUS_FILE) != self.status

    def restore(self, record: str | None) -> None:
        """Leave the folder as the job found it, the job still holding its lock: a new one removed;
        in a run's folder, the job's record (``record``, Hydra's subfolder for it) removed, its lines
        cut from train.log and the lock's note of the job before it back."""
        if self.new:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        if record and record != RECORD:
            shutil.rmtree(self.folder / record, ignore_errors=True)
        train_log, lock = self.folder / "train.log", self.folder / LOCK_FILE
        if train_log.exists() and train_log.stat().st_size > self.log_size:
            os.truncate(train_log, self.log_size)
        if self.lock is None:
            lock.unlink(missing_ok=True)
        else:
            lock.write_text(self.lock)


def holds_run(folder: Path) -> bool:
    """Whether a run has trained in ``folder``: it holds its status, checkpoints or curves."""
    return any((folder / name).exists() for name in (STATUS_FILE, "checkpoints")) or any(folder.glob(EVENT_FILES))


def writes_to_itself(folder: Path) -> bool:
    """Whether the job that Hydra recorded in ``folder`` had it as its output folder (the default)."""
    try:
        with open(folder / RECORD / "config.yaml") as file:
            output_dir = ((yaml.safe_load(file) or {}).get("paths") or {}).get("output_dir")
    except (OSError, yaml.YAMLError):
        return False
    return output_dir == "${hydra:runtime.output_dir}" or output_dir == str(folder)


def stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def remove_leftovers(parent: Path, keep: Path) -> None:
    """Remove the folders in ``parent`` (but ``keep``) of jobs killed before they trained (SIGKILL
    leaves no time to clean up): nothing but Hydra's record, a log and a lock, the job's own output
    folder (not Hydra's folder of a job that wrote elsewhere: paths.output_dir=...), untouched for a
    minute and locked by no job."""
    for folder in parent.iterdir() if parent.is_dir() else []:
        if folder == keep or not folder.is_dir() or not {p.name for p in folder.iterdir()} <= BEFORE_TRAINING:
            continue
        if not writes_to_itself(folder):
            continue
        if time.time() - max(p.stat().st_mtime for p in [folder, *folder.iterdir()]) < LEFTOVER_AGE_S:
            continue
        try:
            with locked(folder, "remove"):
                shutil.rmtree(folder)
        except (FolderInUse, OSError):
            continue
        log.info(f"Removed {folder}: left by a run killed before it trained (it held nothing but its config)")
