"""The run's callbacks: what users compare between loss implementations (step time, tokens per
second, peak memory), how the run ended (``status.json``), Ctrl-C, and the progress bar."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from losslab.divergence import divergence
from losslab.memory import peak_rss_mib, reset_peak_rss
from losslab.metrics import BEST_BY, METRICS, log_metrics
from losslab.run_status import NonFiniteStepError, RunRecord, Status, reached_max_steps
from losslab.targets import count_targets

log = logging.getLogger(__name__)


class StepStats(L.Callback):
    """Logs the training step's time, tokens per second and peak memory.

    Lightning's ``ThroughputMonitor`` times from batch to batch, data loading included, and
    assumes a fixed batch size; here only the step itself (forward, backward, optimizer) is
    timed, and the tokens are the real target tokens of all the step's micro-batches, so padding
    never counts.
    Peak memory is the step's own: the accelerator's peak allocation on CUDA, the process's peak
    RSS on CPU, both reset before each step (on CPU only where Linux's ``/proc/self/clear_refs``
    allows it; elsewhere the process's peak so far), so that the runs of a sweep that share one
    process each report their own.
    Only the steps that are logged (``GPTLightningModule.logs_this_step``) are measured: the others
    cost no device synchronisation.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._measured = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._measured = pl_module.logs_this_step()
        if not self._measured:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            reset_peak_rss()
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._measured:
            return
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mib = peak_rss_mib()
        step_time = time.perf_counter() - self._start
        tokens = int(sum(count_targets(micro["targets"], pl_module.loss_fn.ignore_index) for micro in batch))
        values = {
            "perf/step_time_s": step_time,
            "perf/tokens_per_sec": tokens / step_time,
            "perf/peak_memory_mib": peak_mib,
        }
        pl_module.step_values |= values
        log_metrics(pl_module, values)


def progress_bar(every_n_steps: int) -> ProgressBar:
    """Lightning's ``RichProgressBar`` in a terminal; elsewhere (CI, output sent to a file), where the
    frames of a redrawn bar would fill the log, a line every ``every_n_steps`` steps."""
    return RichProgressBar() if sys.stdout.isatty() else ProgressLines(every_n_steps)


class ProgressLines(ProgressBar):
    """Progress as log lines: the training metrics every ``every_n_steps`` steps
    (``step 50/500: train/loss 5.1234``) and the validation metrics after each validation.

    A ``ProgressBar`` rather than a plain callback, so that Lightning adds no bar of its own.
    """

    def __init__(self, every_n_steps: int) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.enabled and trainer.global_step % self.every_n_steps == 0:
            self.report(trainer, pl_module, "train/")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and not trainer.sanity_checking:
            self.report(trainer, pl_module, "val/")

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        """Logs the progress bar's metrics whose names start with ``prefix``, at the current step."""
        metrics = self.get_metrics(trainer, pl_module)
        values = ", ".join(
            f"{name} {METRICS[name].show(value)}" for name, value in metrics.items() if name.startswith(prefix)
        )
        log.info(f"step {trainer.global_step}/{trainer.max_steps}: {values}")


class RunStatus(L.Callback):
    """Keeps ``folder/status.json`` (:class:`losslab.run_status.RunRecord`): ``running`` while the run
    trains, then how it ended (see :class:`losslab.run_status.Status` for what each status means)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.status = Status.RUNNING
        self.step = 0
        self.message = ""

    def record(self, trainer: L.Trainer, status: Status, message: str = "") -> None:
        self.status, self.step, self.message = status, trainer.global_step, message
        if trainer.is_global_zero:
            RunRecord(status, self.step, trainer.max_steps, message).write(self.folder)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.record(trainer, Status.RUNNING)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record(trainer, Status.RUNNING)  # a resumed run: the checkpoint's step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.status is Status.RUNNING:
            self.record(trainer, Status.RUNNING)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val_loss = float(trainer.callback_metrics.get(BEST_BY, math.nan))
        reason = divergence(val_loss, getattr(pl_module, "initial_val_loss", math.nan))
        if trainer.should_stop and not reached_max_steps(trainer):
            self.record(trainer, Status.INTERRUPTED, f"{stopped_by(trainer)}; checkpoints/last.ckpt holds this step")
        elif reason:
            skipped = int(getattr(pl_module, "skipped_steps", 0))
            if skipped or not math.isfinite(val_loss):
                reason += f"; {skipped} step(s) were skipped as non-finite"
            self.record(trainer, Status.DIVERGED, reason)
        else:
            self.record(trainer, Status.FINISHED)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        message = (str(exception).splitlines() or [type(exception).__name__])[0]
        if isinstance(exception, NonFiniteStepError):
            self.record(trainer, Status.STOPPED, message)
        elif isinstance(exception, SIGTERMException):  # Lightning's, raised after the step the signal came in
            requeued = any(getattr(callback, "requeue", False) for callback in trainer.callbacks)
            by = "SLURM's requeue signal (SIGUSR1), the job requeued" if requeued else "SIGTERM"
            self.record(trainer, Status.INTERRUPTED, f"stopped by {by}; checkpoints/last.ckpt holds this step")
        elif isinstance(exception, KeyboardInterrupt):
            self.record(trainer, Status.INTERRUPTED, "stopped by a second Ctrl-C, without a checkpoint of this step")
        else:
            self.record(trainer, Status.CRASHED, f"{type(exception).__name__}: {message}")


def stopped_by(trainer: L.Trainer) -> str:
    """What stopped training before ``trainer.max_steps``: Ctrl-C (:class:`GracefulInterrupt`), the
    time limit (``trainer.max_time``, Lightning's ``Timer``) or another callback."""
    if any(isinstance(callback, GracefulInterrupt) and callback.requested for callback in trainer.callbacks):
        return "stopped by Ctrl-C"
    remaining = [callback.time_remaining() for callback in trainer.callbacks if isinstance(callback, Timer)]
    if any(seconds is not None and seconds <= 0 for seconds in remaining):
        return "stopped at its time limit (trainer.max_time)"
    return "stopped by a callback before trainer.max_steps"


class GracefulInterrupt(L.Callback):
    """The first Ctrl-C ends training after the current step, which is then validated and saved to
    ``last.ckpt`` as at the end of a run; a second Ctrl-C stops at once. ``announcement``: what the
    first one prints (a caller that saves nothing says so)."""

    def __init__(self, announcement: str = "stopping after this step and saving it") -> None:
        self.announcement = announcement
        self.requested = False
        self.previous_handler: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            self.previous_handler = signal.signal(signal.SIGINT, self.request)

    def request(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous_handler)
        log.warning(f"\nCtrl-C: {self.announcement} (press Ctrl-C again to stop at once)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # every process stops at the same step, whichever of them got the signal
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.previous_handler is not None and not self.requested:
            signal.signal(signal.SIGINT, self.previous_handler)
        self.previous_handler = None
