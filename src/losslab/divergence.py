"""The divergence rule: when a run counts as diverged, and which of its validations can be its best.

No Lightning here: ``scripts/compare_runs.py`` applies the rule to logged curves as training does.
"""

from __future__ import annotations

import math

from losslab.metrics import BEST_BY


def beats_untrained(val_loss: float, initial_val_loss: float) -> bool:
    """Whether ``val_loss`` is finite and below the untrained model's, ``initial_val_loss`` (its
    step-0 validation; NaN when unknown, and then any finite loss beats it). Only such a step can be
    a run's best."""
    return math.isfinite(val_loss) and not val_loss >= initial_val_loss


def divergence(val_loss: float, initial_val_loss: float) -> str | None:
    """Why a run whose last validation loss is ``val_loss`` diverged, or None when it did not.

    A run diverged when it ends with a NaN or infinite loss, or no lower than the loss of its model
    before training (``initial_val_loss``, step 0): training made the model worse than not training
    at all. The untrained model is the bar because it is measured, on the run's own validation set:
    log(V), the loss of a uniform guess, is near it at initialisation but not it, and any margin
    above either would be arbitrary. No run that learned anything ends above its start.
    """
    if not math.isfinite(val_loss):
        return f"the last {BEST_BY} is {val_loss}"
    if not beats_untrained(val_loss, initial_val_loss):
        return (
            f"{BEST_BY} did not end below the untrained model's {initial_val_loss:.4f} (step 0): training made the "
            "model worse; lower optimizer.lr, or clip the gradient (step.gradient_clip_val)"
        )
    return None
