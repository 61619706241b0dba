"""``naive``: softmax from first principles, exactly as a textbook writes it.

Kept literal on purpose, as the teaching baseline: ``exp``, divide by the sum, gather, ``log``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losslab.losses.base import LogitsLoss


class NaiveLoss(LogitsLoss):
    """Cross-entropy as ``-log(exp(x_t) / sum_j exp(x_j))``, with no stabilising shift.

    It is numerically unstable, and that is its lesson: ``exp`` overflows to ``inf`` in float32
    for logits above about 88 (``log(3.4e38)``), after which ``inf / inf`` gives ``nan``; a large
    negative spread underflows ``exp`` to 0 and ``log(0)`` gives ``inf``. Use ``logsumexp``,
    ``cross_entropy`` or ``fused`` for training; use this to see why they exist.
    """

    name = "naive"
    nonfinite_hint = (
        "naive computes exp(logits) unshifted, which overflows float32 for logits above ~88: "
        "use loss=logsumexp, cross_entropy or fused, or lower the learning rate"
    )

    def token_loss(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        exp = torch.exp(logits)
        probs = exp / exp.sum(dim=-1, keepdim=True)
        nll = -torch.log(probs.gather(-1, targets[:, None]).squeeze(-1))
        if self.label_smoothing == 0:
            return nll, nll
        return self.mix_label_smoothing(nll, -torch.log(probs).mean(dim=-1)), nll
