"""``tiled``: the LM head matmul and cross-entropy in Triton kernels that never write the logits to memory.

Where ``fused`` computes a chunk of rows' full logits at a time (128 MiB of them by default), ``tiled`` keeps
each tile of logits, a block of rows by a tile of the vocabulary, on chip (the kernels are in
:mod:`losslab.losses.tiled_kernels`):

- forward: per block of rows, a loop over the vocabulary tiles gives each row's log-sum-exp, its largest
  logit and its token (accuracy and predicted tokens), its target's logit, with label smoothing the
  class-weighted sum of its logits less the largest (:mod:`losslab.losses.smoothing`), and when asked the
  sum that gives its entropy (:mod:`losslab.losses.entropy`). From these, here in
  torch, come the cross-entropy (class weights and label smoothing), the plain NLL and the z-loss, exactly as
  ``fused`` computes them from its chunks;
- backward: each tile is computed again and turned into the gradient of its logits,
  ``softmax_coef * softmax - target_coef * onehot(target) - smoothing_coef * class_weights`` (times the
  soft-cap's derivative), whose per-row coefficients come from the reduction, the upstream gradient and the
  options (:func:`gradient_coefficients`); the tile's share goes into the gradients of ``hidden``,
  ``weight`` and ``bias``, accumulated in float32 (float64 for float64 inputs).

The backward adds the tiles' shares either with atomics, fast but in an order that changes from run to run
(the last bits of the gradients with it), or with two kernels each of which alone writes its part of the
gradient, in a fixed order: the same bits every run, for one more pass over the logits. ``deterministic``
chooses; by default it follows ``torch.use_deterministic_algorithms`` (which ``trainer.deterministic=true``
turns on), as torch's own operations do.

``filter_eps`` (off by default) skips, in the backward, the tiles whose softmax values are all below it and
that hold none of their rows' targets, as Cut Cross-Entropy's gradient filter does: their logits' gradients
(each at most ``filter_eps`` times its row's softmax coefficient, soft-capped or not) count as 0. The loss
and every other part stay exact. Label smoothing gives every logit a gradient of its own that no softmax
value bounds, so the two are not combined.

It runs on CUDA tensors; Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels on a CPU, in
float32 and float64, for the tests: slowly, and not in bf16.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from losslab.losses.base import NOT_PREDICTED, PER_TOKEN, TokenLoss, loss_dtype, matmul_dtype
from losslab.losses.fused import _scatter
from losslab.targets import real_targets

if TYPE_CHECKING:  # the kernels' module needs triton: imported when a tiled loss runs
    from losslab.losses.tiled_kernels import Problem

INSTALL = 'pip install -e ".[triton]"'
# Cut Cross-Entropy's filter for bf16 ("auto": bf16's eps / 32): the benchmark's filtered row.
CCE_BF16_FILTER_EPS = 2.0**-12


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to interpret its kernels (its own spellings of true)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


class TiledLinearCrossEntropyLoss(TokenLoss):
    """Linear + cross-entropy in Triton tiles; same options and results as the other losses.

    Args:
        filter_eps: skip the backward's tiles whose softmax is below this everywhere and that hold no
            target (an approximation of the gradient, see the module docstring); ``None``, the default:
            the exact gradient. Not with ``label_smoothing``.
        deterministic: ``True`` for the same gradient bits every run, ``False`` for atomics; ``None``
            follows ``torch.are_deterministic_algorithms_enabled()``.
        **options: see :class:`losslab.losses.base.TokenLoss`.
    """

    name = "tiled"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return f"its package triton is not installed: {INSTALL}"
        if not torch.cuda.is_available() and not interpreter_requested():
            return (
                "it needs a CUDA GPU (its kernels are Triton's): run it on one (trainer.accelerator=gpu); "
                "TRITON_INTERPRET=1 runs them on a CPU, slowly, for testing"
            )
        return None

    @classmethod
    def bench_variants(cls, vocab_size: int) -> dict[str, dict]:
        return {"deterministic": {"deterministic": True}, "filtered": {"filter_eps": CCE_BF16_FILTER_EPS}}

    def __init__(self, filter_eps: float | None = None, deterministic: bool | None = None, **options) -> None:
        super().__init__(**options)
        if filter_eps is not None and not 0 < filter_eps < 1:
            raise ValueError(f"filter_eps={filter_eps} must be in (0, 1), or None for the exact gradient")
        if filter_eps is not None and self.label_smoothing > 0:
            raise ValueError(
                f"filter_eps={filter_eps} with label_smoothing={self.label_smoothing}: the filter would drop most "
                "of the smoothing's gradient (every logit gets one, below any softmax); leave one of them off"
            )
        if deterministic not in (None, True, False):
            raise ValueError(f"deterministic={deterministic!r}: choose true, false or null (follow torch's setting)")
        self.filter_eps = filter_eps
        self.deterministic = deterministic
        reason = self.unavailable_reason()
        if reason:
            raise RuntimeError(f"loss {self.name!r} cannot run here: {reason}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, filter_eps={self.filter_eps}, deterministic={self.deterministic}"

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None):
        self.validate(hidden, weight, targets, bias)
        compute_dtype = matmul_dtype(hidden, weight)
        check_runs_here(hidden.device, compute_dtype)
        options = TiledOptions(
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            temperature=self.temperature,
            filter_eps=self.filter_eps,
            deterministic=torch.are_deterministic_algorithms_enabled()
            if self.deterministic is None
            else self.deterministic,
            compute_dtype=compute_dtype,
            grad_enabled=torch.is_grad_enabled(),
            diagnose=self.return_parts and self.diagnose,
        )
        loss, *per_token = _TiledLinearCrossEntropy.apply(hidden, weight, targets, bias, self.class_weights, options)
        if not self.return_parts:
            return loss
        return self.finish_per_token(targets, loss, per_token, predicted=True, diagnosed=options.diagnose)


def check_runs_here(device: torch.device, compute_dtype: torch.dtype) -> None:
    """Refuse, in one line, what the kernels cannot run: CPU tensors without the interpreter, and bf16 in it."""
    from losslab.losses.tiled_kernels import interpreted

    if interpreted():
        if compute_dtype not in (torch.float32, torch.float64):
            raise RuntimeError(
                f"loss 'tiled' under Triton's interpreter (TRITON_INTERPRET=1) computes in float32 or float64, "
                f"not {compute_dtype} (the interpreter gets bf16 wrong): run it in float32, or on a CUDA GPU"
            )
    elif device.type != "cuda":
        raise RuntimeError(
            f"loss 'tiled' runs its Triton kernels on CUDA tensors, not {device.type} ones: train on a GPU "
            "(trainer.accelerator=gpu), or set TRITON_INTERPRET=1 before starting to test it on a CPU"
        )


@dataclass(frozen=True)
class TiledOptions:
    """Everything but the tensors that :class:`_TiledLinearCrossEntropy` needs, as one value."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    temperature: float
    filter_eps: float | None
    deterministic: bool  # resolved: the backward's kernels
    compute_dtype: torch.dtype  # of the dots: the inputs' own, or autocast's
    # Where the loss was called: a Function's forward always runs without grad mode.
    grad_enabled: bool
    diagnose: bool  # the entropy (0 otherwise)


class _TiledLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        bias: Tensor | None,
        class_weights: Tensor | None,
        options: TiledOptions,
    ) -> tuple[Tensor, ...]:
        from losslab.losses.tiled_kernels import Problem, RowStatistics, row_statistics

        acc_dtype = loss_dtype(options.compute_dtype)
        flat_targets = targets.reshape(-1)
        # Ignored rows are left out: the kernels read the counted rows of hidden by their indices.
        kept = real_targets(flat_targets, options.ignore_index).nonzero().squeeze(1)
        all_kept = kept.numel() == flat_targets.numel()
        t = (flat_targets if all_kept else flat_targets[kept]).long()
        problem = Problem(
            hidden=unit_stride(hidden.reshape(-1, hidden.shape[-1])),
            rows=None if all_kept else kept,
            weight=unit_stride(weight),
            bias=bias,
            targets=t,
            class_weights=None if class_weights is None else class_weights.to(acc_dtype),
            softcap=options.softcap,
            temperature=options.temperature,
            dot_dtype=options.compute_dtype,
            acc_dtype=acc_dtype,
        )
        eps = options.label_smoothing
        if t.numel():
            stats = row_statistics(problem, smoothing=eps > 0, entropy=options.diagnose)
        else:
            empty = t.new_empty(0, dtype=acc_dtype)
            stats = RowStatistics(empty, empty, empty, t, empty, empty)
        row_entropy = torch.zeros_like(stats.lse) if stats.entropy is None else stats.entropy

        nll = stats.lse - stats.target_logit
        ce = nll if class_weights is None else problem.class_weights[t] * nll
        if eps > 0:  # as in fused: (1 - eps) * w[t] * nll + (eps / V) * sum_j w_j * (-log p_j)
            ce = (1 - eps) * ce + (eps / weight.shape[0]) * stats.smooth
        z_loss = options.z_loss * stats.lse.square()
        if options.reduction == "none":
            loss = _scatter(ce + z_loss, kept, targets.shape, all_kept)
        else:
            ce_scale, z_scale = reduction_scales(options.reduction, problem)
            loss = ce.sum() * ce_scale + z_loss.sum() * z_scale
        correct = (stats.predicted == t).to(acc_dtype)
        values = (ce, nll, z_loss, correct, stats.predicted, row_entropy, stats.lse, stats.max_logit)
        per_token = [
            _scatter(values, kept, flat_targets.shape, all_kept, NOT_PREDICTED if name == "predicted" else 0)
            for name, values in zip(PER_TOKEN, values, strict=True)
        ]

        ctx.mark_non_differentiable(*per_token)
        ctx.options = options
        ctx.meta = problem[6:]  # softcap, temperature and the dtypes
        ctx.shapes_and_dtypes = (hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if options.grad_enabled and any(ctx.needs_input_grad[:4]):
            ctx.save_for_backward(*problem[:6], stats.lse)
        return loss, *per_token

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_grad_per_token: Tensor):
        from losslab.losses.tiled_kernels import Problem, gradients

        *saved, lse = ctx.saved_tensors
        problem = Problem(*saved, *ctx.meta)
        options = ctx.options
        hidden_shape, hidden_dtype, weight_dtype, bias_dtype = ctx.shapes_and_dtypes
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        if options.reduction == "none":
            upstream = grad_loss.reshape(-1)
            upstream = upstream if problem.rows is None else upstream[problem.rows]
        else:
            upstream = grad_loss
        coefficients = gradient_coefficients(problem, lse, upstream.to(problem.acc_dtype), options)
        grad_h, grad_w, grad_b = gradients(
            problem,
            coefficients,
            needs,
            deterministic=options.deterministic,
            filter_eps=options.filter_eps,
            smoothing=options.label_smoothing > 0,
        )
        grad_h = None if grad_h is None else grad_h.reshape(hidden_shape).to(hidden_dtype)
        grad_w = None if grad_w is None else grad_w.to(weight_dtype)
        grad_b = None if grad_b is None else grad_b.to(bias_dtype)
        return grad_h, grad_w, None, grad_b, None, None


def unit_stride(matrix: Tensor) -> Tensor:
    """The kernels step along the last dimension one element at a time."""
    return matrix if matrix.stride(-1) == 1 else matrix.contiguous()


def reduction_scales(reduction: str, problem: Problem) -> tuple[Tensor | float, Tensor | float]:
    """What the reduction multiplies each token's cross-entropy and z-loss by: for a mean, one over the
    summed class weights of the targets (their count without) and one over their count; else 1."""
    if reduction != "mean":
        return 1.0, 1.0
    count = 1.0 / max(problem.n_rows, 1)
    if problem.class_weights is None:
        return count, count
    weight_sum = problem.class_weights[problem.targets].sum()
    return 1.0 / torch.where(weight_sum > 0, weight_sum, 1.0), count


def gradient_coefficients(problem: Problem, lse: Tensor, upstream: Tensor, options: TiledOptions) -> Tensor:
    """``(4, n)``: per counted row its log-sum-exp and the coefficients of its logits' gradient,

    ``softmax_coef * softmax - target_coef * onehot(t) - smoothing_coef * w`` with ``w`` the class weights
    (1 without), ``eps`` the label smoothing and ``c, z`` the upstream gradient times the reduction's scales
    of the cross-entropy and the z-loss: ``softmax_coef = c * ((1 - eps) * w[t] + eps * mean(w)) + z * 2 *
    z_loss * lse``, ``target_coef = c * (1 - eps) * w[t]``, ``smoothing_coef = c * eps / V``."""
    eps = options.label_smoothing
    ce_scale, z_scale = reduction_scales(options.reduction, problem)
    ce_scale, z_scale = upstream * ce_scale, upstream * z_scale
    target_weight = 1.0 if problem.class_weights is None else problem.class_weights[problem.targets]
    mean_weight = 1.0 if problem.class_weights is None else problem.class_weights.mean()
    softmax_coef = ce_scale * ((1 - eps) * target_weight + eps * mean_weight) + z_scale * 2 * options.z_loss * lse
    target_coef = ce_scale * (1 - eps) * target_weight
    smoothing_coef = ce_scale * eps / problem.weight.shape[0]
    return torch.stack(torch.broadcast_tensors(lse, softmax_coef, target_coef, smoothing_coef)).contiguous()
