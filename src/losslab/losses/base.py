"""What every loss implementation shares: its options, input checks and reductions.

Every implementation is called the same way, ``loss_fn(hidden, weight, targets)``:

- ``hidden``  ``(..., d)``: the model's final hidden states;
- ``weight``  ``(V, d)``: the LM head, so that ``logits = hidden @ weight.T``;
- ``targets`` integer tensor of ``hidden``'s leading shape, already aligned: ``targets[i]`` is the
  token that ``hidden[i]`` must predict (see :mod:`losslab.targets`).

and takes the same options with the same meaning as :func:`torch.nn.functional.cross_entropy`,
plus PaLM's z-loss and Gemma-2's logit soft-capping.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from losslab.targets import IGNORE_INDEX, real_targets

REDUCTIONS = ("mean", "sum", "none")


class LossParts(NamedTuple):
    """What a loss built with ``return_parts=True`` returns, each with the loss's reduction.

    ``loss`` is the training objective (label smoothing and z-loss included), the one to
    differentiate; ``nll`` is the model's own negative log-likelihood of the targets (neither),
    the number that perplexity and bits per byte are made of; ``z_loss`` is the z-loss part of
    ``loss``. ``nll`` and ``z_loss`` are detached: they are for logging.
    """

    loss: Tensor
    nll: Tensor
    z_loss: Tensor


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class TokenLoss(nn.Module):
    """Options and checks common to all implementations.

    Each implementation names itself (``name``, its key in the registry and in
    ``conf/loss/<name>.yaml``) and says what most likely made a training step's loss or gradient
    non-finite with it (``nonfinite_hint``, shown when ``step.nonfinite=stop`` stops a run).

    Args:
        ignore_index: target value whose position contributes nothing to loss or gradient.
        reduction: ``"mean"`` over non-ignored tokens (0 when every token is ignored), ``"sum"``,
            or ``"none"`` for per-token losses of the targets' shape, 0 where ignored.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        z_loss: weight ``z`` of PaLM's auxiliary loss ``z * logsumexp(logits)**2`` per token,
            added to the loss with the same reduction.
        softcap: when set to ``c``, logits become ``c * tanh(logits / c)`` before anything else.
        check_targets: raise ``ValueError`` for target ids outside ``[0, V)`` (other than
            ``ignore_index``). It costs a device sync; turn it off for speed once data is trusted.
        return_parts: return :class:`LossParts` ``(loss, nll, z_loss)`` instead of ``loss``.
    """

    name: ClassVar[str]
    nonfinite_hint: ClassVar[str] = (
        "the logits or the weights diverged: lower the learning rate (optimizer.lr), lengthen the "
        "warm-up (schedule.warmup_steps) or clip harder (step.gradient_clip_val)"
    )

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        check_targets: bool = True,
        return_parts: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
        if z_loss < 0:
            raise ValueError(f"z_loss={z_loss} must be >= 0")
        if softcap is not None and softcap <= 0:
            raise ValueError(f"softcap={softcap} must be > 0, or None to turn it off")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.check_targets = check_targets
        self.return_parts = return_parts

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}"
        )

    def validate(self, hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
        """Raise a clear error for shapes that do not fit or target ids outside ``[0, V)``."""
        if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"hidden has shape {tuple(hidden.shape)} and the LM head weight "
                f"{tuple(weight.shape)}: the weight must be (V, d) with d = hidden.shape[-1]"
            )
        self.validate_targets(targets, hidden.shape[:-1], weight.shape[0])

    def validate_targets(self, targets: Tensor, leading_shape: torch.Size, vocab_size: int) -> None:
        if targets.shape != leading_shape:
            raise ValueError(
                f"targets have shape {tuple(targets.shape)} but the predictions have leading "
                f"shape {tuple(leading_shape)}: targets[i] must be the token that position i predicts"
            )
        if targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
        if not self.check_targets:
            return
        bad = real_targets(targets, self.ignore_index) & ((targets < 0) | (targets >= vocab_size))
        if bad.any():
            bad_id = int(targets[bad][0])
            raise ValueError(
                f"target id {bad_id} is out of range for a vocabulary of V={vocab_size}: ids must "
                f"be in [0, {vocab_size - 1}] or equal ignore_index={self.ignore_index}. Check that "
                f"the tokenizer and the model's vocab_size match."
            )

    def apply_softcap(self, logits: Tensor) -> Tensor:
        if self.softcap is None:
            return logits
        return self.softcap * torch.tanh(logits / self.softcap)

    def mix_label_smoothing(self, nll: Tensor, smooth: Tensor) -> Tensor:
        """PyTorch's label smoothing: ``(1 - eps) * nll + eps * mean_j(-log p_j)``."""
        eps = self.label_smoothing
        return nll if eps == 0 else (1 - eps) * nll + eps * smooth

    def reduce(self, per_token: Tensor, valid: Tensor) -> Tensor:
        """Reduce per-token values that are already 0 at ignored positions."""
        if self.reduction == "none":
            return per_token
        total = per_token.sum()
        if self.reduction == "sum":
            return total
        return total / valid.sum().clamp(min=1)

    def finish(self, loss: Tensor, nll: Tensor, z_loss: Tensor) -> Tensor | LossParts:
        return LossParts(loss, nll.detach(), z_loss.detach()) if self.return_parts else loss


class LogitsLoss(TokenLoss):
    """Base of the implementations that materialise the full logits ``hidden @ weight.T``.

    Subclasses implement :meth:`token_loss`: the per-token cross-entropy of float32 logits
    ``(N, V)`` against in-range targets ``(N,)``, with label smoothing and without.
    """

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor):
        self.validate(hidden, weight, targets)
        return self.from_logits(hidden @ weight.T, targets)

    def from_logits(self, logits: Tensor, targets: Tensor):
        """The loss of ready-made logits ``(..., V)`` against aligned ``targets`` ``(...)``."""
        self.validate_targets(targets, logits.shape[:-1], logits.shape[-1])
        # Under bf16 autocast the matmul gives bf16 logits; the loss itself is computed in float32.
        logits = logits.to(loss_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
        logits = self.apply_softcap(logits)
        flat_targets = targets.reshape(-1).long()
        valid = real_targets(flat_targets, self.ignore_index)
        per_token, nll = self.token_loss(logits, flat_targets.masked_fill(~valid, 0))
        per_token, nll = per_token.masked_fill(~valid, 0.0), nll.detach().masked_fill(~valid, 0.0)
        z_term = torch.zeros_like(per_token)
        if self.z_loss > 0:
            z_term = (self.z_loss * torch.logsumexp(logits, dim=-1).square()).masked_fill(~valid, 0.0)
            per_token = per_token + z_term
        loss, nll, z_term = (self.reduce(t.reshape(targets.shape), valid) for t in (per_token, nll, z_term))
        return self.finish(loss, nll, z_term)

    def token_loss(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, nll)`` per token: with label smoothing, and the plain negative log-likelihood."""
        raise NotImplementedError
