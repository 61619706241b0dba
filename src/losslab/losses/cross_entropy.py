"""``cross_entropy``: PyTorch's own ``CrossEntropyLoss`` on the full logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losslab.losses.base import LogitsLoss


class CrossEntropyLoss(LogitsLoss):
    """``torch.nn.functional.cross_entropy`` per token: the reference every other one must match."""

    def token_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(
            logits, targets, reduction="none", label_smoothing=self.label_smoothing
        )
