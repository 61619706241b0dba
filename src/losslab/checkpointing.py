"""What exact resume needs beyond Lightning's own checkpoint: atomic writes and the random states.

Lightning's checkpoint already holds the weights, the optimizer and scheduler states and the
loops' progress; the training loader's position is in it too (losslab.data.ResumableDataLoader).
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint whole or not at all, on the local file system.

    The checkpoint goes to ``<name>.tmp`` beside its path, is synced to disk, then renamed over
    the path, and the rename is synced too: a run killed during a save (or the machine losing
    power) leaves the previous checkpoint as it was.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


# ModelCheckpoint warns that, under manual optimization, a step's checkpoint holds the weights
# after its optimizer step: that is what resuming at the next step needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class LastCheckpoint(ModelCheckpoint):
    """Saves ``dirpath/last.ckpt`` every ``every_n_train_steps`` steps and at the end of training.

    A plain ``ModelCheckpoint(save_last=True)`` saves at the end only when it has saved nothing
    before, so a run whose last step is not a multiple of ``every_n_train_steps`` would end with
    an older ``last.ckpt``.
    """

    def __init__(self, dirpath: _PATH, every_n_train_steps: int) -> None:
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0, save_last=True)
        self.every_n_train_steps = every_n_train_steps

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_model_path and trainer.global_step % self.every_n_train_steps != 0:
            trainer.save_checkpoint(self.last_model_path)
        else:
            super().on_train_end(trainer, pl_module)


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
