"""The Triton kernels of ``loss=tiled`` and their launchers; :mod:`losslab.losses.tiled` holds the math
around them and imports this module only when a tiled loss runs (it needs ``triton``).

Every kernel works on a tile of logits, ``BLOCK_N`` rows x ``BLOCK_V`` tokens of the vocabulary, computed on
chip by :func:`_logits` (a ``tl.dot`` per ``BLOCK_D`` columns of ``hidden`` and ``weight``) and never written to
memory:

- :func:`_forward_kernel`, a program per block of rows (and per part of the vocabulary, see
  :func:`vocab_splits`), loops over the vocabulary tiles and keeps, per row, the online log-sum-exp, the
  largest logit and its token (the lowest id on ties, as ``torch.argmax``), the target's logit and the
  class-weighted sum of the logits less the largest (for label smoothing: see :mod:`losslab.losses.smoothing`),
  moved as the largest moves, as the log-sum-exp is;
- the backward recomputes each tile, turns it into the gradient of the logits (:func:`_grad_logits`, from
  per-row coefficients that :mod:`losslab.losses.tiled` computes) and multiplies that into the gradients of
  ``hidden``, ``weight`` and ``bias``. Two ways, chosen by the caller (see :func:`gradients`):
  :func:`_backward_atomic_kernel`, a program per tile that adds its share with ``tl.atomic_add`` (the order
  of the additions, and so the rounding, changes from run to run), or the deterministic pair
  :func:`_grad_hidden_kernel` (a program per block of rows, looping over the vocabulary) and
  :func:`_grad_weight_kernel` (a program per vocabulary tile, looping over the rows), each the only writer
  of its part of the gradient, which recompute the logits once more.

Everything is accumulated in ``ACC`` (float32; float64 for float64 inputs); the dots take their inputs in
``DOT``, the compute dtype (bf16 under autocast: ``hidden`` and ``weight`` are cast tile by tile, so no bf16
copy of the weight is made).

The temperature divides the logits in :func:`_logits`, after the soft-cap (and the gradient in
:func:`_grad_logits`); the entropy is one more accumulator of :func:`_forward_kernel`, moved as the row
maximum moves (:mod:`losslab.losses.entropy`).

Under Triton's interpreter (``TRITON_INTERPRET=1``, for testing on a CPU) the kernels run on float32 and
float64 tensors; what it cannot run shaped them in two places: ``tanh`` is written with ``exp`` (no
libdevice), and the soft-cap, which must be exact in float64, comes as a tensor rather than a Python float
(which a kernel receives as float32).

Over 350 lines on purpose: Triton kernels and their launchers share block sizes and pointer layouts
that must agree to the letter; one file keeps each kernel beside the launcher that sizes its grid.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from losslab.losses.entropy import entropy as entropy_of
from losslab.losses.entropy import merged_exp_weighted
from losslab.losses.smoothing import merged_below_max, part_weights, smoothing_sum

TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


@triton.jit
def _tanh(x):
    # From exp, not libdevice's tanh, which the interpreter cannot run; exp(-2|x|) <= 1 never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _kahan_add(total, error, value):
    """``total + value`` and its new rounding error, with ``total``'s ``error`` (Kahan's summation)."""
    corrected = value - error
    new_total = total + corrected
    return new_total, (new_total - total) - corrected


@triton.jit
def _rows(block, n_rows, rows_ptr, targets_ptr, HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """A block of rows: their index among the counted rows, mask, row of ``hidden`` and target."""
    index = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = index < n_rows
    if HAS_ROWS:  # the counted rows are some of hidden's: their indices
        hidden_rows = tl.load(rows_ptr + index, mask=mask, other=0)
    else:
        hidden_rows = index.to(tl.int64)
    targets = tl.load(targets_ptr + index, mask=mask, other=-1)
    return index, mask, hidden_rows, targets


@triton.jit
def _columns(tile, vocab, BLOCK_V: tl.constexpr):
    """The token ids of a vocabulary tile, and which of them exist."""
    cols = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    return cols, cols < vocab


@triton.jit
def _logits(
    hidden_ptr,
    hidden_rows,
    row_mask,
    weight_ptr,
    cols,
    col_mask,
    bias_ptr,
    scales_ptr,
    dim,
    stride_hidden,
    stride_weight,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A ``(BLOCK_N, BLOCK_V)`` tile of ``softcap(hidden @ weight.T + bias) / temperature``, in ``ACC``, on chip;
    ``scales_ptr`` holds the soft-cap and the temperature."""
    logits = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for start in range(0, dim, BLOCK_D):
        ks = start + tl.arange(0, BLOCK_D)
        k_mask = ks < dim
        h = tl.load(
            hidden_ptr + hidden_rows[:, None] * stride_hidden + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + cols[:, None] * stride_weight + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        logits = tl.dot(h.to(DOT), tl.trans(w.to(DOT)), logits, input_precision=PRECISION)
    if HAS_BIAS:  # in the compute dtype, as F.linear adds it under autocast
        logits += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(DOT).to(ACC)[None, :]
    if SOFTCAP:
        softcap = tl.load(scales_ptr)
        logits = softcap * _tanh(logits / softcap)
    return logits / tl.load(scales_ptr + 1)  # exact for a temperature of 1


@triton.jit
def _forward_kernel(
    hidden_ptr,
    rows_ptr,
    weight_ptr,
    bias_ptr,
    scales_ptr,
    class_weights_ptr,
    targets_ptr,
    log_norm_ptr,
    max_ptr,
    argmax_ptr,
    target_logit_ptr,
    below_max_ptr,
    weighted_ptr,
    n_rows,
    vocab,
    dim,
    stride_hidden,
    stride_weight,
    tiles_per_split,
    HAS_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ENTROPY: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row, over the vocabulary tiles of split ``program_id(1)``: the largest logit ``m`` and its token,
    ``log(sum exp(logits - m))`` (the log-sum-exp less ``m``), the target's logit, with label smoothing
    ``sum w * (logits - m)``, ``w`` the class weights (1 without), and with ENTROPY
    ``sum exp(logits - m) * (logits - m)`` (:mod:`losslab.losses.entropy`)."""
    index, row_mask, hidden_rows, targets = _rows(tl.program_id(0), n_rows, rows_ptr, targets_ptr, HAS_ROWS, BLOCK_N)
    row_max = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)
    sum_exp = tl.zeros((BLOCK_N,), dtype=ACC)  # of exp(logits - row_max)
    argmax = tl.zeros((BLOCK_N,), dtype=tl.int64)
    target_logit = tl.zeros((BLOCK_N,), dtype=ACC)
    # sum w * (logits - row_max) <= 0 over the tiles so far: a sum of terms of one sign, added tile after tile
    # (a thousand at V=128,256), compensated (Kahan) so that it keeps its digits; and sum w over those tiles
    below_max = tl.zeros((BLOCK_N,), dtype=ACC)
    below_max_error = tl.zeros((BLOCK_N,), dtype=ACC)
    seen_weights = tl.zeros((1,), dtype=ACC)
    weighted = tl.zeros((BLOCK_N,), dtype=ACC)  # sum exp(logits - row_max) * (logits - row_max) <= 0
    first = tl.program_id(1) * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(vocab, BLOCK_V))):
        cols, col_mask = _columns(tile, vocab, BLOCK_V)
        logits = _logits(
            hidden_ptr,
            hidden_rows,
            row_mask,
            weight_ptr,
            cols,
            col_mask,
            bias_ptr,
            scales_ptr,
            dim,
            stride_hidden,
            stride_weight,
            HAS_BIAS,
            SOFTCAP,
            DOT,
            ACC,
            PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        # argmax breaks ties towards the lowest index, and an earlier tile keeps the row on a tie: the lowest id
        argmax = tl.where(tile_max > row_max, tl.argmax(logits, axis=1) + tile * BLOCK_V, argmax)
        new_max = tl.maximum(row_max, tile_max)
        if ENTROPY:  # moved to the new maximum as sum_exp is (nothing to move before the first tile), and this tile's
            delta = tl.where(sum_exp > 0, row_max - new_max, 0.0)  # not -inf * 0
            moved = tl.exp(delta) * (weighted + delta * sum_exp)
            shifted = tl.where(col_mask[None, :], logits - new_max[:, None], 0.0)
            weighted = moved + tl.sum(tl.exp(shifted) * shifted, axis=1)
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        if SMOOTHING:  # terms <= 0 only: the sum so far moved to the new maximum, and this tile's
            if WEIGHTED:
                weights = tl.load(class_weights_ptr + cols, mask=col_mask, other=0.0)
            else:
                weights = tl.where(col_mask, 1.0, 0.0).to(ACC)
            # before the first tile nothing is seen and row_max is -inf: no move (0, not -inf * 0)
            moved = tl.where(seen_weights > 0, row_max - new_max, 0.0) * seen_weights
            below = tl.where(col_mask[None, :], logits - new_max[:, None], 0.0)  # not -inf * 0 either
            below_max, below_max_error = _kahan_add(
                below_max, below_max_error, moved + tl.sum(below * weights[None, :], axis=1)
            )
            seen_weights += tl.sum(weights, axis=0)
        row_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), axis=1)
    out = tl.program_id(1) * n_rows + index
    tl.store(log_norm_ptr + out, tl.log(sum_exp), mask=row_mask)
    tl.store(max_ptr + out, row_max, mask=row_mask)
    tl.store(argmax_ptr + out, argmax, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if SMOOTHING:
        tl.store(below_max_ptr + out, below_max, mask=row_mask)
    if ENTROPY:
        tl.store(weighted_ptr + out, weighted, mask=row_mask)


@triton.jit
def _grad_logits(
    logits,
    cols,
    col_mask,
    row_mask,
    targets,
    coef_ptr,
    index,
    n_rows,
    class_weights_ptr,
    scales_ptr,
    filter_eps,
    SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    WEIGHTED: tl.constexpr,
    FILTER: tl.constexpr,
):
    """The gradient of a tile of logits (before the soft-cap and the temperature), and whether the tile matters (see FILTER).

    Per row, ``coef_ptr`` holds the log-sum-exp and three coefficients (rows of a ``(4, n_rows)`` tensor):
    ``grad = softmax_coef * softmax - target_coef * onehot(target) - smoothing_coef * class_weights``,
    times ``1 - (logits * temperature / softcap)**2`` with a soft-cap, over the temperature. With FILTER, a tile matters when a softmax value in
    it reaches ``filter_eps`` or it holds a target of its rows.
    """
    lse = tl.load(coef_ptr + index, mask=row_mask, other=0.0)
    softmax_coef = tl.load(coef_ptr + n_rows + index, mask=row_mask, other=0.0)
    target_coef = tl.load(coef_ptr + 2 * n_rows + index, mask=row_mask, other=0.0)
    probs = tl.exp(logits - lse[:, None])
    is_target = cols[None, :] == targets[:, None]
    valid = row_mask[:, None] & col_mask[None, :]
    grad = softmax_coef[:, None] * probs - tl.where(is_target, target_coef[:, None], 0.0)
    if SMOOTHING:
        smoothing_coef = tl.load(coef_ptr + 3 * n_rows + index, mask=row_mask, other=0.0)
        if WEIGHTED:
            grad -= smoothing_coef[:, None] * tl.load(class_weights_ptr + cols, mask=col_mask, other=0.0)[None, :]
        else:
            grad -= smoothing_coef[:, None]
    temperature = tl.load(scales_ptr + 1)
    if SOFTCAP:
        capped = logits * temperature / tl.load(scales_ptr)  # tanh of the logit before the cap
        grad *= 1.0 - capped * capped
    grad = tl.where(valid, grad / temperature, 0.0)
    if FILTER:
        matters = tl.max(tl.where(valid, tl.where(is_target, 1.0, probs), 0.0)) >= filter_eps
    else:
        matters = True
    return grad, matters


@triton.jit
def _backward_atomic_kernel(
    hidden_ptr,
    rows_ptr,
    weight_ptr,
    bias_ptr,
    scales_ptr,
    class_weights_ptr,
    targets_ptr,
    coef_ptr,
    grad_hidden_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    n_rows,
    vocab,
    dim,
    stride_hidden,
    stride_weight,
    filter_eps,
    HAS_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    WEIGHTED: tl.constexpr,
    FILTER: tl.constexpr,
    GRAD_HIDDEN: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A program per tile (consecutive programs share a vocabulary tile): its logits' gradient, added to
    the gradients of its rows of ``hidden`` and its tokens of ``weight`` and ``bias`` with atomics."""
    row_blocks = tl.cdiv(n_rows, BLOCK_N)
    index, row_mask, hidden_rows, targets = _rows(
        tl.program_id(0) % row_blocks, n_rows, rows_ptr, targets_ptr, HAS_ROWS, BLOCK_N
    )
    cols, col_mask = _columns(tl.program_id(0) // row_blocks, vocab, BLOCK_V)
    logits = _logits(
        hidden_ptr,
        hidden_rows,
        row_mask,
        weight_ptr,
        cols,
        col_mask,
        bias_ptr,
        scales_ptr,
        dim,
        stride_hidden,
        stride_weight,
        HAS_BIAS,
        SOFTCAP,
        DOT,
        ACC,
        PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    grad, matters = _grad_logits(
        logits,
        cols,
        col_mask,
        row_mask,
        targets,
        coef_ptr,
        index,
        n_rows,
        class_weights_ptr,
        scales_ptr,
        filter_eps,
        SOFTCAP,
        SMOOTHING,
        WEIGHTED,
        FILTER,
    )
    if matters:
        if GRAD_BIAS:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, axis=0), mask=col_mask)
        grad_dot = grad.to(DOT)
        for start in range(0, dim, BLOCK_D):
            ks = start + tl.arange(0, BLOCK_D)
            k_mask = ks < dim
            if GRAD_HIDDEN:
                w = tl.load(
                    weight_ptr + cols[:, None] * stride_weight + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                part = tl.dot(grad_dot, w.to(DOT), tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC), input_precision=PRECISION)
                tl.atomic_add(
                    grad_hidden_ptr + hidden_rows[:, None] * dim + ks[None, :],
                    part,
                    mask=row_mask[:, None] & k_mask[None, :],
                )
            if GRAD_WEIGHT:
                h = tl.load(
                    hidden_ptr + hidden_rows[:, None] * stride_hidden + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                part = tl.dot(
                    tl.trans(grad_dot), h.to(DOT), tl.zeros((BLOCK_V, BLOCK_D), dtype=ACC), input_precision=PRECISION
                )
                tl.atomic_add(
                    grad_weight_ptr + cols[:, None] * dim + ks[None, :], part, mask=col_mask[:, None] & k_mask[None, :]
                )


@triton.jit
def _grad_hidden_kernel(
    hidden_ptr,
    rows_ptr,
    weight_ptr,
    bias_ptr,
    scales_ptr,
    class_weights_ptr,
    targets_ptr,
    coef_ptr,
    grad_hidden_ptr,
    n_rows,
    vocab,
    dim,
    stride_hidden,
    stride_weight,
    filter_eps,
    HAS_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    WEIGHTED: tl.constexpr,
    FILTER: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A program per block of rows, the only one to write their gradient: it adds each vocabulary tile's
    share in turn, in the same order every run."""
    index, row_mask, hidden_rows, targets = _rows(tl.program_id(0), n_rows, rows_ptr, targets_ptr, HAS_ROWS, BLOCK_N)
    for tile in range(0, tl.cdiv(vocab, BLOCK_V)):
        cols, col_mask = _columns(tile, vocab, BLOCK_V)
        logits = _logits(
            hidden_ptr,
            hidden_rows,
            row_mask,
            weight_ptr,
            cols,
            col_mask,
            bias_ptr,
            scales_ptr,
            dim,
            stride_hidden,
            stride_weight,
            HAS_BIAS,
            SOFTCAP,
            DOT,
            ACC,
            PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        grad, matters = _grad_logits(
            logits,
            cols,
            col_mask,
            row_mask,
            targets,
            coef_ptr,
            index,
            n_rows,
            class_weights_ptr,
            scales_ptr,
            filter_eps,
            SOFTCAP,
            SMOOTHING,
            WEIGHTED,
            FILTER,
        )
        if matters:
            grad_dot = grad.to(DOT)
            for start in range(0, dim, BLOCK_D):
                ks = start + tl.arange(0, BLOCK_D)
                k_mask = ks < dim
                mask = row_mask[:, None] & k_mask[None, :]
                ptrs = grad_hidden_ptr + hidden_rows[:, None] * dim + ks[None, :]
                w = tl.load(
                    weight_ptr + cols[:, None] * stride_weight + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                tl.store(
                    ptrs, tl.dot(grad_dot, w.to(DOT), tl.load(ptrs, mask=mask), input_precision=PRECISION), mask=mask
                )
        # the next tile reads what this one stored, maybe in other threads of the program
        tl.debug_barrier()


@triton.jit
def _grad_weight_kernel(
    hidden_ptr,
    rows_ptr,
    weight_ptr,
    bias_ptr,
    scales_ptr,
    class_weights_ptr,
    targets_ptr,
    coef_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    n_rows,
    vocab,
    dim,
    stride_hidden,
    stride_weight,
    filter_eps,
    HAS_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    WEIGHTED: tl.constexpr,
    FILTER: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A program per vocabulary tile, the only one to write its tokens' gradients: it adds each block of
    rows' share in turn, in the same order every run."""
    cols, col_mask = _columns(tl.program_id(0), vocab, BLOCK_V)
    grad_bias = tl.zeros((BLOCK_V,), dtype=ACC)
    for block in range(0, tl.cdiv(n_rows, BLOCK_N)):
        index, row_mask, hidden_rows, targets = _rows(block, n_rows, rows_ptr, targets_ptr, HAS_ROWS, BLOCK_N)
        logits = _logits(
            hidden_ptr,
            hidden_rows,
            row_mask,
            weight_ptr,
            cols,
            col_mask,
            bias_ptr,
            scales_ptr,
            dim,
            stride_hidden,
            stride_weight,
            HAS_BIAS,
            SOFTCAP,
            DOT,
            ACC,
            PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        grad, matters = _grad_logits(
            logits,
            cols,
            col_mask,
            row_mask,
            targets,
            coef_ptr,
            index,
            n_rows,
            class_weights_ptr,
            scales_ptr,
            filter_eps,
            SOFTCAP,
            SMOOTHING,
            WEIGHTED,
            FILTER,
        )
        if matters:
            if GRAD_BIAS:
                grad_bias += tl.sum(grad, axis=0)
            if GRAD_WEIGHT:
                grad_dot = grad.to(DOT)
                for start in range(0, dim, BLOCK_D):
                    ks = start + tl.arange(0, BLOCK_D)
                    k_mask = ks < dim
                    mask = col_mask[:, None] & k_mask[None, :]
                    ptrs = grad_weight_ptr + cols[:, None] * dim + ks[None, :]
                    h = tl.load(
                        hidden_ptr + hidden_rows[:, None] * stride_hidden + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                    part = tl.dot(tl.trans(grad_dot), h.to(DOT), tl.load(ptrs, mask=mask), input_precision=PRECISION)
                    tl.store(ptrs, part, mask=mask)
        tl.debug_barrier()  # as in _grad_hidden_kernel
    if GRAD_BIAS:
        tl.store(grad_bias_ptr + cols, grad_bias, mask=col_mask)


# ----------------------------------------------------------------------------- launchers


class Problem(NamedTuple):
    """What every kernel reads: the counted rows and their targets, the LM head, the options."""

    hidden: Tensor  # (rows, d), unit stride along d
    rows: Tensor | None  # the counted rows of hidden (int64), None: all of them
    weight: Tensor  # (V, d), unit stride along d
    bias: Tensor | None  # (V,)
    targets: Tensor  # (n,) of the counted rows
    class_weights: Tensor | None  # (V,) in the accumulation dtype
    softcap: float | None
    dot_dtype: torch.dtype  # of the dots' inputs: the compute dtype
    acc_dtype: torch.dtype  # float32, or float64
    temperature: float = 1.0

    @property
    def n_rows(self) -> int:
        return self.targets.numel()


class Blocks(NamedTuple):
    rows: int
    vocab: int
    dim: int


# The interpreter holds a tile as NumPy arrays: large problems (beyond testing) take tiles of these sizes.
INTERPRETER_MAX_BLOCKS = Blocks(128, 32768, 128)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
    return isinstance(_forward_kernel, InterpretedFunction)


def blocks(problem: Problem) -> Blocks:
    """Tile sizes. On a GPU by the compute dtype (16-bit dots take wider tiles for the same shared memory;
    untuned: see the README). In the interpreter, whose cost is per step of a kernel: about half the rows and
    the depth and a quarter of the vocabulary (16 at least, as tl.dot needs on a GPU; at most
    ``INTERPRETER_MAX_BLOCKS``), so that a small problem still crosses two blocks of rows and of depth and
    four vocabulary tiles (two per part of the forward's, see :func:`vocab_splits`), the last of each
    partial unless its size is a power of two."""
    if interpreted():
        sizes = (
            triton.cdiv(problem.n_rows, 2),
            triton.cdiv(problem.weight.shape[0], 4),
            triton.cdiv(problem.hidden.shape[1], 2),
        )
        return Blocks(
            *(min(cap, max(16, triton.next_power_of_2(size))) for size, cap in zip(sizes, INTERPRETER_MAX_BLOCKS))
        )
    if problem.dot_dtype == torch.float64:
        return Blocks(32, 64, 32)
    if problem.dot_dtype == torch.float32:
        return Blocks(64, 128, 32)
    return Blocks(64, 128, 64)


def num_warps(block: Blocks) -> int:
    """Warps per program: 8 for tiles of 64 x 128 logits and more (their accumulators fill 4 warps' registers)."""
    return 8 if block.rows * block.vocab >= 64 * 128 else 4


def vocab_splits(problem: Problem, block: Blocks) -> tuple[int, int]:
    """How many parts of the vocabulary the forward pass gives separate programs, and the tiles per part.

    A program per block of rows alone would leave most of a GPU idle for a few thousand rows (8,192 rows
    make 128 programs); parts of the vocabulary, merged afterwards (in a fixed order), give at least two
    programs per multiprocessor. The interpreter takes two parts, to test the merge."""
    tiles = triton.cdiv(problem.weight.shape[0], block.vocab)
    row_blocks = triton.cdiv(problem.n_rows, block.rows)
    if interpreted():
        wanted = 2
    else:
        wanted = triton.cdiv(
            2 * torch.cuda.get_device_properties(problem.hidden.device).multi_processor_count, row_blocks
        )
    per_split = triton.cdiv(tiles, max(1, min(wanted, tiles)))
    return triton.cdiv(tiles, per_split), per_split


def precision(dot_dtype: torch.dtype) -> str:
    """float32 dots as torch's own matmuls would be: TF32 only where torch allows it (``ieee`` by default)."""
    if dot_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def common_arguments(problem: Problem) -> tuple[list, dict]:
    """The kernels' shared leading arguments and constexprs, and the launch options."""
    scales = [1.0 if problem.softcap is None else problem.softcap, problem.temperature]
    scales = torch.tensor(scales, dtype=problem.acc_dtype)  # a tensor: a float64 run needs them exact
    block = blocks(problem)
    pointers = [
        problem.hidden,
        problem.rows,
        problem.weight,
        problem.bias,
        scales.to(problem.hidden.device),
        problem.class_weights,
        problem.targets,
    ]
    constexprs = dict(
        HAS_ROWS=problem.rows is not None,
        HAS_BIAS=problem.bias is not None,
        SOFTCAP=problem.softcap is not None,
        WEIGHTED=problem.class_weights is not None,
        DOT=TRITON_DTYPES[problem.dot_dtype],
        ACC=TRITON_DTYPES[problem.acc_dtype],
        PRECISION=precision(problem.dot_dtype),
        BLOCK_N=block.rows,
        BLOCK_V=block.vocab,
        BLOCK_D=block.dim,
        num_warps=num_warps(block),
    )
    return pointers, constexprs


def sizes(problem: Problem) -> list[int]:
    return [
        problem.n_rows,
        problem.weight.shape[0],
        problem.hidden.shape[1],
        problem.hidden.stride(0),
        problem.weight.stride(0),
    ]


class RowStatistics(NamedTuple):
    """What the forward pass gives per counted row, in the accumulation dtype (``predicted``: int64)."""

    lse: Tensor  # log-sum-exp of the softmax's logits (soft-capped, divided by the temperature)
    target_logit: Tensor
    smooth: Tensor | None  # sum_j w_j * (-log p_j), w the class weights (1 without), with smoothing
    predicted: Tensor  # the argmax, the lowest id on ties
    max_logit: Tensor
    entropy: Tensor | None  # of the softmax, with entropy


def row_statistics(problem: Problem, smoothing: bool, entropy: bool) -> RowStatistics:
    """Run the forward kernel; each part of the vocabulary gives its own values, merged here."""
    pointers, constexprs = common_arguments(problem)
    block = blocks(problem)
    splits, per_split = vocab_splits(problem, block)
    device = problem.hidden.device
    parts = torch.empty((5, splits, problem.n_rows), dtype=problem.acc_dtype, device=device)
    log_norm, part_max, target_logit, below_max, weighted = parts
    argmax = torch.empty((splits, problem.n_rows), dtype=torch.int64, device=device)
    grid = (triton.cdiv(problem.n_rows, block.rows), splits)
    _forward_kernel[grid](
        *pointers,
        log_norm,
        part_max,
        argmax,
        target_logit,
        below_max,
        weighted,
        *sizes(problem),
        per_split,
        SMOOTHING=smoothing,
        ENTROPY=entropy,
        **constexprs,
    )
    # The first part holding the largest logit: the lowest id (torch.max gives the first maximum).
    row_max, best = part_max.max(dim=0)
    lse = torch.logsumexp(part_max + log_norm, dim=0)
    whole_log_norm = torch.logsumexp(part_max - row_max + log_norm, dim=0)
    smooth = row_entropy = None
    if smoothing:  # from the parts' sums relative to their own maxima: see losslab.losses.smoothing
        vocab = problem.weight.shape[0]
        bounds = [min(split * per_split * block.vocab, vocab) for split in range(splits)] + [vocab]
        weights = part_weights(bounds, problem.class_weights, problem.acc_dtype, device)
        smooth = smoothing_sum(whole_log_norm, merged_below_max(part_max, below_max, weights, row_max), weights.sum())
    if entropy:  # likewise: see losslab.losses.entropy
        merged = merged_exp_weighted(part_max, log_norm.exp(), weighted, row_max)
        row_entropy = entropy_of(whole_log_norm, merged)
    predicted = argmax.gather(0, best[None]).squeeze(0)
    return RowStatistics(lse, target_logit.sum(dim=0), smooth, predicted, row_max, row_entropy)


def gradients(
    problem: Problem,
    coefficients: Tensor,
    needs: tuple[bool, bool, bool],
    *,
    deterministic: bool,
    filter_eps: float | None,
    smoothing: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of hidden (all its rows), weight and bias asked for by ``needs``, in the accumulation dtype.

    ``coefficients`` ``(4, n)``: per counted row the log-sum-exp and the coefficients of
    :func:`_grad_logits`. ``deterministic`` takes the two kernels that each own what they write (the
    same bits every run, one more pass over the logits) rather than the one with atomics.
    """
    need_hidden, need_weight, need_bias = needs
    device, acc = problem.hidden.device, problem.acc_dtype
    grad_hidden = torch.zeros(problem.hidden.shape, dtype=acc, device=device) if need_hidden else None
    grad_weight = torch.zeros(problem.weight.shape, dtype=acc, device=device) if need_weight else None
    grad_bias = torch.zeros(problem.weight.shape[0], dtype=acc, device=device) if need_bias else None
    if problem.n_rows == 0:  # every target ignored
        return grad_hidden, grad_weight, grad_bias
    pointers, constexprs = common_arguments(problem)
    block = blocks(problem)
    row_blocks = triton.cdiv(problem.n_rows, block.rows)
    tiles = triton.cdiv(problem.weight.shape[0], block.vocab)
    options = dict(SMOOTHING=smoothing, FILTER=filter_eps is not None, **constexprs)
    arguments = [*sizes(problem), math.nan if filter_eps is None else filter_eps]
    if not deterministic:
        _backward_atomic_kernel[(row_blocks * tiles,)](
            *pointers,
            coefficients,
            grad_hidden,
            grad_weight,
            grad_bias,
            *arguments,
            GRAD_HIDDEN=need_hidden,
            GRAD_WEIGHT=need_weight,
            GRAD_BIAS=need_bias,
            **options,
        )
        return grad_hidden, grad_weight, grad_bias
    if need_hidden:
        _grad_hidden_kernel[(row_blocks,)](*pointers, coefficients, grad_hidden, *arguments, **options)
    if need_weight or need_bias:
        _grad_weight_kernel[(tiles,)](
            *pointers,
            coefficients,
            grad_weight,
            grad_bias,
            *arguments,
            GRAD_WEIGHT=need_weight,
            GRAD_BIAS=need_bias,
            **options,
        )
    return grad_hidden, grad_weight, grad_bias
