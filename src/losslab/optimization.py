"""How the weights move: one optimizer step (``step.*`` in the config) and the learning-rate schedule
(``schedule.*``), each a frozen dataclass that checks its own values, as ``GPTConfig`` does the model's;
and the schedule's multiplier of the learning rate at each step (:func:`warmup_cosine`).

``train.py`` builds both from the config and hands their values to
:class:`~losslab.lightning_module.GPTLightningModule` (and ``accumulate`` to the data module);
:mod:`losslab.config_checks` builds them before any data work. AdamW's own settings
(``optimizer.*``) are torch's, checked there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from losslab.settings import is_finite, is_int_at_least, is_number, require

NONFINITE_POLICIES = ("skip", "stop")  # what a step whose loss or gradient is not finite does


@dataclass(frozen=True)
class StepConfig:
    """One optimizer step: its gradient is the loss summed over every real target token of its
    micro-batches (on every device) divided by their count."""

    accumulate: int = 1  # micro-batches per step: a step trains on data.batch_size * accumulate rows per device
    gradient_clip_val: float | None = 1.0  # clip the gradient's global norm to this; None: no clipping
    nonfinite: str = "skip"  # a non-finite loss or gradient: skip the step (counted) or stop the run
    # the logit diagnostics (logits/*) on the logged steps that are multiples of this, and the last; 0: never.
    # Their own interval: a logged step of fused at V=50257 costs them ~19% (README, "Logit diagnostics").
    logit_diagnostics_every_n_steps: int = 10

    def __post_init__(self) -> None:
        require(
            is_int_at_least(self.accumulate, 1),
            "accumulate",
            self.accumulate,
            "a step must take an int >= 1 micro-batches",
            "step.accumulate=2",
        )
        require(
            self.gradient_clip_val is None or (is_finite(self.gradient_clip_val) and self.gradient_clip_val > 0),
            "gradient_clip_val",
            self.gradient_clip_val,
            "the clipping norm must be a finite number > 0, or null for no clipping",
            "step.gradient_clip_val=1.0",
        )
        require(
            is_int_at_least(self.logit_diagnostics_every_n_steps, 0),
            "logit_diagnostics_every_n_steps",
            self.logit_diagnostics_every_n_steps,
            "the diagnostics' interval must be an int >= 1, or 0 for none",
            "step.logit_diagnostics_every_n_steps=100",
        )
        require(
            self.nonfinite in NONFINITE_POLICIES,
            "nonfinite",
            self.nonfinite,
            f"a non-finite step must {' or '.join(NONFINITE_POLICIES)}",
            "step.nonfinite=stop",
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` times the
    optimizer's learning rate at ``total_steps``, where it stays."""

    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    total_steps: int | None = None  # None: the run's trainer.max_steps

    def __post_init__(self) -> None:
        require(
            is_int_at_least(self.warmup_steps, 0),
            "warmup_steps",
            self.warmup_steps,
            "the warm-up must be an int >= 0 steps",
            "schedule.warmup_steps=50",
        )
        require(
            self.total_steps is None or is_int_at_least(self.total_steps, 1),
            "total_steps",
            self.total_steps,
            "the schedule's length must be an int >= 1 steps, or null for trainer.max_steps",
            "schedule.total_steps=500",
        )
        require(
            is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            self.min_lr_ratio,
            "the final learning rate's share of optimizer.lr must be in [0, 1]",
            "schedule.min_lr_ratio=0.1",
        )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at
    ``total_steps``, where it stays."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
