"""Label smoothing's sum over the vocabulary, to the last digits.

With label smoothing a token's loss holds ``sum_j w_j * (-log p_j) = sum_j w_j * (lse - x_j)``, with ``w`` the
class weights (1 without), ``x`` the logits and ``lse`` their log-sum-exp. Written as ``W * lse - sum_j w_j x_j``
(``W = sum(w)``) it cancels: logits that share an offset ``c`` make both terms about ``W * c``, and the digits
lost in adding V logits of one sign show in their difference (``fused`` used up to 4.8 times Liger-Kernel's
float32 bound so, at V=32000 with logits offset by -30 to -100). Relative to the row's largest logit ``m`` nothing cancels:

    sum_j w_j * (lse - x_j) = W * (lse - m) - sum_j w_j * (x_j - m),

both terms >= 0, and ``lse - m = log(sum_j exp(x_j - m))`` comes from the log-sum-exp without its rounding.

- :func:`weighted_row_sums` takes the sum of the ``w_j * (x_j - m)``, V terms <= 0: as ``mean(w) * sum_j (x_j - m)
  + sum_j (w_j - mean(w)) * (x_j - m)``. A float32 matrix-vector product adds its terms nearly in sequence, and
  adding V of one sign loses digits (1e-6 of the sum at V=32000); ``sum`` adds them pairwise, and the weights less
  their mean have both signs, so that the product's partial sums stay small (1e-7).
- Where a row comes in parts (the ranks of ``vocab_parallel``, the vocabulary parts of ``tiled``), each part gives
  its sum relative to its own maximum ``m_r``, and :func:`merged_below_max` moves them to the row's ``M``:
  ``sum_r [S_r + (m_r - M) * W_r]``, all terms <= 0, with ``W_r`` the part's summed class weights
  (:func:`part_weights`).
- :func:`smoothing_sum` is then ``W * (lse - m) - sum_j w_j * (x_j - m)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def weighted_row_sums(values: Tensor, weights: Tensor | None) -> Tensor:
    """``sum_j weights[j] * values[..., j]`` (``weights`` ``None``: all 1), to the last digits when the values
    share a sign: ``mean(w) * sum(values) + values @ (w - mean(w))`` (see the module)."""
    if weights is None:
        return values.sum(dim=-1)
    centre = weights.mean()
    return centre * values.sum(dim=-1) + values @ (weights - centre)


def part_weights(
    bounds: Sequence[int], class_weights: Tensor | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``W_r``: the summed class weights of each part ``[bounds[r], bounds[r + 1])`` of the vocabulary (its
    number of tokens without class weights)."""
    parts = list(zip(bounds, bounds[1:]))
    if class_weights is None:
        return torch.tensor([stop - start for start, stop in parts], dtype=dtype, device=device)
    return torch.stack([class_weights[start:stop].sum(dtype=dtype) for start, stop in parts]).to(device)


def merged_below_max(part_max: Tensor, part_below: Tensor, weights: Tensor, row_max: Tensor) -> Tensor:
    """A row's ``sum_j w_j * (x_j - M)`` from its parts' (along dim 0): ``part_below[r] = sum_{j in r} w_j * (x_j -
    part_max[r])``, ``weights`` their :func:`part_weights` and ``row_max`` ``M``, the largest ``part_max``."""
    return (part_below + (part_max - row_max) * weights[:, None]).sum(dim=0)


def smoothing_sum(log_norm: Tensor, below_max: Tensor, weight_sum: Tensor | float) -> Tensor:
    """``sum_j w_j * (-log p_j)`` per row from ``log_norm = lse - m`` (``log(sum_j exp(x_j - m))``), ``below_max =
    sum_j w_j * (x_j - m)`` and ``weight_sum = sum_j w_j``: two terms >= 0, nothing cancels."""
    return weight_sum * log_norm - below_max
