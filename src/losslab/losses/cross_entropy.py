"""``cross_entropy``: PyTorch's own ``CrossEntropyLoss`` on the full logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losslab.losses.base import LogitsLoss


class CrossEntropyLoss(LogitsLoss):
    """``torch.nn.functional.cross_entropy`` per token: the reference every other one must match.

    Under ``vocab_parallel`` each rank holds only its columns of the logits, which
    ``F.cross_entropy`` cannot take: the loss is then the distributed log-softmax that ``logsumexp``
    shares (:meth:`LogitsLoss.vocab_parallel_token_loss`). torch's own answer, ``F.cross_entropy``
    under ``torch.distributed.tensor.parallel.loss_parallel()``, does not fit the call: it needs
    the backward inside its context too (outside it, autograd fails on the DTensors), DTensor
    logits split as ``torch.chunk`` splits them, and has no label smoothing; the sharding
    benchmark measures it beside this one.
    """

    name = "cross_entropy"
    takes_vocab_parallel = True

    def token_loss(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        loss = F.cross_entropy(
            logits, targets, weight=self.class_weights, reduction="none", label_smoothing=self.label_smoothing
        )
        if self.label_smoothing == 0 and self.class_weights is None:
            return loss, loss
        with torch.no_grad():  # the log-likelihood is for logging: no second graph
            return loss, F.cross_entropy(logits, targets, reduction="none")
