"""The loss registry: interchangeable implementations of the same next-token loss.

>>> loss_fn = build_loss("fused", label_smoothing=0.1)
>>> loss = loss_fn(hidden, model.lm_head.weight, shift_labels(labels))

``fused``, ``cross_entropy`` and ``logsumexp`` also take an LM head sharded by vocabulary rows
(``vocab_parallel=VocabParallel.from_vocab(V, group)``, see :mod:`losslab.losses.vocab_parallel`).

To add an implementation (README, "Add a loss"): one file with a :class:`TokenLoss` subclass that
sets its ``name``, its class imported and added to ``LOSSES`` below, ``conf/loss/<name>.yaml`` and
its name in the README's loss tables; ``tests/losses/test_registry.py`` checks all four, the
reference grid runs over ``LOSSES``, and ``tests/losses/test_add_a_loss.py`` adds one so.
"""

from __future__ import annotations

import inspect

from torch import nn

from losslab.losses.base import LogitsLoss, LossParts, TokenLoss
from losslab.losses.cce import CutCrossEntropyLoss
from losslab.losses.cross_entropy import CrossEntropyLoss
from losslab.losses.fused import FusedLinearCrossEntropyLoss, default_chunk_size
from losslab.losses.liger import LigerFusedLinearCrossEntropyLoss
from losslab.losses.logsumexp import LogSumExpLoss
from losslab.losses.naive import NaiveLoss
from losslab.losses.peer import PeerLoss
from losslab.losses.tiled import TiledLinearCrossEntropyLoss
from losslab.losses.torch_lce import TorchLinearCrossEntropyLoss
from losslab.losses.vocab_parallel import VocabParallel
from losslab.targets import shift_labels

LOSSES: dict[str, type[TokenLoss]] = {
    loss.name: loss
    for loss in (
        NaiveLoss,
        LogSumExpLoss,
        CrossEntropyLoss,
        FusedLinearCrossEntropyLoss,
        TiledLinearCrossEntropyLoss,  # Triton: on CUDA, or in Triton's interpreter for testing
        # the field's own, where their packages and devices are (see losslab.losses.peer)
        TorchLinearCrossEntropyLoss,
        LigerFusedLinearCrossEntropyLoss,
        CutCrossEntropyLoss,
    )
}
# What the others are measured against: PyTorch's own cross-entropy on the full logits.
REFERENCE = CrossEntropyLoss.name


def vocab_parallel_losses() -> list[str]:
    """The names of the registered implementations that take ``vocab_parallel``."""
    return [name for name, loss in LOSSES.items() if loss.takes_vocab_parallel]


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
            f"unknown option(s) {', '.join(unknown)} for loss {name!r}: it takes {', '.join(loss_options(name))}"
        )
    return LOSSES[name](**options)


__all__ = [
    "LOSSES",
    "REFERENCE",
    "LogitsLoss",
    "LossParts",
    "PeerLoss",
    "TokenLoss",
    "VocabParallel",
    "default_chunk_size",
    "build_loss",
    "loss_options",
    "vocab_parallel_losses",
    "shift_labels",
]
