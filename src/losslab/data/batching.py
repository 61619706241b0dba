"""Batching: the datasets a split's tokens make, how rows become batches, and the training order.

Batches are dicts of ``input_ids`` and ``targets``, both ``(B, T)`` and aligned (``targets[:, t]``
is the token that position ``t`` predicts, ``ignore_index`` where there is none: see
:mod:`losslab.targets`), in one of two modes:

- ``packed``: windows of ``context_length + 1`` tokens cut anywhere in the split, as in nanoGPT
  (:class:`PackedWindows`);
- ``padded``: one document (or a piece of a long one) per row, padded on the right, plus an
  ``attention_mask`` (:class:`DocumentRows`, :func:`pad_batch`).

A training batch is a list of ``accumulate`` such batches, the micro-batches of one optimizer step
(:func:`micro_batches`).

The training order is resumable: each epoch's order is a pure function of the seed and the epoch
(:class:`EpochSampler`), and the training loader (:class:`ResumableDataLoader`) is checkpointed by
Lightning's fit loop with the number of batches it has handed out, so a resumed run continues the
epoch exactly where the checkpoint left it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from losslab.checkpoint_files import CheckpointError
from losslab.targets import IGNORE_INDEX, shift_labels

MODES = ("packed", "padded")


class PackedWindows(Dataset):
    """Windows of ``context_length + 1`` tokens starting every ``stride`` tokens.

    Window ``w`` gives ``input_ids = w[:-1]`` and ``targets = w[1:]``. With ``stride =
    context_length`` consecutive windows share one token, so each token is a target once.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int) -> None:
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.context_length - 1) // self.stride + 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start = index * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.context_length + 1].astype(np.int64))
        return {"input_ids": window[:-1], "targets": window[1:]}


class DocumentRows(Dataset):
    """One row per document, long documents cut into pieces of at most ``context_length`` tokens.

    Consecutive pieces of a document share one token, the last of one and the first of the
    next, so that every token of a document but its first is a target once.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, context_length: int) -> None:
        self.tokens = tokens
        self.rows = [
            (start, min(start + context_length, end))
            for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())
            for start in range(begin, end - 1, context_length - 1)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Tensor:
        start, end = self.rows[index]
        return torch.from_numpy(self.tokens[start:end].astype(np.int64))


def pad_batch(rows: list[Tensor], pad_id: int, ignore_index: int = IGNORE_INDEX) -> dict[str, Tensor]:
    """Right-pad ``rows`` with ``pad_id`` to the longest; padding is masked, and its targets are
    ``ignore_index``."""
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, ignore_index)
    targets = shift_labels(labels, ignore_index)
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask}


def micro_batches(
    rows: list[Any], batch_size: int, collate: Callable[[list[Any]], dict[str, Tensor]]
) -> list[dict[str, Tensor]]:
    """One optimizer step's ``rows`` as consecutive micro-batches of ``batch_size`` rows each."""
    return [collate(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]


class EpochSampler(Sampler[int]):
    """A random order of ``n_items`` indices that is a pure function of ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch (as for a ``DistributedSampler``),
    so a resumed run draws the same order for the epoch it stopped in as the run it resumes.

    Args:
        n_items: the dataset's length.
        num_samples: indices per epoch; ``n_items`` unless given.
        replacement: draw with replacement (any ``num_samples``) or permute (``num_samples <= n_items``).
        seed: the order's seed.
    """

    def __init__(self, n_items: int, num_samples: int | None = None, replacement: bool = False, seed: int = 0) -> None:
        self.n_items = n_items
        self.num_samples = n_items if num_samples is None else num_samples
        if not replacement and self.num_samples > n_items:
            raise ValueError(f"num_samples={self.num_samples} > n_items={n_items} needs replacement=True")
        self.replacement = replacement
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.replacement:
            order = rng.integers(self.n_items, size=self.num_samples)
        else:
            order = rng.permutation(self.n_items)[: self.num_samples]
        return iter(order.tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning's fit loop saves in checkpoints and restores on resume.

    Its state is the epoch of the current pass (its sampler's ``epoch``, which Lightning sets
    through ``set_epoch``), how many batches the pass has handed out, and how many rows of the
    epoch's order that is over all the data-parallel processes (``rows``: batches x rows per batch x
    processes, a ``DistributedSampler`` dealing the order out to them in turn). Once restored, a pass
    of that same epoch skips those rows, as whole batches of its own, reading and dropping them; a
    pass of a later epoch (the checkpoint was saved at the end of an epoch) starts from the
    beginning. With a sampler whose order is fixed for each epoch (:class:`EpochSampler`), the
    resumed pass goes on with the rows the interrupted run would have trained on next, whatever the
    workers, and with another batch size, accumulation or number of processes where the rows done
    make whole steps of the new run; where they do not, it says so rather than skip the wrong rows.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = {"epoch": 0, "batches": 0}  # of the current pass
        self.resume_at: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self.batches_to_skip(epoch)
        self.resume_at = None
        self.position = {"epoch": epoch, "batches": 0}
        for batch in super().__iter__():
            self.position["batches"] += 1
            if self.position["batches"] > skip:
                yield batch

    def rows_per_batch(self) -> int:
        """The rows of the epoch's order that one batch takes, over all the data-parallel processes."""
        return self.batch_size * getattr(self.sampler, "num_replicas", 1)

    def batches_to_skip(self, epoch: int) -> int:
        """The batches of this pass that the restored state has done already (0 for another epoch)."""
        if not self.resume_at or self.resume_at["epoch"] != epoch:
            return 0
        return batches_done(self.resume_at, self.rows_per_batch())

    def state_dict(self) -> dict[str, int]:
        return {**self.position, "rows": self.position["batches"] * self.rows_per_batch()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_at = dict(state_dict)


def batches_done(state: dict[str, int], rows_per_batch: int) -> int:
    """The batches of ``rows_per_batch`` rows (over all the data-parallel processes) that a
    :class:`ResumableDataLoader`'s saved ``state`` has handed out in its epoch; a ``CheckpointError``
    when its rows are not a whole number of them."""
    if "rows" not in state:  # saved before rows were
        return state["batches"]
    rows = state["rows"]
    if rows % rows_per_batch:
        raise CheckpointError(
            f"the checkpoint stopped {rows} rows into epoch {state['epoch']}, which is not a whole number of "
            f"this run's steps of {rows_per_batch} rows (data.batch_size x data.accumulate x data-parallel "
            f"processes): resume with the checkpoint's ({rows // state['batches']} rows a step), or start a new run"
        )
    return rows // rows_per_batch


class WithBlankRow(Dataset):
    """``dataset``, and after its items (at index ``len(dataset)``) a row with no target, which counts
    in no sum: its first item with every target ``ignore_index`` (a document row: its first token)."""

    def __init__(self, dataset: Dataset, ignore_index: int = IGNORE_INDEX) -> None:
        self.dataset = dataset
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.dataset) + 1

    def __getitem__(self, index: int) -> Any:
        if index < len(self.dataset):
            return self.dataset[index]
        item = self.dataset[0]
        if isinstance(item, dict):
            return {**item, "targets": torch.full_like(item["targets"], self.ignore_index)}
        return item[:1]  # pad_batch gives a one-token row no target


class ValidationShard(DistributedSampler):
    """This process's share of ``n_items`` validation rows: every ``num_replicas``-th from ``rank``,
    then the blank row of :class:`WithBlankRow` (index ``n_items``) until every share has the same
    length. Each row counts once over all processes; Lightning's own ``DistributedSampler`` repeats
    rows to even the shares, and those count twice. Even shares keep every process in step: under
    FSDP each forward gathers the weights from all of them. Lightning leaves a ``DistributedSampler``
    that a loader has in place."""

    def __init__(self, n_items: int, num_replicas: int, rank: int) -> None:
        super().__init__(range(n_items), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.n_items = n_items

    def __iter__(self) -> Iterator[int]:
        share = list(range(self.rank, self.n_items, self.num_replicas))
        return iter(share + [self.n_items] * (self.num_samples - len(share)))


def evenly_spaced(dataset: Dataset, n: int) -> Dataset:
    """At most ``n`` items of ``dataset``, spread over all of it."""
    if n >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).astype(np.int64).tolist())
