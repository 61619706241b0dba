"""The predictive entropy of a row of logits, from the values its log-sum-exp is made of.

With ``m`` the row's largest logit, ``S = sum_j exp(x_j - m)`` (so that ``lse = m + log S``) and
``A = sum_j exp(x_j - m) * (x_j - m)``, the entropy of ``p = softmax(x)`` is

    H = -sum_j p_j log p_j = lse - sum_j p_j x_j = log S - A / S,

two terms >= 0 (``A <= 0``): nothing cancels, and no ``log p_j`` of a tiny ``p_j`` is taken. ``A`` is one more
sum beside ``S``, which is why the losses that never hold a row's logits whole (``fused``'s chunks of rows,
``tiled``'s vocabulary tiles, ``vocab_parallel``'s ranks) get the entropy without them: a part of the row gives its
own ``(m_r, S_r, A_r)``, and :func:`merged_exp_weighted` moves them to the row's maximum ``M``,
``A = sum_r exp(m_r - M) * (A_r + (m_r - M) * S_r)``, as the log-sum-exp of log-sum-exps moves the ``S_r``.
"""

from __future__ import annotations

from torch import Tensor

# exp_sums' temporaries hold about this many values (2 MiB of float32) at a time: its two stay in the
# CPU's cache. At 4,096 x 50,257 and 2 threads, 190 ms a pass where 2**22 (16 MiB) took 270.
BLOCK_VALUES = 2**19


def exp_sums(logits: Tensor, row_max: Tensor, with_norm: bool = True) -> tuple[Tensor | None, Tensor]:
    """``S`` and ``A`` per row of ``logits (rows, V)``, ``m`` its ``row_max``: ``sum_j exp(x_j - m)`` and
    ``sum_j exp(x_j - m) * (x_j - m)``; the row's log-sum-exp is ``m + log S``. ``S`` is ``None`` without
    ``with_norm`` (for a loss that takes it anyway, with its gradient).

    Taken a block of rows at a time, so that its temporaries stay small beside the logits (a loss
    that holds a chunk of them adds no chunk-sized buffer), and in one pass: ``torch.logsumexp`` beside
    it would write a temporary as large as the logits (at 4,096 x 50,257 on a CPU, 0.73-0.77 s for the
    two where this takes 0.18-0.22 s, the values the same)."""
    rows = max(1, BLOCK_VALUES // max(1, logits.shape[-1]))
    norm = logits.new_empty(logits.shape[0]) if with_norm else None
    weighted = logits.new_empty(logits.shape[0])
    for start in range(0, logits.shape[0], rows):
        shifted = logits[start : start + rows] - row_max[start : start + rows, None]
        exp = shifted.exp()
        if with_norm:
            norm[start : start + rows] = exp.sum(dim=-1)
        weighted[start : start + rows] = exp.mul_(shifted).sum(dim=-1)
    return norm, weighted


def merged_exp_weighted(part_max: Tensor, part_sumexp: Tensor, part_weighted: Tensor, row_max: Tensor) -> Tensor:
    """A row's ``A`` relative to ``row_max`` from its parts' (along dim 0), each relative to its own ``part_max``."""
    scale = (part_max - row_max).exp()
    return (scale * (part_weighted + (part_max - row_max) * part_sumexp)).sum(dim=0)


def entropy(log_norm: Tensor, weighted: Tensor) -> Tensor:
    """``H = log S - A / S`` from ``log_norm = log S`` (the log-sum-exp less the row maximum) and ``weighted = A``."""
    return log_norm - weighted * (-log_norm).exp()
