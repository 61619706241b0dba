"""Reading a checkpoint that train.py wrote, safely: with ``torch.load(weights_only=True)`` only
(:func:`load_checkpoint_file`), so tensors and plain data, never code, whoever wrote the file; and a
one-line :class:`CheckpointError` for any file that is not a usable checkpoint.

Besides Lightning's own keys, a checkpoint holds the model's shape (``gpt_config``), its tokenizer
as plain data (``tokenizer``, see :func:`losslab.tokenizers.tokenizer_to_data`) and what resuming
must match (``tokenizer_id``, ``schedule``). No Lightning here: scripts that only read checkpoints
(generate, export) start without importing it.
"""

from __future__ import annotations

import pickle
import re
import textwrap
from pathlib import Path
from typing import Any

import tiktoken
import torch

from losslab.model import GPT, GPTConfig
from losslab.tokenizers import tokenizer_from_data

# What every checkpoint that train.py writes holds, besides Lightning's own keys.
LOSSLAB_KEYS = ("gpt_config", "state_dict", "tokenizer", "global_step")
ZIP_SIGNATURE = b"PK\x03\x04"  # how every file that torch.save writes begins


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
    problem = file_problem(path)
    if problem:
        raise CheckpointError(f"{name} {problem}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a damaged archive fails in many ways: RuntimeError, EOFError, KeyError...
        raise CheckpointError(f"{name} {load_problem(error)}") from None
    missing = [k for k in LOSSLAB_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else LOSSLAB_KEYS
    if missing:
        raise CheckpointError(
            f"{name} is not a losslab checkpoint (it has no {', '.join(missing)}): give a checkpoint "
            "that train.py wrote (checkpoints/last.ckpt of a run)"
        )
    return checkpoint


def file_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a checkpoint file before reading it, if anything."""
    if not path.exists():
        return "does not exist: give the path of a checkpoint (checkpoints/last.ckpt of a run)"
    if path.is_dir():
        return "is a folder: give a checkpoint file in it (checkpoints/last.ckpt of a run)"
    try:
        with open(path, "rb") as file:
            start = file.read(len(ZIP_SIGNATURE))
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not start:
        return "is empty (a save that never finished?): use an earlier checkpoint, or train anew"
    if start != ZIP_SIGNATURE:
        return (
            "is not a checkpoint (torch.save writes a zip archive, and this file is not one): give a "
            "checkpoint that train.py wrote"
        )
    return None


def load_problem(error: Exception) -> str:
    """What ``torch.load(weights_only=True)`` failing with ``error`` says about the file.

    Never torch's own message, which advises loading with ``weights_only`` turned off: for a file that
    holds code, that runs it; for a damaged one, it helps nothing.
    """
    refused = re.search(r"GLOBAL ([\w.]+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if refused:
        return (
            f"holds Python objects other than tensors and plain data ({refused[1]}), which could run code "
            "when loaded, so it is not loaded: give a checkpoint that train.py wrote"
        )
    reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]
    return f"is not a complete checkpoint (truncated or damaged: {reason}): use an earlier checkpoint, or train anew"


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> GPT:
    """The GPT, in eval mode, of a checkpoint that :func:`load_checkpoint_file` read from ``path``."""
    prefix = "model."
    try:
        model = GPT(GPTConfig(**checkpoint["gpt_config"]))
        model.load_state_dict(
            {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        )
    except (AttributeError, TypeError, ValueError, RuntimeError) as error:  # a bad gpt_config, weights that do not fit
        reason = textwrap.shorten(str(error), 200)
        raise CheckpointError(f"{path} holds a model that cannot be built ({reason}): use another checkpoint") from None
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
