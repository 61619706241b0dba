"""How the audit (:mod:`losslab.audit`) measures an entry: one evaluation on fresh leaves, the float64
reference and PyTorch's own at bf16 (:class:`Baseline`), the true-class probe, and each value's
:class:`Check` by the project's tolerance policy (:mod:`losslab.losses.tolerances`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from losslab.audit_run import Activations
from losslab.losses import LossParts
from losslab.losses.tolerances import TOLERANCES, allowed_bf16_error, allowed_max_error, max_error, norm_error

TINY = torch.finfo(torch.float64).tiny


class Inputs(NamedTuple):
    """A loss's arguments, ``loss_fn(hidden, weight, targets, bias)``, in the dtype it gets them."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    bias: Tensor | None

    def to(self, dtype: torch.dtype) -> Inputs:
        bias = None if self.bias is None else self.bias.to(dtype)
        return Inputs(self.hidden.to(dtype), self.weight.to(dtype), self.targets, bias)

    def rows(self, positions: slice) -> Inputs:
        return Inputs(self.hidden[positions], self.weight, self.targets[positions], self.bias)


class TorchLoss:
    """PyTorch's own loss: ``F.linear``, then ``F.cross_entropy`` in float32 (float64 for float64
    logits), with the run's options (the logits soft-capped, then divided by the temperature). On float64 inputs it is the reference; on bf16 ones, or under
    bf16 autocast, it gives PyTorch's own error at that precision, which the bf16 verdict allows."""

    def __init__(self, options: Mapping[str, Any], reduction: str = "mean") -> None:
        self.options, self.reduction = options, reduction

    def __call__(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None) -> LossParts:
        logits = F.linear(hidden, weight, bias)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            softcap, ignore_index = self.options["softcap"], self.options["ignore_index"]
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            logits = logits / self.options["temperature"]
            smoothing = self.options["label_smoothing"]
            ce = F.cross_entropy(
                logits, targets, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none"
            )
            nll = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none") if smoothing else ce
            counted = targets != ignore_index
            z_loss = self.options["z_loss"] * torch.logsumexp(logits, dim=-1).square() * counted
        count = counted.sum().clamp(min=1)
        reduce = {"none": lambda x: x, "sum": lambda x: x.sum(), "mean": lambda x: x.sum() / count}[self.reduction]
        return LossParts(reduce(ce + z_loss), reduce(nll).detach(), reduce(z_loss).detach(), None, None)


class Outcome(NamedTuple):
    """One evaluation: the loss's values and its leaves' gradients, by name, and naive's count."""

    values: dict[str, Tensor]  # loss, nll, grad_hidden, grad_weight, grad_bias (with a bias), true_class
    inexact_grads: int | None = None


def evaluation(loss_fn: Callable[..., LossParts], inputs: Inputs, autocast: bool) -> tuple[Callable[[], Outcome], list]:
    """A step that runs ``loss_fn`` forward (under bf16 autocast if asked) and backward on leaves
    made of ``inputs``, and gives its :class:`Outcome`; and the leaves, whose gradients it sets."""
    leaves = [t.detach().clone().requires_grad_() for t in (inputs.hidden, inputs.weight, inputs.bias) if t is not None]
    bias = leaves[2] if inputs.bias is not None else None
    device = inputs.hidden.device.type

    def step() -> Outcome:
        with torch.autocast(device, dtype=torch.bfloat16) if autocast else nullcontext():
            parts = loss_fn(leaves[0], leaves[1], inputs.targets, bias)
        parts.loss.backward(torch.ones_like(parts.loss))
        names = ("grad_hidden", "grad_weight", "grad_bias")
        # an entry that gives a leaf no gradient gives it zeros: judged as such, not passed over
        grads = {name: torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for name, leaf in zip(names, leaves)}
        values = {"loss": parts.loss.detach(), "nll": parts.nll, **grads}
        return Outcome(values, None if parts.inexact_grads is None else int(parts.inexact_grads))

    return step, leaves


def evaluate(loss_fn: Callable[..., LossParts], inputs: Inputs, autocast: bool) -> Outcome:
    return evaluation(loss_fn, inputs, autocast)[0]()


def true_class_gradients(loss_fn: Callable[..., LossParts], inputs: Inputs, tokens: Tensor, autocast: bool) -> Tensor:
    """``dL/dlogit[target]`` of each of ``tokens`` (positions), each alone, with ``reduction="sum"``:
    the gradient of the LM head's bias at its target (of a zero bias when there is none)."""
    bias = inputs.bias if inputs.bias is not None else inputs.weight.new_zeros(inputs.weight.shape[0])
    gradients = []
    for token in tokens.tolist():
        alone = Inputs(inputs.hidden[token : token + 1], inputs.weight, inputs.targets[token : token + 1], bias)
        gradients.append(evaluate(loss_fn, alone, autocast).values["grad_bias"][inputs.targets[token]])
    return torch.stack(gradients)


class Baseline(NamedTuple):
    """What an entry is judged against at one dtype: its inputs, the float64 reference's outcome on
    them, and PyTorch's own at that precision (bf16 only)."""

    inputs: Inputs
    reference: Outcome
    torch_own: Outcome | None


def baseline(activations: Activations, dtype: str, tokens: Tensor) -> Baseline:
    """The :class:`Baseline` at ``dtype``: float32 activations, or bf16 ones for ``bf16``; the
    reference on the same values in float64."""
    inputs = Inputs(activations.hidden, activations.weight, activations.targets, activations.bias)
    inputs = inputs.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    options = activations.loss_options

    def outcome(loss_inputs: Inputs, autocast: bool) -> Outcome:
        result = evaluate(TorchLoss(options), loss_inputs, autocast)
        result.values["true_class"] = true_class_gradients(TorchLoss(options, "sum"), loss_inputs, tokens, autocast)
        return result

    torch_own = None if dtype == "fp32" else outcome(inputs, autocast=dtype == "bf16-autocast")
    return Baseline(inputs, outcome(inputs.to(torch.float64), autocast=False), torch_own)


def confident_targets(activations: Activations, count: int) -> tuple[Tensor, str]:
    """The positions of the ``count`` targets the model gives the highest probability (in float64),
    and what the logits are like, in words."""
    inputs = Inputs(activations.hidden, activations.weight, activations.targets, activations.bias).to(torch.float64)
    with torch.no_grad():
        nll = TorchLoss(activations.loss_options, "none")(*inputs).nll
        logits = F.linear(inputs.hidden, inputs.weight, inputs.bias)
        largest, lse = logits.amax(dim=-1), torch.logsumexp(logits, dim=-1)
    counted = (activations.targets != activations.loss_options["ignore_index"]).nonzero().squeeze(1)
    probability = torch.exp(-nll[counted])
    top = probability.topk(min(count, len(counted)))
    words = (
        f"largest {largest[counted].max().item():.4g}, log-sum-exp {lse[counted].mean().item():.4g} on average "
        f"(largest {lse[counted].max().item():.4g}); the target's probability {probability.median().item():.3g} "
        f"(median), the {len(top.values)} probed {top.values.min().item():.6g} to {top.values.max().item():.6g}"
    )
    return counted[top.indices], words


class Check(NamedTuple):
    """One quantity against the reference: its max absolute error; that over the reference's
    largest magnitude (the true-class gradient: token by token); and the error over what the
    tolerance allows, which passes at most 1."""

    max_abs: float
    relative: float
    ratio: float


def check(dtype: str, what: str, got: Tensor, base: Baseline, slack: Mapping[str, float]) -> Check:
    """:class:`Check` of the value ``what`` of an entry at ``dtype`` by the project's tolerance policy."""
    expected = base.reference.values[what]
    error, scale = (got.double() - expected.double()).abs(), expected.double().abs()
    kind = "loss" if what in ("loss", "nll") else "grad"
    if what == "true_class":
        relative = (error / scale.clamp(min=TINY)).max().item()
    else:
        relative = error.max().item() / max(scale.max().item(), TINY)
    if dtype != "fp32":
        ratio = norm_error(got, expected) / allowed_bf16_error(expected, base.torch_own.values[what], slack[kind])
    elif what == "true_class":
        absolute, relative_tolerance = TOLERANCES["float32"]["grad"]
        ratio = (error / (absolute + relative_tolerance * scale)).max().item()
    else:
        ratio = max_error(got, expected) / allowed_max_error(expected, TOLERANCES["float32"][kind])
    return Check(error.max().item(), relative, ratio)


def difference(got: Tensor, other: Tensor) -> float:
    """The largest difference of two results, over the largest magnitude of ``other``: 0 when they are
    bitwise the same."""
    return max_error(got, other) / max(other.double().abs().max().item(), TINY)
