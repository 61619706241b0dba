"""The checkpoint format: what a losslab checkpoint holds beside Lightning's keys, how it is read
back safely, when a run may resume from it, and the model and tokenizer it gives generate and export.

- Stored beside the weights (:func:`losslab_state`, written by the module's ``on_save_checkpoint``):
  the model's shape (``gpt_config``), its tokenizer as plain data (``tokenizer``, see
  :func:`losslab.tokenizers.tokenizer_to_data`), what resuming must match (``tokenizer_id``,
  ``schedule``: :func:`check_resumable`) and step 0's validation loss (``initial_val_loss``), which a
  resumed run reads back (:func:`restore_losslab_state`). A new field is one line in each.
- Read with ``torch.load(weights_only=True)`` only (:func:`read_checkpoint`, which every reader uses:
  resume, Lightning's and the sharded strategy's loads, generate, export), so tensors and plain
  data, never code, whoever wrote the file; only once its zip archive is checked whole
  (:func:`check_checkpoint_file`); and a one-line :class:`CheckpointError` for any file that is not a
  usable checkpoint (:func:`load_checkpoint_file`).

It is written whole or not at all by :class:`losslab.checkpointing.AtomicCheckpointIO`. No Lightning
here: scripts that only read checkpoints (generate, export) start without importing it.
"""

from __future__ import annotations

import functools
import math
import pickle
import re
import stat
import textwrap
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tiktoken
import torch

from losslab.model import GPT, GPTConfig
from losslab.tokenizers import tokenizer_from_data

if TYPE_CHECKING:
    from losslab.lightning_module import GPTLightningModule

# What every checkpoint that train.py writes holds, of Lightning's keys and losslab's, that its readers need.
LOSSLAB_KEYS = ("gpt_config", "state_dict", "tokenizer", "global_step")
ZIP_SIGNATURE = b"PK\x03\x04"  # how every file that torch.save writes begins
ARCHIVE_READ_BYTES = 1 << 20  # checking an archive reads this much at a time


@dataclass(frozen=True)
class SavedFile:
    """A kind of file that train.py saves with torch.save, as the messages refusing one name it."""

    name: str  # "checkpoint"
    file: str  # "checkpoint file"
    where: str  # where one is found: "checkpoints/last.ckpt of a run"
    instead: str  # what to do when one is damaged


CHECKPOINT = SavedFile(
    "checkpoint", "checkpoint file", "checkpoints/last.ckpt of a run", "use an earlier checkpoint, or train anew"
)


def losslab_state(module: GPTLightningModule) -> dict[str, Any]:
    """What losslab stores in a checkpoint beside Lightning's keys (weights, optimizer, loops)."""
    return {
        "gpt_config": asdict(module.model.config),  # generate and export build the model from it
        "tokenizer": module.tokenizer,  # whole, as plain data: a checkpoint needs nothing else, offline
        "tokenizer_id": module.tokenizer_id,  # its name, size and a hash of its tokens: a resume must match
        "schedule": module.schedule,  # the learning-rate schedule: a resume must match
        "initial_val_loss": module.initial_val_loss,  # the bar a run must end below (losslab.divergence)
    }


def restore_losslab_state(module: GPTLightningModule, checkpoint: dict[str, Any]) -> None:
    """Set on ``module`` what a resumed run reads back from its checkpoint, beside Lightning's own."""
    module.initial_val_loss = checkpoint.get("initial_val_loss", math.nan)  # NaN: a checkpoint older than it


def check_resumable(checkpoint: dict[str, Any], module: GPTLightningModule) -> None:
    """Refuse a checkpoint of another model shape, tokenizer or learning-rate schedule than ``module``'s,
    naming what differs (Lightning would load another shape with a size-mismatch trace, and another
    tokenizer or schedule without a word). Dropout changes no weight: a run may resume with another."""
    saved_model = checkpoint.get("gpt_config", {})
    check_same("model", saved_model, module.model.config.weight_shape(), "the model it was trained with (model.*=...)")
    check_same(
        "tokenizer",
        checkpoint.get("tokenizer_id") or {},
        module.tokenizer_id,
        "its tokenizer and corpus (tokenizer=..., data=...)",
    )
    check_same(
        "learning-rate schedule",
        checkpoint.get("schedule", {}),
        module.schedule,
        "its schedule (schedule.*=...; to train a finished run further at its final learning rate, "
        "set schedule.total_steps to its trainer.max_steps)",
    )


def check_same(what: str, saved: dict[str, Any], here: dict[str, Any], fix: str) -> None:
    """Refuse a checkpoint whose ``saved`` settings differ from ``here`` in a key both have."""
    differing = [
        f"{name}={saved[name]!r} there, {value!r} here"
        for name, value in here.items()
        if name in saved and saved[name] != value
    ]
    if differing:
        raise CheckpointError(
            f"the checkpoint holds another {what} ({'; '.join(differing)}): resume with {fix}, "
            "or drop ckpt_path to start anew"
        )


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, said in one line that names the file and the fix."""


def load_checkpoint_file(path: str | Path, *, key: str | None = None) -> dict[str, Any]:
    """The dict in a checkpoint that train.py wrote, read with ``torch.load(weights_only=True)``.

    Its tensors are memory-mapped, so reading only its metadata reads little of the file. ``key``
    is the option that gave the path, for the messages (``ckpt_path=<path> is ...``).

    Raises CheckpointError when the file is missing, empty, truncated or damaged, holds Python
    objects other than tensors and plain data (which could run code: they are never loaded), or is
    not a losslab checkpoint.
    """
    path = Path(path)
    name = f"{key}={path}" if key else str(path)
    try:
        checkpoint = read_checkpoint(path, name=name, mmap=True)
    except CheckpointError:
        raise
    except Exception as error:  # a damaged archive fails in many ways: RuntimeError, EOFError, KeyError...
        raise CheckpointError(f"{name} {load_problem(error, CHECKPOINT)}") from None
    missing = [k for k in LOSSLAB_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else LOSSLAB_KEYS
    if missing:
        raise CheckpointError(
            f"{name} is not a losslab checkpoint (it has no {', '.join(missing)}): give a checkpoint "
            "that train.py wrote (checkpoints/last.ckpt of a run)"
        )
    return checkpoint


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False, name: str | None = None) -> Any:
    """What ``torch.load(weights_only=True)`` reads from ``path`` (memory-mapped with ``mmap``), once
    :func:`check_checkpoint_file` has found the file whole; CheckpointError (naming the file as
    ``name``) when it is not."""
    check_checkpoint_file(path, name)
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def check_checkpoint_file(path: str | Path, name: str | None = None) -> None:
    """Raise CheckpointError, naming the file as ``name`` (default: its path), unless ``path`` is a
    regular file whose zip archive is whole: every member's bytes match the CRC-32 that torch.save
    stored for it (see :func:`saved_file_problem`)."""
    path = Path(path)
    problem = saved_file_problem(path, CHECKPOINT)
    if problem:
        raise CheckpointError(f"{name or path} {problem}")


def saved_file_problem(path: Path, kind: SavedFile) -> str | None:
    """What keeps ``path`` from being a whole file of ``kind`` that torch.save wrote, if anything, said
    as the end of a sentence that begins with its name: the file itself (:func:`file_problem`), then
    its zip archive, every member read whole, its bytes checked against the CRC-32 in its header
    (torch.save stores one for each; torch.load never checks them). The archive is read at the speed
    of the disk or page cache (1.5-3 GB/s here); a file checked before, unchanged since (the same
    inode, size and modification time), is not read again."""
    problem = file_problem(path, kind)
    if problem:
        return problem
    damage = archive_damage(path)
    return f"is truncated or damaged ({damage}): {kind.instead}" if damage else None


def file_problem(path: Path, kind: SavedFile) -> str | None:
    """What keeps ``path`` from being a file of ``kind`` before reading it, if anything."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return f"does not exist: give the path of a {kind.name} ({kind.where})"
    if stat.S_ISDIR(mode):
        return f"is a folder: give a {kind.file} in it ({kind.where})"
    if not stat.S_ISREG(mode):  # reading a FIFO waits for a writer; a device never ends
        return f"is not a regular file (a FIFO, socket or device): give a {kind.file} ({kind.where})"
    try:
        with open(path, "rb") as file:
            start = file.read(len(ZIP_SIGNATURE))
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not start:
        return f"is empty (a save that never finished?): {kind.instead}"
    if start != ZIP_SIGNATURE:
        return (
            f"is not a {kind.name} (torch.save writes a zip archive, and this file is not one): give a "
            f"{kind.name} that train.py wrote"
        )
    return None


def archive_damage(path: Path) -> str | None:
    """What :func:`saved_file_problem` finds damaged in the zip archive at ``path``, in a few words, or None."""
    info = path.stat()
    return checked_archive(str(path.resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def checked_archive(path: str, *identity: int) -> str | None:
    """:func:`archive_damage` of the file at ``path`` as it was when it had ``identity``."""
    member = None
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                with archive.open(member) as data:
                    while data.read(ARCHIVE_READ_BYTES):
                        pass
    except Exception as error:  # zipfile reports damage as BadZipFile, EOFError, OSError, zlib.error...
        if member is None:
            reason = "the zip archive's directory, at the end of the file, is missing or damaged"
        elif "CRC" in str(error):
            reason = f"{member.filename} does not match its CRC-32"
        else:
            reason = f"{member.filename}: {(str(error).splitlines() or [type(error).__name__])[0]}"
        return reason
    return None


def load_problem(error: Exception, kind: SavedFile) -> str:
    """What ``torch.load(weights_only=True)`` failing with ``error`` says about the file of ``kind``.

    Never torch's own message, which advises loading with ``weights_only`` turned off: for a file that
    holds code, that runs it; for a damaged one, it helps nothing.
    """
    refused = re.search(r"GLOBAL ([\w.]+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if refused:
        return (
            f"holds Python objects other than tensors and plain data ({refused[1]}), which could run code "
            f"when loaded, so it is not loaded: give a {kind.name} that train.py wrote"
        )
    reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]
    return f"is not a complete {kind.name} (truncated or damaged: {reason}): {kind.instead}"


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> GPT:
    """The GPT, in eval mode, of a checkpoint that :func:`load_checkpoint_file` read from ``path``.

    Raises CheckpointError when the model cannot be built from it, or when a weight is NaN or
    infinite (it would give NaN logits: sampling fails, an export holds them silently).
    """
    prefix = "model."
    try:
        model = GPT(GPTConfig(**checkpoint["gpt_config"]))
        model.load_state_dict(
            {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        )
    except (AttributeError, TypeError, ValueError, RuntimeError) as error:  # a bad gpt_config, weights that do not fit
        reason = textwrap.shorten(str(error), 200)
        raise CheckpointError(f"{path} holds a model that cannot be built ({reason}): use another checkpoint") from None
    for name, tensor in model.state_dict().items():
        n_bad = tensor.numel() - int(torch.isfinite(tensor).sum()) if tensor.is_floating_point() else 0
        if n_bad:
            raise CheckpointError(
                f"{path} holds non-finite weights ({name}: {n_bad:,} of {tensor.numel():,} values are NaN or "
                "infinite): use an earlier checkpoint of the run (its best-step<N>.ckpt), or train anew"
            )
    return model.eval()


def tokenizer_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> tiktoken.Encoding:
    """The tokenizer of a checkpoint that :func:`load_checkpoint_file` read from ``path``."""
    data = checkpoint["tokenizer"]
    if isinstance(data, bytes):
        raise CheckpointError(
            f"{path} stores its tokenizer as a pickle (losslab's old format), which could run code when "
            "loaded, so it is not loaded: train anew, or train its run further with train.py ckpt_path=... "
            "(its new checkpoints store the tokenizer as data)"
        )
    try:
        return tokenizer_from_data(data)
    except ValueError as error:
        raise CheckpointError(f"{path} holds a damaged tokenizer ({error}): use an earlier checkpoint") from None


def load_model(path: str | Path) -> tuple[GPT, tiktoken.Encoding]:
    """The GPT (in eval mode) and the tokenizer stored in a checkpoint, as generate.py and export.py
    use them; CheckpointError when the file is not a usable one."""
    checkpoint = load_checkpoint_file(path)
    return model_from_checkpoint(checkpoint, path), tokenizer_from_checkpoint(checkpoint, path)
