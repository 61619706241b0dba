"""``naive``: softmax from first principles, exactly as a textbook writes it.

Kept literal on purpose, as the teaching baseline: ``exp``, divide by the sum, gather, ``log``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from losslab.losses.base import LogitsLoss


class NaiveLoss(LogitsLoss):
    """Cross-entropy as ``-log(exp(x_t) / sum_j exp(x_j))``, with no stabilising shift.

    It is numerically unstable, and that is its lesson. Its limits, with ``m`` the largest logit of
    a position, ``t`` its target's and ``lse`` their logsumexp (float32; under bf16 autocast the
    logits are bf16 but naive computes in float32, so the same limits hold):

    - **forward overflow**: ``exp`` is ``inf`` for ``m > 88.7`` (``log(3.4e38)``), and ``inf / inf``
      gives ``nan``;
    - **forward underflow**: the target's probability rounds to 0 for ``t - lse < -103.9``, and
      ``log(0)`` gives ``inf``;
    - **a silently wrong gradient**, long before either: autograd's backward of ``exp / sum`` divides
      the target's ``exp`` by the square of the sum, which leaves float32's normal range when
      ``t - 2 * lse < -87.3``. Below that the gradient loses precision: it may be off by more than
      bf16's own rounding (0.4%) from -97.7 on, is from -100 on (1.7% at -100), and the gradient
      of every other logit is exactly 0 from about -104.5 on. With the target 60 below the largest logit:
      1.7% off at ``m = 40``, zero from ``m = 44``. No NaN or inf shows it: :class:`LossParts`
      counts the targets past -97.7 (``inexact_grads``) and training reports them.
    - where the target's probability itself leaves the normal range (``t - lse < -87.3``), the
      gradient is ``nan`` or ``inf``, which the training step's non-finite guard catches.

    Use ``logsumexp``, ``cross_entropy`` or ``fused`` for training; use this to see why they exist.
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
        log_probs = torch.log(probs) if self.label_smoothing > 0 else None
        return self.smoothed(nll, log_probs, targets), nll

    def inexact_gradients(self, logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        """The counted targets whose gradient may be off by more than bf16's rounding: ``exp(t) /
        sum**2`` so far below the dtype's normal range that fewer than 8 significant bits remain."""
        with torch.no_grad():
            finfo = torch.finfo(logits.dtype)
            limit = math.log(finfo.tiny * finfo.eps * 2**8)  # float32: log(2**-141) = -97.7
            target_logit = logits.gather(-1, targets[:, None]).squeeze(-1)
            exponent = target_logit - 2 * torch.logsumexp(logits, dim=-1)
            return ((exponent < limit) & valid).sum()
