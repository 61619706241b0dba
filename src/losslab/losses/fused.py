"""``fused``: the LM head matmul and cross-entropy together, one chunk of tokens at a time.

The full ``(tokens, V)`` logits are never materialised: for each chunk of tokens we compute the
chunk's logits, their log-sum-exp (in float32, also under bf16 autocast), the loss and, when a
gradient is needed, the gradient of the logits, which goes straight into the gradients of
``hidden`` and ``weight`` (the latter accumulated in float32). Peak memory is one chunk's logits
instead of all of them, and the time is that of the three matmuls any implementation needs.

For ``reduction="mean"`` or ``"sum"`` the gradients are computed during the forward pass (the
upstream gradient is a scalar that only rescales them); for ``"none"`` the per-token upstream
gradient is only known in backward, which then recomputes each chunk's logits (one more matmul).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from losslab.losses.base import TokenLoss, loss_dtype
from losslab.targets import real_targets

# One chunk's float32 logits take about this many bytes; see default_chunk_size.
CHUNK_LOGITS_BYTES = 128 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk: a power of two whose float32 logits fill about CHUNK_LOGITS_BYTES.

    Large enough for efficient matmuls and few passes over the weight gradient, small enough
    that the chunk's logits stay a small fraction of the full ones (128 MiB: 512 rows at
    V=50257, 256 at V=128256).
    """
    rows = max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))
    return 1 << (rows.bit_length() - 1)


class FusedLinearCrossEntropyLoss(TokenLoss):
    """Linear + cross-entropy in token chunks; same options and results as the other losses.

    Args:
        chunk_size: tokens per chunk; ``None`` picks :func:`default_chunk_size` of V.
        **options: see :class:`losslab.losses.base.TokenLoss`.
    """

    name = "fused"

    def __init__(self, chunk_size: int | None = None, **options) -> None:
        super().__init__(**options)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1, or None for automatic")
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor):
        self.validate(hidden, weight, targets)
        device_type = hidden.device.type
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        # Autocast runs matmuls in its dtype, except float64 ones, which it leaves alone.
        if torch.is_autocast_enabled(device_type) and compute_dtype != torch.float64:
            compute_dtype = torch.get_autocast_dtype(device_type)
        options = FusedOptions(
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size or default_chunk_size(weight.shape[0]),
            compute_dtype=compute_dtype,
            grad_enabled=torch.is_grad_enabled(),
        )
        loss, nll, z_loss = _FusedLinearCrossEntropy.apply(hidden, weight, targets, options)
        return self.finish(loss, nll, z_loss)


@dataclass(frozen=True)
class FusedOptions:
    """Everything but the tensors that :class:`_FusedLinearCrossEntropy` needs, as one value."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    chunk_size: int
    compute_dtype: torch.dtype  # of the matmuls: the inputs' own, or autocast's
    # Where the loss was called: a Function's forward always runs without grad mode, and its
    # ctx.needs_input_grad says only which inputs require a gradient.
    grad_enabled: bool


class ChunkLoss(NamedTuple):
    """A chunk's per-token values, and what its gradient is made from (see :meth:`_Chunks.loss`)."""

    loss: Tensor  # label smoothing and z-loss included
    nll: Tensor
    z_loss: Tensor
    lse: Tensor  # logsumexp of the (soft-capped) logits
    exp_shifted: Tensor  # exp(logits - row max), in the logits' buffer
    norm: Tensor  # its row sums


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, options: FusedOptions
    ) -> tuple[Tensor, Tensor, Tensor]:
        needs_grad_hidden, needs_grad_weight = (options.grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        with torch.autocast(hidden.device.type, enabled=False):
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])
            flat_targets = targets.reshape(-1)
            # Ignored tokens are dropped before the matmul: they cost nothing.
            kept = real_targets(flat_targets, options.ignore_index).nonzero().squeeze(1)
            all_kept = kept.numel() == flat_targets.numel()
            h = (flat_hidden if all_kept else flat_hidden[kept]).to(options.compute_dtype)
            t = flat_targets if all_kept else flat_targets[kept]
            w = weight.to(options.compute_dtype)
            n = kept.numel()

            # The gradient of a mean or sum is the upstream scalar times the one computed here, in
            # the same pass as the loss. With reduction="none" each token's upstream gradient is
            # known only in backward, which then recomputes the logits, chunk by chunk.
            defer_grads = options.reduction == "none"
            grads_now = not defer_grads and (needs_grad_hidden or needs_grad_weight)
            row_scale = 1.0 / max(n, 1) if options.reduction == "mean" else 1.0
            chunks = _Chunks(h, w, t, options)
            per_token = {name: h.new_empty(n, dtype=chunks.acc_dtype) for name in ("loss", "nll", "z_loss", "lse")}
            grad_h, grad_w = chunks.new_grads(grads_now and needs_grad_hidden, grads_now and needs_grad_weight)
            for rows in chunks:
                logits, dcap = chunks.logits(rows)
                chunk = chunks.loss(logits, rows)
                for name, values in per_token.items():
                    values[rows] = getattr(chunk, name)
                if grads_now:
                    scale = torch.full_like(chunk.norm, row_scale)
                    grad_logits = chunks.grad_logits_(chunk.exp_shifted, chunk.norm, rows, chunk.lse, scale, dcap)
                    chunks.accumulate(grad_logits, rows, grad_h, grad_w)

            totals = (per_token["loss"], per_token["nll"], per_token["z_loss"])
            if options.reduction == "none":
                loss, nll, z_loss = (_scatter(values, kept, targets.shape, all_kept) for values in totals)
            else:
                divisor = max(n, 1) if options.reduction == "mean" else 1
                loss, nll, z_loss = (values.sum() / divisor for values in totals)

        ctx.mark_non_differentiable(nll, z_loss)
        ctx.defer_grads = defer_grads
        ctx.options = options
        ctx.hidden_meta = (hidden.shape, hidden.dtype, weight.dtype)
        ctx.all_kept = all_kept
        if grads_now:
            ctx.save_for_backward(grad_h, grad_w, kept)
        elif defer_grads and (needs_grad_hidden or needs_grad_weight):
            ctx.save_for_backward(h, w, t, per_token["lse"], kept)
        return loss, nll, z_loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor, _grad_z_loss: Tensor):
        needs_grad_hidden, needs_grad_weight = ctx.needs_input_grad[:2]
        hidden_shape, hidden_dtype, weight_dtype = ctx.hidden_meta
        if ctx.defer_grads:
            h, w, t, lse, kept = ctx.saved_tensors
            chunks = _Chunks(h, w, t, ctx.options)
            upstream = grad_loss.reshape(-1)
            upstream = (upstream if ctx.all_kept else upstream[kept]).to(chunks.acc_dtype)
            grad_h, grad_w = chunks.new_grads(needs_grad_hidden, needs_grad_weight)
            with torch.autocast(grad_loss.device.type, enabled=False):
                for rows in chunks:
                    logits, dcap = chunks.logits(rows)
                    softmax = logits.sub_(lse[rows, None]).exp_()
                    norm = torch.ones_like(lse[rows])
                    grad_logits = chunks.grad_logits_(softmax, norm, rows, lse[rows], upstream[rows], dcap)
                    chunks.accumulate(grad_logits, rows, grad_h, grad_w)
        else:
            grad_h, grad_w, kept = ctx.saved_tensors
            # The upstream gradient of a mean or sum is almost always 1: skip a full-size copy.
            # Otherwise cast before scaling, so that a bf16 grad_h is rounded once, not twice.
            if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
                if grad_h is not None:
                    grad_h = grad_h.to(hidden_dtype) * grad_loss
                if grad_w is not None:
                    grad_w = grad_w.to(weight_dtype) * grad_loss

        if grad_h is not None:
            if not ctx.all_kept:
                rows = hidden_shape.numel() // hidden_shape[-1]
                grad_h = grad_h.new_zeros(rows, hidden_shape[-1]).index_copy_(0, kept, grad_h)
            grad_h = grad_h.reshape(hidden_shape).to(hidden_dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight_dtype)
        return grad_h, grad_w, None, None


def _scatter(values: Tensor, kept: Tensor, shape: torch.Size, all_kept: bool) -> Tensor:
    if all_kept:
        return values.reshape(shape)
    return values.new_zeros(shape.numel()).index_copy_(0, kept, values).reshape(shape)


class _Chunks:
    """The per-chunk arithmetic, shared by the forward pass and the recomputing backward pass."""

    def __init__(self, h: Tensor, w: Tensor, t: Tensor, options: FusedOptions):
        self.h, self.w, self.t = h, w, t
        self.options = options
        self.chunk_size = options.chunk_size
        self.acc_dtype = loss_dtype(h.dtype)
        # One buffer for every chunk's logits: a fresh allocation per chunk costs page faults.
        rows = min(self.chunk_size, h.shape[0])
        self.buffer = h.new_empty((rows, w.shape[0]), dtype=self.acc_dtype)

    def __iter__(self):
        for start in range(0, self.h.shape[0], self.chunk_size):
            yield slice(start, start + self.chunk_size)

    def new_grads(self, hidden: bool, weight: bool) -> tuple[Tensor | None, Tensor | None]:
        """Buffers for the gradients asked for: hidden's, and weight's accumulator (zeros)."""
        grad_h = self.h.new_empty(self.h.shape) if hidden else None
        grad_w = torch.zeros(self.w.shape, dtype=self.acc_dtype, device=self.w.device) if weight else None
        return grad_h, grad_w

    def logits(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        """The chunk's (soft-capped) logits in the accumulation dtype, and the cap's derivative."""
        h = self.h[rows]
        logits = self.buffer[: h.shape[0]]
        if h.dtype == self.acc_dtype:
            torch.mm(h, self.w.T, out=logits)
        else:
            logits.copy_(h @ self.w.T)
        cap = self.options.softcap
        if cap is None:
            return logits, None
        logits.div_(cap).tanh_()
        dcap = 1 - logits.square()
        return logits.mul_(cap), dcap

    def loss(self, logits: Tensor, rows: slice) -> ChunkLoss:
        """Per-token loss (label smoothing and z-loss included), plain NLL, z-loss and logsumexp
        of a chunk's logits.

        Also ``exp(logits - max)`` (computed in place, in ``logits``' memory) and its row sums,
        from which the softmax follows without a second ``exp``.
        """
        eps, z = self.options.label_smoothing, self.options.z_loss
        target_logit = logits.gather(1, self.t[rows, None]).squeeze(1)
        mean_logit = logits.mean(dim=1) if eps > 0 else None
        row_max = logits.amax(dim=1)
        shifted = logits.sub_(row_max[:, None]).exp_()
        norm = shifted.sum(dim=1)
        lse = row_max + norm.log()
        nll = lse - target_logit
        loss = nll if eps == 0 else (1 - eps) * nll + eps * (lse - mean_logit)
        z_term = z * lse.square()
        return ChunkLoss(loss + z_term, nll, z_term, lse, shifted, norm)

    def grad_logits_(
        self, shifted: Tensor, norm: Tensor, rows: slice, lse: Tensor, scale: Tensor, dcap: Tensor | None
    ) -> Tensor:
        """d(scale * token loss)/d(logits before the cap), in place of ``shifted = softmax * norm``."""
        eps, z = self.options.label_smoothing, self.options.z_loss
        grad = shifted.mul_((scale * (1 + 2 * z * lse) / norm)[:, None])
        targets = self.t[rows, None]
        grad.scatter_add_(1, targets, -(1 - eps) * scale[:, None])
        if eps > 0:
            grad.sub_((eps / grad.shape[1]) * scale[:, None])
        if dcap is not None:
            grad.mul_(dcap)
        return grad

    def accumulate(self, grad_logits: Tensor, rows: slice, grad_h: Tensor | None, grad_w: Tensor | None) -> None:
        grad_logits = grad_logits.to(self.h.dtype)
        if grad_h is not None:
            torch.mm(grad_logits, self.w, out=grad_h[rows])
        if grad_w is not None:
            if grad_w.dtype == grad_logits.dtype:
                grad_w.addmm_(grad_logits.T, self.h[rows])
            else:  # bf16 matmul, float32 accumulation
                grad_w.add_(grad_logits.T @ self.h[rows])
