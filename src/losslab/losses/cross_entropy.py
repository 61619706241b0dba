"""``cross_entropy``: PyTorch's own ``CrossEntropyLoss`` on the full logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losslab.losses.base import LogitsLoss


class CrossEntropyLoss(LogitsLoss):
    """``torch.nn.functional.cross_entropy`` per token: the reference every other one must match."""

    name = "cross_entropy"

    def token_loss(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        loss = F.cross_entropy(
            logits, targets, weight=self.class_weights, reduction="none", label_smoothing=self.label_smoothing
        )
        if self.label_smoothing == 0 and self.class_weights is None:
            return loss, loss
        with torch.no_grad():  # the log-likelihood is for logging: no second graph
            return loss, F.cross_entropy(logits, targets, reduction="none")
