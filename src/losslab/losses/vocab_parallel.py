"""Vocabulary parallelism: the loss over the whole vocabulary from an LM head sharded by rows.

With ``vocab_parallel=VocabParallel(start, stop, group)`` the ``fused``, ``cross_entropy`` and
``logsumexp`` losses take ``weight`` (and ``bias``) as this rank's rows ``[start, stop)`` of the LM
head; ``hidden``, ``targets`` (global token ids) and ``class_weights`` (the full ``(V,)`` vector)
are the same on every rank of ``group``, and so is every result: the unsharded loss's, its
:class:`~losslab.losses.base.LossParts` included (the argmax over the whole vocabulary, ties to the
lowest id as ``torch.argmax``). Each rank gets its rows' gradient, and the hidden states' gradient
summed over the group, or, with ``reduce_hidden_grad=False``, its own part of that sum, for a
caller that reduces it itself.

Each rank reduces its own columns of a row of logits to a few numbers (:data:`MAX`, :data:`SUMEXP`,
:data:`TARGET`, then :data:`SMOOTH`, :data:`WEIGHTED` and :data:`ARGMAX` where asked: :meth:`VocabParallel.row_stats`), the ranks
exchange them, and every rank combines them into the whole row's (:meth:`VocabParallel.whole`), as
the log-sum-exp of log-sum-exps. What crosses the group, never a vocabulary-wide tensor:

- per call: one ``all_gather`` of 7 integers per rank (:meth:`VocabParallel.layout`), which checks
  that the ranges tile ``[0, V)`` in rank order, that every rank got the same targets (their
  number, which would otherwise hang the ranks in different collectives, and their sum, which
  catches a data loader that gives the ranks of a group different batches) and built the same loss
  (a checksum of its options: ranks that differ in label smoothing would gather rows of different
  widths, in z-loss give different losses), and tells each rank V;
- per chunk of ``r`` rows (``fused``; the logits-based losses: per call, all rows at once): one
  ``all_gather`` in which each rank gives ``k`` floats per row: its maximum logit, the sum of
  ``exp(logit - that maximum)`` over its columns, the target's logit (0 if another rank holds it),
  and with label smoothing the sum of its logits less that maximum (weighted by the class weights:
  see :mod:`losslab.losses.smoothing`; each rank's summed class weights, which combining these
  needs, every rank computes from the full class weights and the ranges the layout check gathered),
  with ``LossParts``' diagnostics ``sum exp(logit - maximum) * (logit - maximum)`` (the entropy's,
  :mod:`losslab.losses.entropy`), and when predictions are asked its argmax (both on the steps
  training logs): ``k`` = 3 to 6, so ``k x ranks`` floats per row arrive;
- in backward: one ``all_reduce`` of the hidden states' gradient ``(N, d)``, unless
  ``reduce_hidden_grad=False``.

The autograd of the logits-based losses runs through :class:`_GatherRows` (backward: this rank's
slice of the gradient, no communication: every rank computes the same loss from the gathered
numbers) and :class:`_SumGradOverGroup` (forward: identity; backward: the all-reduce). Either holds
only if every rank differentiates the same function of the loss, as a training step does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from losslab.losses.entropy import entropy, exp_sums, merged_exp_weighted
from losslab.losses.row_max import max_and_argmax
from losslab.losses.smoothing import merged_below_max, smoothing_sum, weighted_row_sums

# The columns of what a rank gives per row (row_stats): k of them, the last three only when asked
# (SMOOTH with label smoothing, then WEIGHTED with the diagnostics, ARGMAX, the last, with predictions).
MAX, SUMEXP, TARGET, SMOOTH = range(4)
ARGMAX = -1


class Layout(NamedTuple):
    """The vocabulary over the ranks of a group, as :meth:`VocabParallel.layout` checked it."""

    vocab_size: int  # V
    widest: int  # the most rows a rank holds
    bounds: tuple[int, ...]  # the ranks' first ids, then V: rank r holds [bounds[r], bounds[r + 1])


@dataclass(frozen=True)
class VocabParallel:
    """This rank's rows ``[start, stop)`` of the LM head, and the group that holds the others.

    Args:
        start, stop: the half-open range of vocabulary ids whose rows this rank holds. The ranks'
            ranges, in rank order, must tile ``[0, V)``.
        group: the process group of the ranks that share the vocabulary; ``None``: the default.
        reduce_hidden_grad: sum the hidden states' gradient over the group in backward (every rank
            then holds the whole gradient); ``False`` leaves each rank its part, for a caller
            that reduces it itself.
    """

    start: int
    stop: int
    group: ProcessGroup | None = None
    reduce_hidden_grad: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.stop, int) and 0 <= self.start < self.stop):
            raise ValueError(f"VocabParallel(start={self.start}, stop={self.stop}): need ints with 0 <= start < stop")

    @classmethod
    def from_vocab(
        cls, vocab_size: int, group: ProcessGroup | None = None, reduce_hidden_grad: bool = True
    ) -> VocabParallel:
        """This rank's range of a vocabulary of ``vocab_size`` split over ``group``'s ranks as DTensor's
        ``Shard(0)`` splits a head (``torch.chunk``): ``ceil(V / ranks)`` rows each, the last rank the
        rest, so that the range is the rank's rows of a head sharded by ``parallelize_module``."""
        rank, ranks = dist.get_rank(group), dist.get_world_size(group)
        start, stop = shard_range(vocab_size, rank, ranks)
        if start >= stop:
            raise ValueError(
                f"a vocabulary of V={vocab_size} split over {ranks} ranks in rows of {math.ceil(vocab_size / ranks)} "
                f"leaves rank {rank} no rows: use fewer ranks"
            )
        return cls(start, stop, group, reduce_hidden_grad)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def layout(self, weight_rows: int, targets: Tensor, chunk_size: int, settings: int = 0) -> Layout:
        """The ranks' ranges, after checking that they tile ``[0, V)`` in rank order, that each weight
        holds its range's rows, and that every rank got the same targets (their number and sum), chunk
        size and ``settings`` (a checksum of the loss's options). Every rank raises the same error."""
        numbers = [self.start, self.stop, weight_rows, targets.numel(), chunk_size, settings]
        mine = torch.cat([torch.tensor(numbers, device=targets.device), targets.sum(dtype=torch.long).view(1)])
        every = mine.new_empty(dist.get_world_size(self.group) * mine.numel())
        dist.all_gather_single(every, mine, group=self.group)
        starts, stops, rows, tokens, chunks, options, sums = every.view(-1, mine.numel()).T.tolist()
        ranges = ", ".join(f"[{start}, {stop})" for start, stop in zip(starts, stops))
        if starts[0] != 0 or any(stop != start for stop, start in zip(stops, starts[1:])):
            raise ValueError(f"vocab_parallel: the ranks' ranges {ranges} do not tile [0, V) in rank order")
        if rows != [stop - start for start, stop in zip(starts, stops)]:
            raise ValueError(
                f"vocab_parallel: the ranks' LM head weights have {rows} rows for the ranges {ranges}: "
                "give each rank its range's rows"
            )
        if len(set(tokens)) > 1 or len(set(sums)) > 1:
            raise ValueError(
                f"vocab_parallel: the ranks got {tokens} targets summing to {sums}: every rank of the group "
                "must get the same hidden states and targets"
            )
        if len(set(chunks)) > 1:
            raise ValueError(f"vocab_parallel: the ranks use chunk sizes {chunks}: give them all the same")
        if len(set(options)) > 1:
            raise ValueError(
                "vocab_parallel: the ranks built the loss with different options (reduction, ignore_index, label "
                "smoothing, z-loss, soft-cap, temperature, class weights or the parts asked for): build it the "
                "same on every rank"
            )
        return Layout(stops[-1], max(rows), (*starts, stops[-1]))

    def local_targets(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The targets as column indices of this rank's rows (0 where another rank holds them), and
        where this rank holds them."""
        local = targets - self.start
        held = (local >= 0) & (local < self.rows)
        return local.masked_fill(~held, 0), held

    def row_stats(
        self,
        logits: Tensor,
        targets: Tensor,
        smooth_weights: Tensor | None,
        smoothing: bool,
        predict: bool,
        diagnose: bool = False,
    ) -> Tensor:
        """What this rank gives of each row of its ``logits (rows, stop - start)``: ``(rows, k)``.

        ``smooth_weights`` are this rank's class weights (``None``: all 1), summed against the
        logits less their maximum with ``smoothing``. Differentiable in ``logits`` (the maximum, the
        entropy's sum and the argmax aside).
        """
        with torch.no_grad():
            row_max, argmax = max_and_argmax(logits)
            weighted = exp_sums(logits, row_max, with_norm=False)[1] if diagnose else None
        shifted = logits - row_max[:, None]
        smooth = weighted_row_sums(shifted, smooth_weights) if smoothing else None
        sumexp = shifted.exp().sum(dim=1)
        target = self.target_logits(logits, targets)
        return self.pack(row_max, sumexp, target, smooth, weighted, argmax if predict else None)

    def target_logits(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Each row's logit of its target, 0 where another rank holds the target."""
        index, held = self.local_targets(targets)
        return torch.where(held, logits.gather(1, index[:, None]).squeeze(1), 0.0)

    def pack(
        self,
        row_max: Tensor,
        sumexp: Tensor,
        target: Tensor,
        smooth: Tensor | None,
        weighted: Tensor | None,
        argmax: Tensor | None,
    ) -> Tensor:
        """A rank's numbers of each row as the ``(rows, k)`` it gives: :data:`MAX`, :data:`SUMEXP`,
        :data:`TARGET`, then :data:`SMOOTH`, and :data:`WEIGHTED` and :data:`ARGMAX` (a local column
        index), those given."""
        columns = [row_max, sumexp, target]
        if smooth is not None:
            columns.append(smooth)
        if weighted is not None:
            columns.append(weighted)
        if argmax is not None:
            columns.append((argmax + self.start).to(row_max.dtype))  # exact: ids < 2**24
        return torch.stack(columns, dim=1)

    def gather(self, stats: Tensor) -> Tensor:
        """Every rank's ``stats (rows, k)``, as ``(ranks, rows, k)``; differentiable (see the module)."""
        return _GatherRows.apply(stats, self.group)

    def sum_hidden_grad(self, hidden: Tensor) -> Tensor:
        """``hidden``, whose gradient backward sums over the group (unless ``reduce_hidden_grad=False``)."""
        return _SumGradOverGroup.apply(hidden, self) if self.reduce_hidden_grad else hidden

    def reduced_hidden_grad(self, grad: Tensor) -> Tensor:
        """The hidden states' gradient summed over the group (unless ``reduce_hidden_grad=False``)."""
        if not self.reduce_hidden_grad:
            return grad
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=self.group)
        return grad


class WholeRows(NamedTuple):
    """Per row, over the whole vocabulary: see :func:`whole`."""

    max: Tensor  # the largest logit
    lse: Tensor  # the log-sum-exp of the logits
    target: Tensor  # the target's logit
    smooth: Tensor | None  # sum_j w_j * (-log p_j), w the class weights (1 without), with label smoothing
    argmax: Tensor | None  # the lowest id of the largest logit, when predicted
    entropy: Tensor | None = None  # of the softmax, when diagnosed


def whole(gathered: Tensor, predict: bool, rank_weights: Tensor | None = None, diagnose: bool = False) -> WholeRows:
    """The whole rows' numbers from every rank's (:meth:`VocabParallel.gather`): the log-sum-exp of
    the ranks' ``max + log(sumexp)``, taken from the largest maximum; the target's logit; with label
    smoothing (``rank_weights``: each rank's summed class weights, its number of rows without, see
    :func:`~losslab.losses.smoothing.part_weights`) the weighted sum of the negative
    log-probabilities, from the ranks' sums relative to their own maxima; with ``diagnose`` the
    entropy (:mod:`losslab.losses.entropy`); and with ``predict`` the argmax of the first rank whose
    maximum is the largest (the ranks' ranges ascend)."""
    rank_max = gathered[..., MAX].detach()
    row_max = rank_max.amax(dim=0)
    log_norm = (gathered[..., SUMEXP] * (rank_max - row_max).exp()).sum(dim=0).log()
    smooth = None
    if rank_weights is not None:
        below_max = merged_below_max(rank_max, gathered[..., SMOOTH], rank_weights, row_max)
        smooth = smoothing_sum(log_norm, below_max, rank_weights.sum())
    argmax = row_entropy = None
    if predict:
        first = (gathered[..., MAX] == row_max).to(torch.uint8).argmax(dim=0)  # the first rank that holds it
        argmax = gathered[..., ARGMAX].detach().gather(0, first[None]).squeeze(0).long()
    if diagnose:
        with torch.no_grad():
            weighted = gathered[..., ARGMAX - 1 if predict else ARGMAX]  # before the argmax, if given
            row_entropy = entropy(log_norm, merged_exp_weighted(rank_max, gathered[..., SUMEXP], weighted, row_max))
    return WholeRows(row_max, row_max + log_norm, gathered[..., TARGET].sum(dim=0), smooth, argmax, row_entropy)


def shard_range(vocab_size: int, rank: int, ranks: int) -> tuple[int, int]:
    """Rank ``rank``'s rows of ``vocab_size`` split over ``ranks`` as ``torch.chunk`` (and DTensor's
    ``Shard(0)``) split them: ``ceil(V / ranks)`` each, the last ones fewer (or none)."""
    rows = math.ceil(vocab_size / ranks)
    return min(rank * rows, vocab_size), min((rank + 1) * rows, vocab_size)


class _GatherRows(torch.autograd.Function):
    """All-gather of each rank's ``(rows, k)`` into ``(ranks, rows, k)``. Every rank computes the
    same loss from the result, so a rank's part gets the result's gradient at its own slice."""

    @staticmethod
    def forward(ctx, stats: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.rank = dist.get_rank(group)
        gathered = stats.new_empty(dist.get_world_size(group) * stats.shape[0], *stats.shape[1:])
        dist.all_gather_single(gathered, stats.contiguous(), group=group)
        return gathered.view(-1, *stats.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad[ctx.rank], None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group: each rank's logits see only its
    rows of the head, so its gradient of the hidden states is its part of the whole one."""

    @staticmethod
    def forward(ctx, hidden: Tensor, parallel: VocabParallel) -> Tensor:
        ctx.parallel = parallel
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.parallel.reduced_hidden_grad(grad), None
