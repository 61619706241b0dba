"""What the field's own fused losses need to sit in the registry beside losslab's.

A peer is called like every other entry, ``loss_fn(hidden, weight, targets, bias=None)``, and takes
losslab's options with the same meaning. Whatever it cannot honour is refused when it is built,
naming the option and the peer; so is a missing package (with the command that installs it) or a
device it needs. Its reductions are losslab's: ``mean`` is 0 when every target is ignored.
:class:`~losslab.losses.base.LossParts` come from the peer's own outputs where it has them (the
z-loss, the predicted tokens); the plain negative log-likelihood, when label smoothing or class
weights make the objective differ from it, takes a second, gradient-free call of the peer. The entropy,
the unlikely targets, the log-sum-exp, the largest logit and each target's NLL, which no peer's kernel returns, come from
losslab's ``fused`` on the same inputs, gradient-free, when they are asked for (``diagnose``): one more
matmul, a chunk of rows at a time, never the full logits.

The temperature is honoured exactly by the inputs: ``(hidden / T) @ weight.T + bias / T`` are the logits
divided by ``T``. A peer that soft-caps would then cap the divided logits, not divide the capped ones, so
a temperature with a soft-cap is refused.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from losslab.losses.base import NOT_PREDICTED, LossParts, TokenLoss
from losslab.losses.fused import FusedLinearCrossEntropyLoss
from losslab.targets import real_targets

# What each of losslab's options is when it is off: an option with another value must be honoured.
OFF = {"label_smoothing": 0.0, "z_loss": 0.0, "softcap": None, "class_weights": None}


class PeerOutput(NamedTuple):
    """What one call of a peer gives: its loss (summed, or per token), and if it has them, its
    z-loss part (same reduction, detached) and the predicted token of every position."""

    loss: Tensor
    z_loss: Tensor | None = None
    predicted: Tensor | None = None


class PeerLoss(TokenLoss):
    """Base of the registry entries that call another project's loss.

    Subclasses set ``package`` (the module to import), ``install`` (the command that installs it),
    ``unsupported`` (the options it has no equivalent for) and implement :meth:`call_peer`.
    """

    package: ClassVar[str]
    install: ClassVar[str]
    unsupported: ClassVar[tuple[str, ...]] = ()
    computes_float64: ClassVar[bool] = True  # False: float64 inputs give a float32 loss
    gives_predictions: ClassVar[bool] = False

    @classmethod
    def takes_bias(cls) -> bool:
        """Whether the installed peer takes an LM head bias."""
        return True

    def __init__(self, **options) -> None:
        super().__init__(**options)
        for option in self.unsupported:
            value = getattr(self, option)
            if value is not OFF[option] and value != OFF[option]:
                raise ValueError(
                    f"loss {self.name!r} cannot honour {option}={value!r}: the peer has no such option; "
                    f"leave it at {OFF[option]!r} or use another loss"
                )
        if self.temperature != 1 and self.softcap is not None:
            raise ValueError(
                f"loss {self.name!r} cannot honour temperature={self.temperature} with softcap={self.softcap}: it "
                "caps the logits it computes, and dividing its input would cap the divided logits; use a losslab "
                "entry (fused, tiled, cross_entropy) or leave one of them off"
            )
        reason = self.unavailable_reason()
        if reason:
            raise RuntimeError(f"loss {self.name!r} cannot run here: {reason}")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why the peer cannot run on this machine (its package is missing, or a device), or None."""
        if importlib.util.find_spec(cls.package) is None:
            return f"its package {cls.package} is not installed: {cls.install}"
        return None

    def call_peer(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, reduction: str, plain: bool
    ) -> PeerOutput:
        """The peer on ``hidden (N, d)``, ``targets (N,)``, with ``reduction`` "sum" or "none";
        ``plain`` asks for the plain cross-entropy (no smoothing, class weights or z-loss)."""
        raise NotImplementedError

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None):
        self.validate(hidden, weight, targets, bias)
        diagnosed = self.diagnostics(hidden, weight, targets, bias) if self.return_parts and self.diagnose else None
        # int64 targets: torch's chunked path and the Triton kernels take no other
        flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
        if self.temperature != 1:  # the logits divided by it (see the module)
            flat_hidden = flat_hidden / self.temperature
            bias = None if bias is None else bias / self.temperature
        valid = real_targets(flat_targets, self.ignore_index)
        per_token = self.reduction == "none"
        # Summed by the peer, divided here: its own mean is NaN when every target is ignored.
        out = self.call_peer(flat_hidden, weight, flat_targets, bias, "none" if per_token else "sum", plain=False)
        count = valid.sum().clamp(min=1)
        weights = self.target_weights(flat_targets.masked_fill(~valid, 0), valid, out.loss.dtype)
        loss = self.reduced(out.loss, targets.shape, divisor=torch.where(weights.sum() > 0, weights.sum(), 1.0))
        if not self.return_parts:
            return loss
        plain = self.label_smoothing == 0 and self.class_weights is None and self.z_loss == 0
        if plain:
            nll = out.loss.detach()
        else:
            with torch.no_grad():
                nll = self.call_peer(
                    flat_hidden, weight, flat_targets, bias, "none" if per_token else "sum", plain=True
                ).loss
        z_loss = torch.zeros_like(nll) if out.z_loss is None else out.z_loss
        accuracy = predicted = None
        if out.predicted is not None:
            predicted = out.predicted.masked_fill(~valid, NOT_PREDICTED)
            correct = ((predicted == flat_targets) & valid).to(nll.dtype)
            accuracy = self.reduced(correct if per_token else correct.sum(), targets.shape, count)
            predicted = predicted.reshape(targets.shape)
        parts = LossParts(
            loss,
            self.reduced(nll, targets.shape, count),
            self.reduced(z_loss, targets.shape, count),
            accuracy,
            predicted,
        )
        if diagnosed is None:
            return parts
        return parts._replace(
            entropy=diagnosed.entropy,
            unlikely=diagnosed.unlikely,
            lse=diagnosed.lse,
            max_logit=diagnosed.max_logit,
            token_nll=diagnosed.token_nll,
        )

    def diagnostics(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None) -> LossParts:
        """:class:`LossParts` of losslab's ``fused`` on the same inputs, gradient-free, for their entropy,
        unlikely targets, log-sum-exp and largest logit (the options that change the logits: the soft-cap and
        the temperature; the reduction), which no peer's kernel returns."""
        fused = FusedLinearCrossEntropyLoss(
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            softcap=self.softcap,
            temperature=self.temperature,
            check_targets=False,  # checked by validate
            return_parts=True,
        )
        fused.predict = False
        with torch.no_grad():
            return fused(hidden, weight, targets, bias)

    def reduced(self, values: Tensor, shape: torch.Size, divisor: Tensor) -> Tensor:
        """A peer's per-token values (``"none"``) reshaped, or its sum divided for ``"mean"``."""
        if self.reduction == "none":
            return values.reshape(shape)
        return values / divisor if self.reduction == "mean" else values
