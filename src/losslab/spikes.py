"""Spike capture: a training step whose loss jumps, or whose loss or gradient is not finite, saved
whole for a post-mortem (``scripts/show_spike.py`` explains one).

Each training step returns a :class:`StepRecord`: references to what the step has anyway (its
micro-batches, the loss's per-token negative log-likelihoods, its loss, objective, gradient norm and
learning rate, and its diagnostics), nothing copied or computed again. :class:`SpikeCapture` compares
the step's ``train/loss`` with the mean and standard deviation of the last ``window`` steps'; a step
above ``mean + k * std`` (once ``warmup`` steps are seen), or a non-finite one (which
``step.nonfinite`` skips or stops at, as ever), is saved to ``spikes/step-<n>.pt`` in the run's
folder, with a line in ``train.log``.

What it costs a normal step: one copy of three numbers to the host, read one step later, so that it
never waits for the accelerator (the step's own tensors, ids and per-token losses, live one step
longer), and a comparison in Python. The file (:func:`spike_contents`) holds tensors only, read with
``torch.load(weights_only=True)``.

Under DDP and FSDP every data-parallel rank decides alike (the loss and the gradient norm are
all-reduced) and writes its own rows: rank 0 ``step-<n>.pt``, rank r ``step-<n>.rank<r>.pt``, no
collective; under tensor parallelism the first process of each tensor-parallel group writes for it.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from losslab.files import replaced_atomically
from losslab.run_status import NonFiniteStepError
from losslab.settings import is_finite, is_int_at_least, require
from losslab.targets import IGNORE_INDEX

log = logging.getLogger(__name__)

SPIKE_FORMAT = 1  # the spike file's "format"; change it when its keys change meaning
# std's floor, as a share of the mean: a window of equal losses (std 0) would make every rounding a spike
RELATIVE_STD_FLOOR = 1e-3


@dataclass
class StepRecord:
    """What a training step leaves for spike capture; the tensors are the step's own, on its device.

    ``step`` counts as the logs do (1 for the first step); ``values`` holds ``train/loss``, the
    objective and the gradient's norm before clipping; ``token_nll`` is ``LossParts.token_nll`` of
    each micro-batch (``None`` for a peer); ``diagnostics`` are the step's logit diagnostics (``logits/...``,
    saved as they are) on the steps that compute them (``step.logit_diagnostics_every_n_steps``), else empty.
    """

    step: int
    micro_batches: list[dict[str, Tensor]]
    token_nll: list[Tensor | None]
    values: Tensor
    lr: float
    diagnostics: dict[str, Tensor]


def rows(tensors: list[Tensor], fill: float) -> Tensor:
    """The rows of ``(B_i, T_i)`` tensors one under the other, on the CPU, padded with ``fill`` to the longest."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t.detach().cpu(), (0, width - t.shape[1]), value=fill) for t in tensors])


def spike_contents(
    record: StepRecord, values: list[float], stats: dict[str, float], vocab_size: int, rank: int = 0, ranks: int = 1
) -> dict[str, Any]:
    """The spike file of ``record``: tensors only (0-d ones for the numbers) and the dict of its
    diagnostics. ``values`` are ``record.values`` read back; ``stats`` the running ``mean``, ``std``,
    ``k`` and ``window`` (the steps the mean is over) it was compared with; ``rank`` the data-parallel
    rank whose rows these are, of ``ranks``."""
    micro = record.micro_batches
    contents: dict[str, Any] = {
        "format": torch.tensor(SPIKE_FORMAT),
        "step": torch.tensor(record.step),
        "input_ids": rows([m["input_ids"] for m in micro], 0),
        "targets": rows([m["targets"] for m in micro], IGNORE_INDEX),
        "micro_batch": torch.cat([torch.full((len(m["input_ids"]),), i) for i, m in enumerate(micro)]),
        "vocab_size": torch.tensor(vocab_size),
        "rank": torch.tensor(rank),
        "ranks": torch.tensor(ranks),
        "lr": torch.tensor(record.lr, dtype=torch.float64),
        "diagnostics": {name: value.detach().cpu() for name, value in record.diagnostics.items()},
    }
    if all(nll is not None for nll in record.token_nll):
        contents["token_nll"] = rows([nll.float() for nll in record.token_nll], 0.0)
    named = {"loss": values[0], "objective": values[1], "grad_norm": values[2], **stats}
    contents |= {name: torch.tensor(value, dtype=torch.float64) for name, value in named.items()}
    return contents


def mean_and_std(values: deque[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation of ``values`` (NaN for too few); in plain floats,
    10x faster than the statistics module's exact fractions for a window of 100."""
    mean = math.fsum(values) / len(values) if values else math.nan
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


class SpikeCapture(L.Callback):
    """Saves a training step whose ``train/loss`` is above the mean of the last ``window`` steps by
    ``k`` standard deviations (once ``warmup`` steps are seen), or whose loss or gradient is not
    finite, to ``dirpath/step-<n>.pt``, at most ``max_files`` of them (a run that keeps spiking
    cannot fill the disk: the others get a line in ``train.log`` only). See :mod:`losslab.spikes`.

    The window holds every finite step's loss, a spike's too (after a lasting jump, the new level
    becomes the norm), and is kept in checkpoints: a resumed run compares as the run did.
    """

    def __init__(
        self, dirpath: str | Path | None, k: float = 6.0, window: int = 100, warmup: int = 100, max_files: int = 20
    ) -> None:
        require(
            is_finite(k) and k > 0,
            "k",
            k,
            "a spike is the loss above the mean by k standard deviations: a finite number > 0",
            "callbacks.spike_capture.k=6",
        )
        require(
            is_int_at_least(window, 2),
            "window",
            window,
            "the running mean and deviation are over this many steps: an int >= 2",
            "callbacks.spike_capture.window=100",
        )
        require(
            is_int_at_least(warmup, 2),
            "warmup",
            warmup,
            "the steps seen before the first comparison: an int >= 2 (a deviation needs two losses)",
            "callbacks.spike_capture.warmup=100",
        )
        require(
            is_int_at_least(max_files, 0),
            "max_files",
            max_files,
            "the spike files kept at most: an int >= 0 (0: train.log lines only)",
            "callbacks.spike_capture.max_files=20",
        )
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.k, self.warmup, self.max_files = k, warmup, max_files
        self.losses: deque[float] = deque(maxlen=window)
        self.seen = 0  # finite steps seen, this run's and those before its checkpoint
        self.pending: tuple[StepRecord, Tensor, Any] | None = None  # the last step, its values on their way
        self.rank: int | None = 0  # the data-parallel rank whose rows this process writes (on_train_start)
        self.ranks = 1
        self.first, self.vocab_size = True, 0
        self.files: set[str] = set()  # this process's spike files in dirpath
        self.unsaved = 0

    # --- which process writes what ---------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Which rows this process writes (its data-parallel rank's; none for the other processes of a
        tensor-parallel group, which hold the same), and the files of them a resumed run has already."""
        mesh = pl_module.device_mesh  # set by now (configure_model)
        self.rank = pl_module.global_rank if mesh is None else mesh["data_parallel"].get_local_rank()
        self.ranks = trainer.world_size if mesh is None else mesh["data_parallel"].size()
        if mesh is not None and mesh["tensor_parallel"].get_local_rank() != 0:
            self.rank = None
        self.first = trainer.is_global_zero
        self.vocab_size = pl_module.model.config.vocab_size
        if self.dirpath is not None and self.dirpath.is_dir() and self.rank is not None:
            ours = re.compile(r"step-\d+" + (rf"\.rank{self.rank}" if self.rank else "") + r"\.pt")
            self.files = {path.name for path in self.dirpath.iterdir() if ours.fullmatch(path.name)}

    def file_name(self, step: int) -> str | None:
        if self.rank is None or self.dirpath is None:
            return None
        return f"step-{step}.pt" if self.rank == 0 else f"step-{step}.rank{self.rank}.pt"

    # --- every step ----------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record = outputs.get("step_record") if isinstance(outputs, dict) else None
        if record is None:
            return
        self.resolve()  # the previous step's values have arrived by now
        values = record.values.detach().to("cpu", non_blocking=True)  # pinned memory, from CUDA
        arrived = None
        if record.values.is_cuda:
            arrived = torch.cuda.Event()
            arrived.record()
        self.pending = (record, values, arrived)

    def resolve(self) -> None:
        """Compare the pending step with the window, capture it if it spiked, and add its loss."""
        if self.pending is None:
            return
        record, values, arrived = self.pending
        self.pending = None
        if arrived is not None:
            arrived.synchronize()
        self.judge(record, values.tolist())

    def judge(self, record: StepRecord, values: list[float]) -> None:
        loss = values[0]
        mean, std = mean_and_std(self.losses)
        stats = {"mean": mean, "std": std, "k": self.k, "window": len(self.losses)}
        if not all(math.isfinite(value) for value in values):
            why = f"the loss is {loss:.6g}, the objective {values[1]:.6g} and the gradient norm {values[2]:.6g}"
            self.capture(record, values, stats, why)
            return
        floor = max(std, RELATIVE_STD_FLOOR * abs(mean)) if self.seen >= self.warmup else math.inf
        if loss > mean + self.k * floor:
            why = (
                f"train/loss {loss:.4f} is {(loss - mean) / floor:.1f} standard deviations above the mean of the "
                f"last {len(self.losses)} steps ({mean:.4f}, std {std:.4f}; callbacks.spike_capture.k={self.k:g})"
            )
            self.capture(record, values, stats, why)
        self.losses.append(loss)
        self.seen += 1

    def capture(self, record: StepRecord, values: list[float], stats: dict[str, float], why: str) -> None:
        name = self.file_name(record.step)
        if name is None:
            return
        if len(self.files - {name}) >= self.max_files:
            if self.first and not self.unsaved:
                log.warning(
                    f"step {record.step}: spike: {why}; not saved: {self.dirpath} holds callbacks.spike_capture."
                    f"max_files={self.max_files} files (later spikes are counted at the end)"
                )
            self.unsaved += 1
            return
        contents = spike_contents(record, values, stats, self.vocab_size, self.rank, self.ranks)
        with replaced_atomically(self.dirpath / name) as file:
            torch.save(contents, file)
        self.files.add(name)
        if self.first:
            others = f" (rank r's rows: step-{record.step}.rank<r>.pt)" if self.ranks > 1 else ""
            log.warning(f"step {record.step}: spike: {why}; its batch is saved in {self.dirpath / name}{others}")

    # --- the run's end -------------------------------------------------------------------------

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolve()
        if self.unsaved and trainer.is_global_zero:
            log.warning(f"{self.unsaved} spike(s) were not saved (callbacks.spike_capture.max_files={self.max_files})")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # The run's own endings only: after a crash the device may not answer.
        if isinstance(exception, (NonFiniteStepError, SIGTERMException, KeyboardInterrupt)):
            self.resolve()
        record = getattr(exception, "step_record", None)
        if isinstance(exception, NonFiniteStepError) and record is not None:
            self.judge(record, record.values.tolist())

    def state_dict(self) -> dict[str, Any]:
        self.resolve()  # the step being saved counts in the window it resumes with
        return {"losses": list(self.losses), "seen": self.seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses.extend(state_dict["losses"])
        self.seen = state_dict["seen"]
