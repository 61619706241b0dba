"""What the audit (:mod:`losslab.audit`) measures on: a run's model, and the final hidden states it
computes on batches of the run's own validation data.

The checkpoint is read as every script reads one (:func:`~losslab.checkpoint_files.load_checkpoint_file`:
tensors and plain data only, checked whole); the run's data settings come from its folder, beside
``checkpoints/``: ``hparams.yaml`` (resolved), else Hydra's ``.hydra/config.yaml``. They are read as
plain data (``yaml.safe_load``): their ``_target_`` is never imported or called. Relative paths are
the training's, taken from the folder it ran in (Hydra's ``.hydra/hydra.yaml``) where known. The
validation split is built as training builds it, through :class:`~losslab.data.GPTDataModule` and its
token cache, with the checkpoint's own tokenizer: offline, nothing trained or downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from losslab.checkpoint_files import load_checkpoint_file, model_from_checkpoint, tokenizer_from_checkpoint
from losslab.data import DataConfig, GPTDataModule
from losslab.files import DataError
from losslab.losses import TokenLoss
from losslab.targets import IGNORE_INDEX

SETTINGS_FILES = ("hparams.yaml", ".hydra/config.yaml")
# The options that every registry entry shares and that change the loss's value: the run's are audited.
LOSS_OPTIONS = {
    "ignore_index": IGNORE_INDEX,
    "label_smoothing": 0.0,
    "z_loss": 0.0,
    "softcap": None,
    "temperature": 1.0,
}
DATA_FIX = "pass --data-path=<the corpus the run trained on> (and --cache-dir=<the token cache it used>)"


class AuditError(ValueError):
    """What keeps the audit from running, said in one line with what to pass or do."""


@dataclass
class Activations:
    """The audit's inputs: the final hidden states of every position of the batches, flat, with
    their targets, and the LM head; the run's loss options; what they are, for the report."""

    hidden: Tensor  # (N, d) float32
    targets: Tensor  # (N,)
    weight: Tensor  # (V, d)
    bias: Tensor | None  # (V,)
    first_batch: slice  # the positions of the first batch: its rows one after another
    first_row: slice  # the positions of its first row
    loss_options: dict[str, Any]
    description: dict[str, str]


def run_folder(checkpoint: Path) -> Path:
    """The run's folder: the parent of ``checkpoints/``, else the checkpoint's own folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def run_settings(checkpoint: Path) -> dict[str, Any]:
    """The run's resolved config (its ``data`` and ``loss``), from its folder."""
    folder = run_folder(checkpoint)
    for name in SETTINGS_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            settings = OmegaConf.create(yaml.safe_load(path.read_text()))
            return {key: OmegaConf.to_container(settings[key], resolve=True) for key in ("data", "loss")}
        except (OSError, yaml.YAMLError, OmegaConfBaseException, ValueError, KeyError, TypeError) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise AuditError(
                f"{path} holds no usable data and loss settings ({reason}): audit a run's own checkpoint"
            ) from None
    raise AuditError(
        f"no run settings beside {checkpoint} ({' or '.join(str(folder / name) for name in SETTINGS_FILES)}): "
        "audit a checkpoint in its run's checkpoints/ folder, where train.py wrote it"
    )


def training_folder(checkpoint: Path) -> Path:
    """The folder training ran in, which its relative paths are relative to: Hydra's record, else here."""
    try:
        hydra = yaml.safe_load((run_folder(checkpoint) / ".hydra" / "hydra.yaml").read_text())
        return Path(hydra["hydra"]["runtime"]["cwd"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return Path.cwd()


def validation_batches(
    data: dict[str, Any], where: Path, batches: int, context_length: int, tokenizer: Any
) -> list[dict[str, Tensor]]:
    """``batches`` batches spread over the validation split that the run's ``data`` settings make
    (fewer if it is smaller), its relative paths taken from ``where``."""
    data = dict(data)
    for key in ("path", "cache_dir"):
        if data.get(key) is not None and not Path(data[key]).expanduser().is_absolute():
            data[key] = str(where / data[key])
    if data.get("corpus") == "shakespeare" and data.get("path") is None:  # the copy training downloaded, not a new one
        data["path"] = str(Path(data["cache_dir"]) / "corpora" / "tinyshakespeare.txt")
    known = {field.name for field in fields(DataConfig)}
    options = {key: value for key, value in data.items() if key in known}
    # ranks_path=None: the checkpoint's own tokenizer is used, and GPT-2's ranks file is not read
    options.update(context_length=context_length, val_batches=batches, num_workers=0, ranks_path=None)
    try:
        datamodule = GPTDataModule(DataConfig(**options))
        datamodule.setup("validate", tokenizer=tokenizer)
        return list(datamodule.val_dataloader())
    except (DataError, ValueError, TypeError) as error:  # a corpus gone, a setting out of range or of a wrong type
        raise AuditError(f"the run's validation data cannot be read ({error}): {DATA_FIX}") from None


def load_activations(
    checkpoint: str | Path,
    batches: int = 4,
    data_path: str | None = None,
    cache_dir: str | None = None,
    device: str = "cpu",
) -> Activations:
    """The :class:`Activations` of a run's checkpoint on ``batches`` batches of its validation data.

    Raises CheckpointError for a file that is not a usable checkpoint, AuditError when the run's
    settings or data cannot be found.
    """
    checkpoint = Path(checkpoint)
    saved = load_checkpoint_file(checkpoint)
    model = model_from_checkpoint(saved, checkpoint).to(device)
    tokenizer = tokenizer_from_checkpoint(saved, checkpoint)
    settings = run_settings(checkpoint)
    data = dict(settings["data"] or {})
    data.update({key: value for key, value in (("path", data_path), ("cache_dir", cache_dir)) if value is not None})
    rows = validation_batches(data, training_folder(checkpoint), batches, model.config.context_length, tokenizer)
    if not rows:
        raise AuditError(f"the run's validation split gave no batch: {DATA_FIX}")
    with torch.no_grad():
        hidden = [model.hidden_states(batch["input_ids"].to(device)) for batch in rows]
    targets = [batch["targets"].to(device) for batch in rows]
    rows_in_first, row_length = targets[0].shape
    loss = settings["loss"] or {}
    loss_options = {key: loss.get(key, default) for key, default in LOSS_OPTIONS.items()}
    try:
        TokenLoss(**loss_options)  # the checks every entry makes of them
    except (TypeError, ValueError) as error:
        raise AuditError(f"the run's loss settings are not a loss's ({error}): audit a run's own checkpoint") from None
    head = model.lm_head
    flat_targets = torch.cat([t.reshape(-1) for t in targets])
    description = {
        "checkpoint": f"{checkpoint} (step {saved['global_step']})",
        "model": f"{model.config.n_layer} layers, d={model.config.n_embd}, V={model.config.vocab_size}"
        + (", LM head with a bias" if head.bias is not None else ""),
        "data": f"{data.get('corpus')} validation split: {sum(len(t) for t in targets)} rows in {len(rows)} batches "
        f"of up to {rows_in_first} ({int((flat_targets != loss_options['ignore_index']).sum()):,} targets)",
        "loss options": ", ".join(f"{key}={value}" for key, value in loss_options.items()),
    }
    return Activations(
        hidden=torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden]),
        targets=flat_targets,
        weight=head.weight.detach(),
        bias=None if head.bias is None else head.bias.detach(),
        first_batch=slice(0, rows_in_first * row_length),
        first_row=slice(0, row_length),
        loss_options=loss_options,
        description=description,
    )
