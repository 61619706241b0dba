"""``fused``: the LM head matmul and cross-entropy together, one chunk of tokens at a time.

The full ``(tokens, V)`` logits are never materialised: for each chunk of tokens we compute the
chunk's logits, their log-sum-exp (in float32, also under bf16 autocast), the loss and, when a
gradient is needed, the gradient of the logits, which goes straight into the gradients of
``hidden``, ``weight`` and ``bias`` (the latter two accumulated in float32). Peak memory is one
chunk's logits instead of all of them, and the time is that of the three matmuls any
implementation needs. The argmax that token accuracy needs comes with the row maximum that the
log-sum-exp takes anyway, and so do the row's log-sum-exp and largest logit of ``LossParts``; its
entropy takes one more sum beside the log-sum-exp's, ``sum_j exp(x_j - max) * (x_j - max)``
(:mod:`losslab.losses.entropy`), a pass over each chunk's logits on the calls that ask for it.

For ``reduction="mean"`` or ``"sum"`` the gradients are computed during the forward pass (the
upstream gradient is a scalar that only rescales them); for ``"none"`` the per-token upstream
gradient is only known in backward, which then recomputes each chunk's logits (one more matmul).

With ``vocab_parallel`` (an LM head sharded by vocabulary rows, :mod:`losslab.losses.vocab_parallel`)
each rank computes its columns of a chunk's logits, ``chunk_size x (stop - start)``, and the ranks
exchange 3 to 6 floats per row of the chunk in one all-gather (the row maximum, the sum of exp
below it, the target's logit, with label smoothing the logits' sum below the maximum, and with
diagnostics the entropy's sum, with predictions the argmax), from which every rank has the whole rows' log-sum-exp,
loss, entropy and argmax; the chunk's
gradient is then local, and the hidden states' is summed over the ranks once, in backward.

Over 350 lines on purpose: the forward, the backward and the chunk loop they share are one algorithm,
whose pieces read each other's buffers; apart, each would be read only with the others open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from losslab.losses.base import NOT_PREDICTED, PER_TOKEN, TokenLoss, loss_dtype, matmul_dtype
from losslab.losses.entropy import entropy, exp_sums
from losslab.losses.row_max import max_and_argmax
from losslab.losses.smoothing import part_weights, smoothing_sum, weighted_row_sums
from losslab.losses.vocab_parallel import VocabParallel, whole
from losslab.targets import real_targets

# One chunk's float32 logits take about this many bytes; see default_chunk_size.
CHUNK_LOGITS_BYTES = 128 * 2**20
# Each row of the chunk buffer starts on a boundary of this many bytes (a cache line): see padded_width.
ROW_ALIGNMENT_BYTES = 64


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk: a power of two whose float32 logits fill about CHUNK_LOGITS_BYTES.

    Large enough for efficient matmuls and few passes over the weight gradient, small enough
    that the chunk's logits stay a small fraction of the full ones (128 MiB: 512 rows at
    V=50257, 256 at V=128256).
    """
    rows = max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))
    return 1 << (rows.bit_length() - 1)


def padded_width(columns: int, dtype: torch.dtype) -> int:
    """The row stride of the chunk buffer: ``columns`` rounded up to whole :data:`ROW_ALIGNMENT_BYTES`.

    BLAS writes a matmul's output faster when each row starts on a cache line: at V=50257 (float32
    rows of 201,028 bytes) the logits of a 512-row chunk (d=128) took 82 ms into rows padded to
    50,272 columns against 122 ms into unpadded ones, one core (and the weight's gradient 80 against
    90; ``scripts/bench_padding.py``); bitwise the same values. The padding columns are never read.
    """
    per_line = max(1, ROW_ALIGNMENT_BYTES // dtype.itemsize)
    return -(-columns // per_line) * per_line


class FusedLinearCrossEntropyLoss(TokenLoss):
    """Linear + cross-entropy in token chunks; same options and results as the other losses.

    Args:
        chunk_size: tokens per chunk; ``None`` picks :func:`default_chunk_size` of V.
        **options: see :class:`losslab.losses.base.TokenLoss`.
    """

    name = "fused"
    takes_vocab_parallel = True

    def __init__(self, chunk_size: int | None = None, **options) -> None:
        super().__init__(**options)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1, or None for automatic")
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None):
        self.validate_head(hidden, weight, bias)
        parallel = self.vocab_parallel
        # under vocab_parallel, checked to have chunks of as many rows on every rank: as many all-gathers
        layout = self.vocab_layout(weight.shape[0], targets, self.chunk_size or 0)
        self.validate_targets(targets, hidden.shape[:-1], layout.vocab_size)
        # The entropy costs a pass over the logits; the argmax is free without vocab_parallel (the row
        # maximum gives it), and with it a column of the all-gather.
        diagnose = self.return_parts and self.diagnose
        predict = parallel is None or (self.return_parts and self.predict)
        options = FusedOptions(
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            temperature=self.temperature,
            chunk_size=self.chunk_size or default_chunk_size(layout.widest),
            compute_dtype=matmul_dtype(hidden, weight),
            grad_enabled=torch.is_grad_enabled(),
            vocab_size=layout.vocab_size,
            vocab_bounds=layout.bounds,
            vocab_parallel=parallel,
            predict=predict,
            diagnose=diagnose,
        )
        loss, *per_token = _FusedLinearCrossEntropy.apply(hidden, weight, targets, bias, self.class_weights, options)
        return self.finish_per_token(targets, loss, per_token, predict, diagnose) if self.return_parts else loss


@dataclass(frozen=True)
class FusedOptions:
    """Everything but the tensors that :class:`_FusedLinearCrossEntropy` needs, as one value."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    temperature: float
    chunk_size: int
    compute_dtype: torch.dtype  # of the matmuls: the inputs' own, or autocast's
    # Where the loss was called: a Function's forward always runs without grad mode, and its
    # ctx.needs_input_grad says only which inputs require a gradient.
    grad_enabled: bool
    vocab_size: int  # V: the whole vocabulary's, under vocab_parallel too
    vocab_bounds: tuple[int, ...]  # the ranks' first ids, then V: (0, V) without vocab_parallel
    vocab_parallel: VocabParallel | None
    predict: bool  # find the argmax (predicted stays NOT_PREDICTED otherwise)
    diagnose: bool  # the entropy (0 otherwise)


class ChunkLoss(NamedTuple):
    """A chunk's per-token values, and what its gradient is made from (see :meth:`_Chunks.loss`)."""

    ce: Tensor  # the cross-entropy: class weights and label smoothing included
    nll: Tensor
    z_loss: Tensor
    lse: Tensor  # logsumexp of the softmax's logits (soft-capped, divided by the temperature)
    max_logit: Tensor  # the largest of those
    entropy: Tensor | None  # of the softmax, when diagnosed
    predicted: Tensor | None  # the argmax, when predicted
    exp_shifted: Tensor  # exp(logits - row max), in the logits' buffer
    norm: Tensor  # what it is divided by to give the softmax: its row sums (exp(lse - row max))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        bias: Tensor | None,
        class_weights: Tensor | None,
        options: FusedOptions,
    ) -> tuple[Tensor, ...]:
        needs_grad = [options.grad_enabled and needed for needed in ctx.needs_input_grad[:4]]
        needs_grad_hidden, needs_grad_weight, _, needs_grad_bias = needs_grad
        with torch.autocast(hidden.device.type, enabled=False):
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])
            flat_targets = targets.reshape(-1)
            # Ignored tokens are dropped before the matmul: they cost nothing.
            kept = real_targets(flat_targets, options.ignore_index).nonzero().squeeze(1)
            all_kept = kept.numel() == flat_targets.numel()
            h = (flat_hidden if all_kept else flat_hidden[kept]).to(options.compute_dtype)
            t = flat_targets if all_kept else flat_targets[kept]
            chunks = _Chunks(h, weight.to(options.compute_dtype), t, bias, class_weights, options)

            # The gradient of a mean or sum is the upstream scalar times the one computed here, in
            # the same pass as the loss. With reduction="none" each token's upstream gradient is
            # known only in backward, which then recomputes the logits, chunk by chunk.
            defer_grads = options.reduction == "none"
            grads_now = not defer_grads and any(needs_grad)
            ce_scale, z_scale = (
                chunks.mean_scales() if options.reduction == "mean" else (h.new_ones((), dtype=chunks.acc_dtype),) * 2
            )
            values = {
                name: h.new_zeros(t.numel(), dtype=chunks.acc_dtype)
                for name in ("ce", "nll", "z_loss", "lse", "max_logit", "entropy")
            }
            predicted = torch.full_like(t, NOT_PREDICTED)
            grads = chunks.new_grads(
                *(grads_now and needed for needed in (needs_grad_hidden, needs_grad_weight, needs_grad_bias))
            )
            for rows in chunks:
                logits, dcap = chunks.logits(rows)
                chunk = chunks.loss(logits, rows)
                for name, buffer in values.items():
                    if getattr(chunk, name) is not None:
                        buffer[rows] = getattr(chunk, name)
                if chunk.predicted is not None:
                    predicted[rows] = chunk.predicted
                if grads_now:
                    scales = (ce_scale.expand_as(chunk.norm), z_scale.expand_as(chunk.norm))
                    grad_logits = chunks.grad_logits_(chunk.exp_shifted, chunk.norm, rows, chunk.lse, *scales, dcap)
                    chunks.accumulate(grad_logits, rows, grads)

            if options.reduction == "none":
                loss = _scatter(values["ce"] + values["z_loss"], kept, targets.shape, all_kept)
            else:
                loss = values["ce"].sum() * ce_scale + values["z_loss"].sum() * z_scale
            values["correct"] = (predicted == t).to(chunks.acc_dtype)
            values["predicted"] = predicted
            per_token = [
                _scatter(values[name], kept, flat_targets.shape, all_kept, NOT_PREDICTED if name == "predicted" else 0)
                for name in PER_TOKEN
            ]

        ctx.mark_non_differentiable(*per_token)
        ctx.defer_grads = defer_grads
        ctx.options = options
        ctx.meta = (hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.all_kept = all_kept
        if grads_now:
            ctx.save_for_backward(*grads, kept)
        elif defer_grads and any(needs_grad):
            ctx.save_for_backward(h, chunks.w, t, bias, class_weights, values["lse"], kept)
        return loss, *per_token

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_grad_per_token: Tensor):
        needs_grad = ctx.needs_input_grad[:4]
        hidden_shape, hidden_dtype, weight_dtype, bias_dtype = ctx.meta
        if ctx.defer_grads:
            h, w, t, bias, class_weights, lse, kept = ctx.saved_tensors
            chunks = _Chunks(h, w, t, bias, class_weights, ctx.options)
            upstream = grad_loss.reshape(-1)
            upstream = (upstream if ctx.all_kept else upstream[kept]).to(chunks.acc_dtype)
            grads = chunks.new_grads(needs_grad[0], needs_grad[1], needs_grad[3])
            with torch.autocast(grad_loss.device.type, enabled=False):
                for rows in chunks:
                    logits, dcap = chunks.logits(rows)
                    softmax = logits.sub_(lse[rows, None]).exp_()
                    norm = torch.ones_like(lse[rows])
                    grad_logits = chunks.grad_logits_(
                        softmax, norm, rows, lse[rows], upstream[rows], upstream[rows], dcap
                    )
                    chunks.accumulate(grad_logits, rows, grads)
            grad_h, grad_w, grad_b = grads
        else:
            grad_h, grad_w, grad_b, kept = ctx.saved_tensors
            # The upstream gradient of a mean or sum is almost always 1: skip a full-size copy.
            # Otherwise cast before scaling, so that a bf16 grad_h is rounded once, not twice.
            if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
                grad_h, grad_w, grad_b = (
                    None if grad is None else grad.to(dtype) * grad_loss
                    for grad, dtype in ((grad_h, hidden_dtype), (grad_w, weight_dtype), (grad_b, bias_dtype))
                )

        if grad_h is not None:
            if ctx.options.vocab_parallel is not None:
                grad_h = ctx.options.vocab_parallel.reduced_hidden_grad(grad_h)
            if not ctx.all_kept:
                rows = hidden_shape.numel() // hidden_shape[-1]
                grad_h = grad_h.new_zeros(rows, hidden_shape[-1]).index_copy_(0, kept, grad_h)
            grad_h = grad_h.reshape(hidden_shape).to(hidden_dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias_dtype)
        return grad_h, grad_w, None, grad_b, None, None


def _scatter(values: Tensor, kept: Tensor, shape: torch.Size, all_kept: bool, fill: int = 0) -> Tensor:
    """The counted rows' ``values`` back at their positions (``kept``) among all, ``fill`` at the others."""
    if all_kept:
        return values.reshape(shape)
    return values.new_full((shape.numel(),), fill).index_copy_(0, kept, values).reshape(shape)


class _Chunks:
    """The per-chunk arithmetic, shared by the forward pass and the recomputing backward pass."""

    def __init__(
        self, h: Tensor, w: Tensor, t: Tensor, bias: Tensor | None, class_weights: Tensor | None, options: FusedOptions
    ):
        self.h, self.w, self.t = h, w, t
        self.options = options
        self.chunk_size = options.chunk_size
        self.acc_dtype = loss_dtype(h.dtype)
        # in the matmuls' dtype: under autocast, F.linear adds the bias in bf16 too
        self.bias = None if bias is None else bias.to(h.dtype)
        # by token id (the targets' weights, their mean), and those of this rank's columns
        self.class_weights = None if class_weights is None else class_weights.to(self.acc_dtype)
        self.column_weights = self.class_weights
        # the targets as columns of this rank's logits, and where it holds them (None: everywhere)
        self.target_columns, self.held = t, None
        self.parallel = options.vocab_parallel
        if self.parallel is not None:
            self.target_columns, self.held = self.parallel.local_targets(t)
            if class_weights is not None:
                self.column_weights = self.class_weights[self.parallel.start : self.parallel.stop]
        # with label smoothing, the summed class weights of each rank's columns (one part without vocab_parallel)
        self.part_weights = None
        if options.label_smoothing > 0:
            self.part_weights = part_weights(options.vocab_bounds, self.class_weights, self.acc_dtype, h.device)
        # One buffer for every chunk's logits (a fresh allocation per chunk costs page faults), its rows
        # padded to whole cache lines (padded_width): a view of the first V columns.
        rows, columns = min(self.chunk_size, h.shape[0]), w.shape[0]
        padded = h.new_empty((rows, padded_width(columns, self.acc_dtype)), dtype=self.acc_dtype)
        self.buffer = padded[:, :columns]

    def __iter__(self):
        for start in range(0, self.h.shape[0], self.chunk_size):
            yield slice(start, start + self.chunk_size)

    def target_weights(self, rows: slice) -> Tensor | float:
        """The class weight of each row's target; 1 without class weights."""
        return 1.0 if self.class_weights is None else self.class_weights[self.t[rows]]

    def mean_scales(self) -> tuple[Tensor, Tensor]:
        """What a mean multiplies each token's cross-entropy and z-loss by: one over the summed
        class weights of the targets (their count without), and one over their count."""
        count = self.h.new_tensor(1.0 / max(self.t.numel(), 1), dtype=self.acc_dtype)
        if self.class_weights is None:
            return count, count
        weight_sum = self.class_weights[self.t].sum()
        return 1.0 / torch.where(weight_sum > 0, weight_sum, 1.0), count

    def new_grads(self, hidden: bool, weight: bool, bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Buffers for the gradients asked for: hidden's, and weight's and bias's accumulators (zeros)."""
        grad_h = self.h.new_empty(self.h.shape) if hidden else None
        grad_w = torch.zeros(self.w.shape, dtype=self.acc_dtype, device=self.w.device) if weight else None
        grad_b = torch.zeros(self.w.shape[0], dtype=self.acc_dtype, device=self.w.device) if bias else None
        return grad_h, grad_w, grad_b

    def logits(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        """The chunk's logits as the softmax takes them (soft-capped, divided by the temperature) in the
        accumulation dtype, and the cap's derivative."""
        h = self.h[rows]
        logits = self.buffer[: h.shape[0]]
        if h.dtype != self.acc_dtype:
            logits.copy_(h @ self.w.T if self.bias is None else torch.addmm(self.bias, h, self.w.T))
        elif self.bias is None:
            torch.mm(h, self.w.T, out=logits)
        else:
            torch.addmm(self.bias, h, self.w.T, out=logits)
        cap, temperature = self.options.softcap, self.options.temperature
        dcap = None
        if cap is not None:
            logits.div_(cap).tanh_()
            dcap = 1 - logits.square()
            logits.mul_(cap)
        if temperature != 1:
            logits.div_(temperature)
        return logits, dcap

    def loss(self, logits: Tensor, rows: slice) -> ChunkLoss:
        """Per-token cross-entropy (class weights and label smoothing), plain NLL, z-loss,
        logsumexp and argmax of a chunk's logits.

        Also ``exp(logits - max)`` (computed in place, in ``logits``' memory) and what divides it
        into the softmax, so that no second ``exp`` is needed. Under ``vocab_parallel`` the
        logits are this rank's columns, and the whole rows' numbers come from the group's.
        """
        eps, z = self.options.label_smoothing, self.options.z_loss
        target_logit = logits.gather(1, self.target_columns[rows, None]).squeeze(1)
        if self.held is not None:
            target_logit = torch.where(self.held[rows], target_logit, 0.0)
        # without vocab_parallel the argmax comes with the maximum; with it, it is asked for or not taken
        row_max, predicted = max_and_argmax(logits) if self.options.predict else (logits.amax(dim=1), None)
        weighted = exp_sums(logits, row_max, with_norm=False)[1] if self.options.diagnose else None  # the entropy's
        shifted = logits.sub_(row_max[:, None])
        # sum_j w_j (x_j - max) <= 0, before the buffer turns into exp (see losslab.losses.smoothing)
        below_max = weighted_row_sums(shifted, self.column_weights) if eps > 0 else None
        norm = shifted.exp_().sum(dim=1)
        smooth = row_entropy = None  # sum_j w_j (-log p_j); the entropy
        if self.parallel is None:
            log_norm = norm.log()
            lse = row_max + log_norm
            if eps > 0:
                smooth = smoothing_sum(log_norm, below_max, self.part_weights[0])
            if weighted is not None:
                row_entropy = entropy(log_norm, weighted)
            whole_max = row_max
        else:
            predict = self.options.predict
            stats = self.parallel.pack(row_max, norm, target_logit, below_max, weighted, predicted if predict else None)
            rank_weights = self.part_weights if eps > 0 else None
            gathered = whole(self.parallel.gather(stats), predict, rank_weights, self.options.diagnose)
            whole_max, lse, target_logit, smooth, predicted, row_entropy = gathered
            norm = (lse - row_max).exp()  # shifted / norm: the softmax over the whole vocabulary
        nll = lse - target_logit
        ce = self.target_weights(rows) * nll
        if eps > 0:
            ce = (1 - eps) * ce + (eps / self.options.vocab_size) * smooth
        return ChunkLoss(ce, nll, z * lse.square(), lse, whole_max, row_entropy, predicted, shifted, norm)

    def grad_logits_(
        self,
        shifted: Tensor,
        norm: Tensor,
        rows: slice,
        lse: Tensor,
        ce_scale: Tensor,
        z_scale: Tensor,
        dcap: Tensor | None,
    ) -> Tensor:
        """d(ce_scale * cross-entropy + z_scale * z-loss)/d(logits before the cap and the temperature),
        per row, in place of ``shifted = softmax * norm``.

        With ``p`` the softmax, ``w`` the class weights (1 without) and ``t`` the target, the
        cross-entropy's gradient is ``(1 - eps) * w[t] * (p - onehot(t)) + (eps / V) * (sum(w) * p - w)``
        and the z-loss's ``2 * z * lse * p``.
        """
        eps, z = self.options.label_smoothing, self.options.z_loss
        target_weight = self.target_weights(rows)
        mean_weight = 1.0 if self.class_weights is None else self.class_weights.mean()
        softmax_factor = ce_scale * ((1 - eps) * target_weight + eps * mean_weight) + z_scale * 2 * z * lse
        grad = shifted.mul_((softmax_factor / norm)[:, None])
        target_grad = -(1 - eps) * target_weight * ce_scale
        if self.held is not None:  # the target's column, where this rank holds it
            target_grad = torch.where(self.held[rows], target_grad, 0.0)
        grad.scatter_add_(1, self.target_columns[rows, None], target_grad[:, None])
        if eps > 0:
            vocab = self.options.vocab_size
            if self.column_weights is None:
                grad.sub_((eps / vocab) * ce_scale[:, None])
            else:
                grad.addr_(ce_scale, self.column_weights, alpha=-eps / vocab)
        if dcap is not None:
            grad.mul_(dcap)
        if self.options.temperature != 1:
            grad.div_(self.options.temperature)
        return grad

    def accumulate(
        self, grad_logits: Tensor, rows: slice, grads: tuple[Tensor | None, Tensor | None, Tensor | None]
    ) -> None:
        """Add a chunk's logits gradient into the gradients of hidden, weight and bias."""
        grad_h, grad_w, grad_b = grads
        if grad_b is not None:
            grad_b.add_(grad_logits.sum(dim=0))
        grad_logits = grad_logits.to(self.h.dtype)
        if grad_h is not None:
            torch.mm(grad_logits, self.w, out=grad_h[rows])
        if grad_w is not None:
            if grad_w.dtype == grad_logits.dtype:
                grad_w.addmm_(grad_logits.T, self.h[rows])
            else:  # bf16 matmul, float32 accumulation
                grad_w.add_(grad_logits.T @ self.h[rows])
