"""Callbacks that measure what users compare between loss implementations."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from losslab.memory import peak_rss_mib, reset_peak_rss
from losslab.targets import count_targets


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
