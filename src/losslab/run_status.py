"""How a run ended, for people and for tools: ``status.json`` in its folder, and Ctrl-C handling.

``status.json`` says ``running`` while the run trains (still so after a kill: then it is the step of
its last checkpoint) and then one of: ``finished``; ``diverged`` (it reached its last step, but its
last validation loss is NaN or infinite, or not below the untrained model's: see
:mod:`losslab.divergence`); ``stopped`` (a non-finite step with ``step.nonfinite=stop``);
``interrupted`` (Ctrl-C, or SIGTERM as a scheduler sends it to preempt a job; ``last.ckpt`` holds
the step it reached); ``crashed`` (any other error). ``scripts/compare_runs.py`` reads it.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from losslab.divergence import divergence
from losslab.files import replaced_atomically
from losslab.lightning_module import NonFiniteStepError, reached_max_steps

STATUS_FILE = "status.json"

log = logging.getLogger(__name__)


class RunStatus(L.Callback):
    """Keeps ``folder/status.json``: ``{"status", "step", "max_steps", "message"}`` (see the module)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / STATUS_FILE
        self.status = "running"
        self.step = 0
        self.message = ""

    def record(self, trainer: L.Trainer, status: str, message: str = "") -> None:
        self.status, self.step, self.message = status, trainer.global_step, message
        if trainer.is_global_zero:
            record = {"status": status, "step": self.step, "max_steps": trainer.max_steps, "message": message}
            with replaced_atomically(self.path) as file:
                file.write(json.dumps(record, indent=2).encode())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.record(trainer, "running")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record(trainer, "running")  # a resumed run: the checkpoint's step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.status == "running":
            self.record(trainer, "running")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val_loss = float(trainer.callback_metrics.get("val/loss", math.nan))
        reason = divergence(val_loss, getattr(pl_module, "initial_val_loss", math.nan))
        if trainer.should_stop and not reached_max_steps(trainer):
            self.record(trainer, "interrupted", "stopped by Ctrl-C; checkpoints/last.ckpt holds this step")
        elif reason:
            skipped = int(getattr(pl_module, "skipped_steps", 0))
            if skipped or not math.isfinite(val_loss):
                reason += f"; {skipped} step(s) were skipped as non-finite"
            self.record(trainer, "diverged", reason)
        else:
            self.record(trainer, "finished")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        message = (str(exception).splitlines() or [type(exception).__name__])[0]
        if isinstance(exception, NonFiniteStepError):
            self.record(trainer, "stopped", message)
        elif isinstance(exception, SIGTERMException):  # Lightning's, raised after the step the signal came in
            self.record(trainer, "interrupted", "stopped by SIGTERM; checkpoints/last.ckpt holds this step")
        elif isinstance(exception, KeyboardInterrupt):
            self.record(trainer, "interrupted", "stopped by a second Ctrl-C, without a checkpoint of this step")
        else:
            self.record(trainer, "crashed", f"{type(exception).__name__}: {message}")


class GracefulInterrupt(L.Callback):
    """The first Ctrl-C ends training after the current step, which is then validated and saved to
    ``last.ckpt`` as at the end of a run; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous_handler: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            self.previous_handler = signal.signal(signal.SIGINT, self.request)

    def request(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous_handler)
        log.warning("\nCtrl-C: stopping after this step and saving it (press Ctrl-C again to stop at once)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # every process stops at the same step, whichever of them got the signal
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.previous_handler is not None and not self.requested:
            signal.signal(signal.SIGINT, self.previous_handler)
        self.previous_handler = None
