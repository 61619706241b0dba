"""The independent float64 reference for the loss registry, and the helpers its tests share (the
grid of shapes, cases and dtypes too: test_losses.py, test_cuda.py and vocab_parallel_ranks.py run it).

The reference is built on :func:`torch.nn.functional.cross_entropy` only: logits in float64,
soft-capping, the temperature, cross-entropy with ``ignore_index`` and ``label_smoothing``, PaLM's
z-loss on the non-ignored tokens, then the reduction; the entropy as ``-sum p log p`` of
``F.softmax`` and ``F.log_softmax``. Nothing here imports the code under test except
``build_loss`` to construct it; the tolerances are the project's policy, :mod:`losslab.losses.tolerances`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from losslab.losses import LOSSES, LogitsLoss, LossParts, PeerLoss, build_loss
from losslab.losses.peer import OFF
from losslab.losses.tolerances import allowed_bf16_error, allowed_max_error, max_error, norm_error

IMPLEMENTATIONS = tuple(LOSSES)  # every registry entry: a new one is in every grid at once
LOGITS_IMPLEMENTATIONS = tuple(name for name, loss in LOSSES.items() if issubclass(loss, LogitsLoss))
REDUCTIONS = ("mean", "sum", "none")
STABLE = tuple(name for name in LOSSES if name != "naive")  # naive overflows on purpose
ALL_OPTIONS = dict(label_smoothing=0.1, z_loss=0.01, softcap=5.0)  # every option that changes the value


def reference_from_logits(
    logits,
    targets,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
    class_weights=None,
):
    """:class:`LossParts` of ``logits (..., V)`` against ``targets (...)``, in ``logits``' dtype.

    The logits are soft-capped, then divided by the temperature. The cross-entropy is
    ``F.cross_entropy`` with ``weight=class_weights`` and label smoothing; the z-loss is added
    unweighted and its mean is over the counted targets (as in Liger-Kernel); ``nll`` is the plain
    cross-entropy (and per token, ``token_nll``); accuracy and the predicted tokens come from the argmax;
    ``unlikely`` marks the targets of probability below 1e-6; the per-token log-sum-exp and largest logit
    are 0 where ignored.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if softcap is not None:
        flat = softcap * torch.tanh(flat / softcap)
    flat = flat / temperature
    flat_targets = targets.reshape(-1)
    kept = flat_targets != ignore_index
    weight = None if class_weights is None else class_weights.to(flat.dtype)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, weight=weight)
    ce_sum = F.cross_entropy(flat, flat_targets, reduction="sum", **options)
    ce = F.cross_entropy(flat, flat_targets, reduction="none", **options)
    nll = F.cross_entropy(flat, flat_targets, reduction="none", ignore_index=ignore_index)
    zeros = torch.zeros_like(nll)
    z = torch.where(kept, z_loss * torch.logsumexp(flat, dim=-1).square(), zeros)
    predicted = torch.where(kept, flat.argmax(dim=-1), -1)
    correct = ((predicted == flat_targets) & kept).to(flat.dtype)
    entropy = torch.where(kept, -(F.softmax(flat, dim=-1) * F.log_softmax(flat, dim=-1)).sum(dim=-1), zeros)
    unlikely = (
        kept & (F.softmax(flat, dim=-1).gather(1, torch.where(kept, flat_targets, 0)[:, None])[:, 0] < 1e-6)
    ).to(flat.dtype)
    lse = torch.where(kept, torch.logsumexp(flat, dim=-1), zeros).reshape(targets.shape)
    max_logit = torch.where(kept, flat.max(dim=-1).values, zeros).reshape(targets.shape)
    n_kept = int(kept.sum())

    def reduce(values):
        if reduction == "none":
            return values.reshape(targets.shape)
        if reduction == "sum":
            return values.sum()
        # Every token ignored: the mean is 0, still connected to the graph (zero gradients).
        return values.sum() / n_kept if n_kept else values.sum() * 0.0

    if reduction == "mean" and n_kept:  # F.cross_entropy's own weighted mean
        loss = F.cross_entropy(flat, flat_targets, reduction="mean", **options) + reduce(z)
    else:
        loss = reduce(ce + z) if reduction == "none" or n_kept else ce_sum * 0.0
    parts = (reduce(correct), predicted.reshape(targets.shape), None, reduce(entropy), reduce(unlikely), lse, max_logit)
    return LossParts(loss, reduce(nll), reduce(z), *parts, token_nll=nll.reshape(targets.shape))


def reference_loss(hidden, weight, targets, bias=None, **options):
    """The float64 reference: ``logits = hidden @ weight.T + bias`` in float64, then the loss."""
    logits = hidden.double() @ weight.double().T
    return reference_from_logits(logits if bias is None else logits + bias.double(), targets, **options)


def torch_bf16_loss(hidden, weight, targets, bias=None, **options):
    """What plain PyTorch gives under bf16 autocast: bf16 logits, F.cross_entropy in float32."""
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        logits = F.linear(hidden, weight, bias)
    return reference_from_logits(logits.float(), targets, **options)


class Result(NamedTuple):
    loss: torch.Tensor
    nll: torch.Tensor
    z_loss: torch.Tensor
    accuracy: torch.Tensor | None  # None for a peer that gives no predictions
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor | None  # None without a bias
    predicted: torch.Tensor | None = None  # compared exactly, by the tests that ask (near-ties turn in float32)
    entropy: torch.Tensor | None = None  # these four None when the loss was not asked for them (diagnose)
    unlikely: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    max_logit: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None  # None for a peer


# judged by the loss tolerance; the gradients by theirs
VALUES = ("loss", "nll", "z_loss", "accuracy", "entropy", "unlikely", "lse", "max_logit", "token_nll")
GRADS = ("grad_hidden", "grad_weight", "grad_bias")
# what a peer may not give (LossParts), and what bf16 rounding turns either way near a threshold
OPTIONAL = ("accuracy", "token_nll")
THRESHOLDS = ("accuracy", "unlikely")


def evaluate(loss_fn, hidden, weight, targets, upstream=None, autocast=False, bias=None):
    """Loss, NLL, z-loss, accuracy and the gradients of ``sum(upstream * loss)`` for fresh leaves
    ``hidden, weight`` (and ``bias``).

    ``loss_fn(hidden, weight, targets, bias)`` returns :class:`LossParts`: an implementation built
    with ``return_parts=True`` or one of the reference functions above.
    """
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=autocast):
        parts = loss_fn(hidden, weight, targets, bias)
    if upstream is None:
        upstream = torch.ones_like(parts.loss)
    parts.loss.backward(upstream.to(parts.loss.dtype))
    return Result(
        parts.loss.detach(),
        parts.nll.detach(),
        parts.z_loss.detach(),
        None if parts.accuracy is None else parts.accuracy.detach(),
        hidden.grad,
        weight.grad,
        None if bias is None else bias.grad,
        parts.predicted,
        parts.entropy,
        parts.unlikely,
        parts.lse,
        parts.max_logit,
        parts.token_nll,
    )


def build(name, **options):
    """An implementation that returns :class:`LossParts`; the test is skipped, with the reason,
    for a peer that cannot run here or has no equivalent of one of ``options``."""
    skip_unless_possible(name, options)
    if name == "torch_lce" and options.get("label_smoothing"):
        options = dict(options, chunking_method=None)  # torch smooths only on its unchunked path
    return build_loss(name, return_parts=True, **options)


def skip_unless_possible(name, options=()):
    """Skip the test where the registry entry ``name`` cannot run, or cannot honour ``options``."""
    loss = LOSSES[name]
    reason = loss.unavailable_reason()
    if reason:
        pytest.skip(f"{name}: {reason}")
    for option in set(options) & set(getattr(loss, "unsupported", ())):
        if options[option] != OFF[option]:
            pytest.skip(f"{name} has no equivalent of {option}")
    if issubclass(loss, PeerLoss) and options.get("temperature", 1) != 1 and options.get("softcap") is not None:
        pytest.skip(f"{name} refuses a temperature with a soft-cap (see losslab.losses.peer)")


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


def assert_within(got, expected, atol, rtol, what):
    """Max |got - expected| <= atol + rtol * max |expected|."""
    error = max_error(got, expected)
    allowed = allowed_max_error(expected, (atol, rtol))
    assert error <= allowed, f"{what}: max error {error:.3g} > allowed {allowed:.3g}"


def assert_results_within(got, expected, loss_tol, grad_tol):
    """Compare two :class:`Result`: the loss and z-loss to ``loss_tol``, the gradients to ``grad_tol``.

    Each tolerance is ``(absolute, relative to the largest magnitude of the expected value)``.
    """
    for field in VALUES + GRADS:
        atol, rtol = loss_tol if field in VALUES else grad_tol
        got_value, expected_value = getattr(got, field), getattr(expected, field)
        if (got_value is None and expected_value is None) or (field in OPTIONAL and got_value is None):
            continue
        assert got_value.shape == expected_value.shape, f"{field}: shape {tuple(got_value.shape)}"
        assert_within(got_value, expected_value, atol, rtol, field)


def assert_bf16_within(got, expected, torch_bf16, loss_slack, grad_slack):
    """``||got - expected|| <= ||torch_bf16 - expected|| + slack * ||expected||`` for each field.

    ``torch_bf16`` is what plain PyTorch gives at that dtype (:func:`torch_bf16_loss`): an
    implementation may lose no more precision than it, beyond the slack.
    """
    for field in VALUES + GRADS:
        slack = loss_slack if field in VALUES else grad_slack
        got_value, expected_value = getattr(got, field), getattr(expected, field)
        # bf16 logits turn near-ties of the argmax and the 1e-6 threshold either way: judged on their own
        if (
            field in THRESHOLDS
            or (got_value is None and expected_value is None)
            or (field in OPTIONAL and got_value is None)
        ):
            continue
        assert got_value.shape == expected_value.shape, field
        error = norm_error(got_value, expected_value)
        allowed = allowed_bf16_error(expected_value, getattr(torch_bf16, field), slack)
        assert error <= allowed, f"{field} under bf16: error {error:.3g} > allowed {allowed:.3g}"


def loss_of_logits(name, logits, targets, **options):
    """The loss of ready-made logits: ``from_logits``, or for the fused ones an identity LM head."""
    loss_fn = build_loss(name, **options)
    if isinstance(loss_fn, LogitsLoss):
        return loss_fn.from_logits(logits, targets)
    return loss_fn(logits, torch.eye(logits.shape[-1], dtype=logits.dtype), targets)


# --- the grid of test_losses.py (also run on CUDA, test_cuda.py, and sharded, vocab_parallel_ranks.py) ---

DTYPES = ("float32", "float64", "bf16-autocast")

SHAPES = {  # id: (leading shape of hidden and targets, d, V)
    "4x47-d31-V123": ((4, 47), 31, 123),
    "1d-37-d16-V97": ((37,), 16, 97),
    "2x5-d16-V50257": ((2, 5), 16, 50257),
}

WITH_BIAS, WEIGHTED = object(), object()
CASES = {  # id: (options, whether every third target is ignore_index)
    "mean": ({}, False),
    "sum": (dict(reduction="sum"), False),
    "none": (dict(reduction="none"), False),
    "ignored-mean": ({}, True),
    "ignored-sum": (dict(reduction="sum"), True),
    "ignored-none": (dict(reduction="none"), True),
    "ignore_index=7": (dict(ignore_index=7), True),
    "ignore_index=-1-none": (dict(ignore_index=-1, reduction="none"), True),
    "label_smoothing": (dict(label_smoothing=0.1), True),
    "label_smoothing-none": (dict(label_smoothing=0.1, reduction="none"), True),
    "z_loss": (dict(z_loss=0.01), False),
    "z_loss-ignored-sum": (dict(z_loss=0.01, reduction="sum"), True),
    "z_loss-none": (dict(z_loss=0.01, reduction="none"), True),
    "softcap": (dict(softcap=5.0), False),
    "softcap-none": (dict(softcap=5.0, reduction="none"), True),
    "all-mean": (ALL_OPTIONS, True),
    "all-ignore_index=7-none": (dict(ALL_OPTIONS, ignore_index=7, reduction="none"), True),
    # An LM head with a bias, and class weights (torch's `weight`): WITH_BIAS and WEIGHTED are
    # replaced by the tensors in case_inputs.
    "bias": (dict(bias=WITH_BIAS), False),
    "bias-none": (dict(bias=WITH_BIAS, reduction="none"), True),
    "class_weights-mean": (dict(class_weights=WEIGHTED), True),
    "class_weights-sum": (dict(class_weights=WEIGHTED, reduction="sum"), True),
    "class_weights-none": (dict(class_weights=WEIGHTED, reduction="none"), True),
    "class_weights-label_smoothing": (dict(class_weights=WEIGHTED, label_smoothing=0.1), True),
    "all-bias-class_weights-mean": (dict(ALL_OPTIONS, bias=WITH_BIAS, class_weights=WEIGHTED), True),
    "all-bias-class_weights-none": (dict(ALL_OPTIONS, bias=WITH_BIAS, class_weights=WEIGHTED, reduction="none"), True),
    # the softmax of the logits divided by a temperature: alone, with the options a peer honours, with every option
    "temperature": (dict(temperature=0.7), True),
    "temperature-bias-class_weights-sum": (
        dict(temperature=2.5, bias=WITH_BIAS, class_weights=WEIGHTED, label_smoothing=0.1, reduction="sum"),
        True,
    ),
    "all-temperature-none": (dict(ALL_OPTIONS, temperature=0.5, reduction="none"), True),
}


def case_inputs(shape_id, case_id, dtype=torch.float32):
    """The case's options (class weights as a tensor), inputs, and the LM head's bias or None;
    ``shape_id`` names one of SHAPES, or is such a shape itself."""
    shape, d, vocab = SHAPES[shape_id] if isinstance(shape_id, str) else shape_id
    options, ignored = dict(CASES[case_id][0]), CASES[case_id][1]
    ignore_index = options.get("ignore_index", -100) if ignored else None
    hidden, weight, targets = make_inputs(shape, d, vocab, ignore_index=ignore_index, dtype=dtype)
    generator = torch.Generator().manual_seed(2)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype) if options.pop("bias", None) else None
    if options.get("class_weights") is WEIGHTED:  # from 0 (a class that never counts) to 2
        class_weights = 2 * torch.rand(vocab, generator=generator, dtype=torch.float64)
        class_weights[::7] = 0.0
        options["class_weights"] = class_weights.to(dtype)
    return options, hidden, weight, targets, bias


# Liger-Kernel's own float32 cross-entropy test: |error| <= 1e-8 + 1e-6 * |reference|, per token.
LIGER_FLOAT32 = (1e-8, 1e-6)
