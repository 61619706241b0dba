"""The run's checkpoints: ``last.ckpt`` to resume, the best by ``val/loss``, written whole or not at
all, with the random states that exact resume needs.

Lightning's checkpoint already holds the weights, the optimizer and scheduler states and the
loops' progress; the training loader's position is in it too (losslab.data.ResumableDataLoader).
What losslab adds, and how any checkpoint is read back safely, is in :mod:`losslab.checkpoint_files`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint

from losslab.checkpoint_files import check_checkpoint_file
from losslab.files import temporary_path
from losslab.lightning_module import reached_max_steps

KEEP = ("both", "last", "best")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint whole or not at all, on the local file system.

    The checkpoint goes to a new temporary file beside its path (:func:`losslab.files.temporary_path`:
    never a link planted there, and a killed save's leftover is removed by the next save), is synced
    to disk, then renamed over the path, and the rename is synced too: a run killed during a save (or
    the machine losing power) leaves the previous checkpoint as it was.

    A checkpoint of the same step as the one saved just before it in the same folder (``last.ckpt``
    and the best, when the last validation is the best) is a hard link to that file: the same
    weights, optimizer state and position, stored once. Replacing ``last.ckpt`` later gives it a
    new file and leaves the link with the old one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.previous: tuple[int, Path] | None = None  # the step and path of the last save

    def load_checkpoint(
        self, path: _PATH, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's load of a file that passed :func:`check_checkpoint_file` (whole, its
        checksums right), always with ``weights_only=True``: a checkpoint never runs code.

        The tensors are loaded to the CPU, as by Lightning's own default; it moves them after.
        """
        if weights_only is False:
            raise ValueError("losslab loads checkpoints with weights_only=True only: they hold no code")
        check_checkpoint_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        step = checkpoint.get("global_step")
        try:
            if not self.link_previous(step, path, tmp):
                with open(tmp, "xb") as file:  # a new file: never a link planted at its name
                    torch.save(checkpoint, file)
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.previous = (step, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def link_previous(self, step: int | None, path: Path, tmp: Path) -> bool:
        """Hard-link ``tmp`` to the previous save when it holds the same step in the same folder."""
        if self.previous is None or step is None:
            return False
        previous_step, previous_path = self.previous
        if previous_step != step or previous_path == path or previous_path.parent != path.parent:
            return False
        try:  # a new name, like open(..., "x"): link() never replaces what is there
            os.link(previous_path, tmp)
        except OSError:  # gone, or a file system without hard links: write it out instead
            return False
        return True


def check_keep(keep: str) -> str:
    if keep not in KEEP:
        raise ValueError(f"keep_checkpoints={keep!r}: choose one of {', '.join(KEEP)}")
    return keep


class BestCheckpoint(ModelCheckpoint):
    """Keeps ``dirpath/best-step<N>.ckpt``, the checkpoint of the lowest finite ``val/loss``.

    A NaN or infinite validation loss is never the best (Lightning's own ``ModelCheckpoint`` takes
    one as the first best when it has none). With ``keep="last"`` it keeps nothing.
    """

    def __init__(self, dirpath: _PATH, keep: str = "both") -> None:
        super().__init__(
            dirpath=dirpath,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor="val/loss",
            mode="min",
            save_top_k=0 if check_keep(keep) == "last" else 1,
        )

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None or not torch.isfinite(current):
            return False
        return super().check_monitor_top_k(trainer, current)


class LastCheckpoint(ModelCheckpoint):
    """Saves ``dirpath/last.ckpt`` every ``every_n_train_steps`` steps and when training ends.

    A plain ``ModelCheckpoint(save_last=True)`` saves at the end only when it has saved nothing
    before, so a run whose last step is not a multiple of ``every_n_train_steps`` would end with
    an older ``last.ckpt``. With ``keep="best"``, ``last.ckpt`` is still written during training
    (a killed run resumes from it) and removed once the run has reached its last step.
    """

    def __init__(self, dirpath: _PATH, every_n_train_steps: int, keep: str = "both") -> None:
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,  # always last.ckpt, never last-v1.ckpt
        )
        self.keep = check_keep(keep)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # ModelCheckpoint warns that, under manual optimization, a step's checkpoint holds the
        # weights after its optimizer step: that is what resuming at the next step needs.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, *args)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.keep == "best" and reached_max_steps(trainer) and self.last_model_path:
            trainer.strategy.remove_checkpoint(self.last_model_path)


class RNGState(L.Callback):
    """Keeps the global random states (torch, CUDA, numpy, Python) in checkpoints and restores
    them when a run resumes, so that dropout and anything else that draws from them goes on
    with the numbers the interrupted run would have drawn."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states()
        # as plain lists, which torch.load(weights_only=True) reads back
        name, keys, *rest = states["numpy"]
        states["numpy"] = (name, keys.tolist(), *rest)
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Set here rather than on load, after the fit's set-up, so that nothing draws in between.
        if self.loaded is not None:
            name, keys, *rest = self.loaded["numpy"]
            _set_rng_states({**self.loaded, "numpy": (name, np.array(keys, dtype=np.uint32), *rest)})
            self.loaded = None
