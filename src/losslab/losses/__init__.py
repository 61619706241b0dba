"""The loss registry: interchangeable implementations of the same next-token loss.

>>> loss_fn = build_loss("fused", label_smoothing=0.1)
>>> loss = loss_fn(hidden, model.lm_head.weight, shift_labels(labels))

To add an implementation: write one file with a :class:`TokenLoss` subclass and add one line to
``LOSSES`` below.
"""

from __future__ import annotations

import inspect

from torch import nn

from losslab.losses.base import LogitsLoss, LossParts, TokenLoss
from losslab.losses.cross_entropy import CrossEntropyLoss
from losslab.losses.fused import FusedLinearCrossEntropyLoss
from losslab.losses.labels import shift_labels
from losslab.losses.logsumexp import LogSumExpLoss
from losslab.losses.naive import NaiveLoss

LOSSES: dict[str, type[TokenLoss]] = {
    "naive": NaiveLoss,
    "logsumexp": LogSumExpLoss,
    "cross_entropy": CrossEntropyLoss,
    "fused": FusedLinearCrossEntropyLoss,
}


def loss_options(name: str) -> list[str]:
    """The option names that ``build_loss(name, ...)`` accepts."""
    names = []
    for cls in LOSSES[name].__mro__:
        if cls is nn.Module or "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    return names


def build_loss(name: str, **options) -> TokenLoss:
    """Build the loss implementation registered as ``name`` with its options."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    unknown = sorted(set(options) - set(loss_options(name)))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for loss {name!r}: "
            f"it takes {', '.join(loss_options(name))}"
        )
    return LOSSES[name](**options)


__all__ = ["LOSSES", "LogitsLoss", "LossParts", "TokenLoss", "build_loss", "loss_options", "shift_labels"]
