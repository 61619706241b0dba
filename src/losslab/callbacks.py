"""Callbacks that measure what users compare between loss implementations, and the progress bar."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from losslab.memory import peak_rss_mib, reset_peak_rss
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
    """

    def __init__(self) -> None:
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            reset_peak_rss()
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mib = peak_rss_mib()
        step_time = time.perf_counter() - self._start
        tokens = int(sum(count_targets(micro["targets"], pl_module.loss_fn.ignore_index) for micro in batch))
        pl_module.log_dict(
            {
                "perf/step_time_s": step_time,
                "perf/tokens_per_sec": tokens / step_time,
                "perf/peak_memory_mib": peak_mib,
            }
        )


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
        values = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if name.startswith(prefix))
        log.info(f"step {trainer.global_step}/{trainer.max_steps}: {values}")
