"""Callbacks that measure what users compare between loss implementations."""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning as L
import torch


class StepStats(L.Callback):
    """Logs the training step's time, tokens per second and peak memory.

    Lightning's ``ThroughputMonitor`` times from batch to batch, data loading included, and
    assumes a fixed batch size; here only the step itself (forward, backward, optimizer) is
    timed, and the tokens are the real target tokens of all the step's micro-batches, so padding
    never counts.
    Peak memory is the accelerator's peak allocation on CUDA, the process's peak RSS on CPU.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        step_time = time.perf_counter() - self._start
        tokens = sum(int((micro["targets"] != self.ignore_index).sum()) for micro in batch)
        pl_module.log_dict(
            {
                "perf/step_time_s": step_time,
                "perf/tokens_per_sec": tokens / step_time,
                "perf/peak_memory_mib": peak_mib,
            }
        )
