"""The independent float64 reference for the loss registry, and the helpers its tests share.

The reference is built on :func:`torch.nn.functional.cross_entropy` only: logits in float64,
soft-capping, cross-entropy with ``ignore_index`` and ``label_smoothing``, PaLM's z-loss on the
non-ignored tokens, then the reduction. Nothing here imports the code under test except
``build_loss`` to construct it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from losslab.losses import LOSSES, LogitsLoss, LossParts, build_loss

IMPLEMENTATIONS = tuple(LOSSES)  # every registry entry: a new one is in every grid at once
LOGITS_IMPLEMENTATIONS = tuple(name for name, loss in LOSSES.items() if issubclass(loss, LogitsLoss))
REDUCTIONS = ("mean", "sum", "none")
STABLE = tuple(name for name in LOSSES if name != "naive")  # naive overflows on purpose
ALL_OPTIONS = dict(label_smoothing=0.1, z_loss=0.01, softcap=5.0)  # every option that changes the value


def reference_from_logits(
    logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """:class:`LossParts` ``(loss, nll, z_loss)`` of ``logits (..., V)`` against ``targets (...)``,
    in ``logits``' dtype: ``nll`` is the cross-entropy without label smoothing or z-loss."""
    flat = logits.reshape(-1, logits.shape[-1])
    if softcap is not None:
        flat = softcap * torch.tanh(flat / softcap)
    flat_targets = targets.reshape(-1)
    kept = flat_targets != ignore_index
    ce = F.cross_entropy(
        flat, flat_targets, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    nll = F.cross_entropy(flat, flat_targets, reduction="none", ignore_index=ignore_index)
    z = torch.where(kept, z_loss * torch.logsumexp(flat, dim=-1).square(), torch.zeros_like(ce))
    n_kept = int(kept.sum())

    def reduce(values):
        if reduction == "none":
            return values
        if reduction == "sum":
            return values.sum()
        # Every token ignored: the mean is 0, still connected to the graph (zero gradients).
        return values.sum() / n_kept if n_kept else values.sum() * 0.0

    return LossParts(*(reduce(t.reshape(targets.shape)) for t in (ce + z, nll, z)))


def reference_loss(hidden, weight, targets, **options):
    """The float64 reference: ``logits = hidden @ weight.T`` in float64, then the loss."""
    return reference_from_logits(hidden.double() @ weight.double().T, targets, **options)


def torch_bf16_loss(hidden, weight, targets, **options):
    """What plain PyTorch gives under bf16 autocast: bf16 logits, F.cross_entropy in float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.T
    return reference_from_logits(logits.float(), targets, **options)


class Result(NamedTuple):
    loss: torch.Tensor
    nll: torch.Tensor
    z_loss: torch.Tensor
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor


def evaluate(loss_fn, hidden, weight, targets, upstream=None, autocast=False):
    """Loss, NLL, z-loss and the gradients of ``sum(upstream * loss)`` for fresh leaves ``hidden, weight``.

    ``loss_fn(hidden, weight, targets)`` returns :class:`LossParts`: an implementation built with
    ``return_parts=True`` or one of the reference functions above.
    """
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, nll, z_loss = loss_fn(hidden, weight, targets)
    if upstream is None:
        upstream = torch.ones_like(loss)
    loss.backward(upstream.to(loss.dtype))
    return Result(loss.detach(), nll.detach(), z_loss.detach(), hidden.grad, weight.grad)


def build(name, **options):
    """An implementation that returns :class:`LossParts` ``(loss, nll, z_loss)``."""
    return build_loss(name, return_parts=True, **options)


def make_inputs(shape, d, vocab, *, seed=0, logit_std=3.0, ignore_index=None, dtype=torch.float32):
    """Random ``hidden (*shape, d)``, ``weight (V, d)`` and ``targets (*shape)``.

    Logits ``hidden @ weight.T`` have a standard deviation of about ``logit_std``, as a trained
    model's do. With ``ignore_index`` set, every third token (from the second) is ignored.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64) * (logit_std / math.sqrt(d))
    targets = torch.randint(0, vocab, shape, generator=gen)
    if ignore_index is not None:
        targets.view(-1)[1::3] = ignore_index
    return hidden.to(dtype), weight.to(dtype), targets


def random_upstream(targets, reduction, seed=1):
    """A random upstream gradient for the loss: per token for ``"none"``, else a scalar other than 1."""
    gen = torch.Generator().manual_seed(seed)
    shape = targets.shape if reduction == "none" else ()
    return torch.rand(shape, generator=gen, dtype=torch.float64) * 2 + 0.25


def _addmm_flops(bias_shape, a_shape, b_shape, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_matmul_flops(fn):
    """FLOPs of the matmuls that ``fn()`` runs, forward and backward.

    FlopCounterMode does not count the in-place ``addmm_`` (used to accumulate a gradient) by
    itself; it is added here with the same formula as ``addmm``.
    """
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops}) as counter:
        fn()
    return counter.get_total_flops()


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def norm_error(actual, expected):
    return (actual.double() - expected.double()).norm().item()


def assert_within(got, expected, atol, rtol, what):
    """Max |got - expected| <= atol + rtol * max |expected|."""
    error = max_error(got, expected)
    allowed = atol + rtol * expected.abs().max().item()
    assert error <= allowed, f"{what}: max error {error:.3g} > allowed {allowed:.3g}"


def assert_results_within(got, expected, loss_tol, grad_tol):
    """Compare two :class:`Result`: the loss and z-loss to ``loss_tol``, the gradients to ``grad_tol``.

    Each tolerance is ``(absolute, relative to the largest magnitude of the expected value)``.
    """
    for field in Result._fields:
        atol, rtol = loss_tol if field in LossParts._fields else grad_tol
        got_value, expected_value = getattr(got, field), getattr(expected, field)
        assert got_value.shape == expected_value.shape, f"{field}: shape {tuple(got_value.shape)}"
        assert_within(got_value, expected_value, atol, rtol, field)


def assert_bf16_within(got, expected, torch_bf16, loss_slack, grad_slack):
    """``||got - expected|| <= ||torch_bf16 - expected|| + slack * ||expected||`` for each field.

    ``torch_bf16`` is what plain PyTorch gives at that dtype (:func:`torch_bf16_loss`): an
    implementation may lose no more precision than it, beyond the slack.
    """
    for field in Result._fields:
        slack = loss_slack if field in LossParts._fields else grad_slack
        got_value, expected_value = getattr(got, field), getattr(expected, field)
        assert got_value.shape == expected_value.shape, field
        error = norm_error(got_value, expected_value)
        allowed = norm_error(getattr(torch_bf16, field), expected_value) + slack * expected_value.norm()
        assert error <= allowed, f"{field} under bf16: error {error:.3g} > allowed {allowed:.3g}"


def loss_of_logits(name, logits, targets, **options):
    """The loss of ready-made logits: ``from_logits``, or for ``fused`` an identity LM head."""
    loss_fn = build_loss(name, **options)
    if name == "fused":
        return loss_fn(logits, torch.eye(logits.shape[-1], dtype=logits.dtype), targets)
    return loss_fn.from_logits(logits, targets)
