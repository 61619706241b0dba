"""The LightningDataModule: a corpus, its tokenizer and its batches for next-token training."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import tiktoken
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from losslab.data.batching import (
    MODES,
    DocumentRows,
    EpochSampler,
    PackedWindows,
    ResumableDataLoader,
    ValidationShard,
    WithBlankRow,
    evenly_spaced,
    micro_batches,
    pad_batch,
)
from losslab.data.corpora import open_corpus
from losslab.data.documents import MAX_DOCUMENT_CHARS, training_sample
from losslab.data.token_cache import TokenSplit, cached_token_splits
from losslab.files import DataError
from losslab.targets import IGNORE_INDEX
from losslab.tokenizers import build_tokenizer, token_byte_lengths

BPE_TRAIN_BYTES = 100_000_000  # the bpe tokenizer learns from this much of the training split


def check_split(corpus: str, split: str, tokens: TokenSplit, context_length: int, vocab_size: int) -> None:
    """Raise when a split holds fewer than the ``context_length + 1`` tokens of one window, or a
    token id outside the vocabulary: checked once here, where the data enters, so that nothing
    checks it again at every step."""
    if len(tokens.tokens) < context_length + 1:
        raise DataError(
            f"the {split} split of corpus {corpus!r} has {len(tokens.tokens)} tokens, fewer than "
            f"context_length + 1 = {context_length + 1}: use a smaller model.context_length or more data"
        )
    largest = int(tokens.tokens.max())
    if largest >= vocab_size:
        raise DataError(
            f"the {split} split of corpus {corpus!r} holds token id {largest}, outside the tokenizer's "
            f"vocabulary of {vocab_size}: delete its token files in the cache (cache_dir/tokens) to rebuild them"
        )


class GPTDataModule(L.LightningDataModule):
    """A corpus, its tokenizer and its batches for next-token training.

    Args:
        corpus: one of :data:`~losslab.data.corpora.CORPORA`.
        path: for ``text``, ``jsonl`` and ``parquet``, a file, a folder of such files or a glob;
            for ``shakespeare``, a local copy instead of downloading.
        tokenizer: a name that :func:`losslab.tokenizers.build_tokenizer` knows.
        vocab_size: for ``bpe``, counting the 256 bytes and ``<|endoftext|>``.
        bpe_train_bytes: ``bpe`` learns from the first training documents, in corpus order, until
            they hold this many bytes (all of them in a smaller corpus).
        ranks_path: for ``gpt2``, a local ``r50k_base.tiktoken`` instead of tiktoken's cache.
        context_length: tokens per row (``T``).
        batch_size: rows per batch.
        accumulate: micro-batches per training batch (gradient accumulation): an optimizer step
            trains on ``batch_size * accumulate`` rows per device.
        mode: ``packed`` or ``padded`` (see :mod:`losslab.data.batching`).
        val_fraction: the share of documents held out for validation.
        max_document_chars: for ``shakespeare`` and ``text``, paragraphs longer than this many
            characters are cut at line ends into documents of at most this size.
        text_field: for ``jsonl`` and ``parquet``, the field (column) that holds each document.
        val_batches: at most this many validation batches, taken evenly over the split.
        num_workers: DataLoader worker processes.
        cache_dir: where downloads, trained tokenizers and token files are kept.
        seed: the training order's seed; the same seed gives the same batches.
        ignore_index: the target of a padded position (``padded`` mode); the loss's own, so that it
            ignores them (see :mod:`losslab.targets`).

    Call ``setup()`` before reading ``tokenizer``, ``vocab_size`` or ``token_bytes``; later calls
    return at once.
    """

    def __init__(
        self,
        corpus: str = "pydoc",
        path: str | Path | None = None,
        tokenizer: str = "bpe",
        vocab_size: int | None = 4096,
        bpe_train_bytes: int = BPE_TRAIN_BYTES,
        ranks_path: str | None = None,
        context_length: int = 256,
        batch_size: int = 32,
        accumulate: int = 1,
        mode: str = "packed",
        val_fraction: float = 0.1,
        max_document_chars: int = MAX_DOCUMENT_CHARS,
        text_field: str = "text",
        val_batches: int | None = None,
        num_workers: int = 0,
        cache_dir: str | Path = "cache",
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if accumulate < 1:
            raise ValueError(f"accumulate={accumulate} must be at least 1 micro-batch per step")
        if bpe_train_bytes < 1:
            raise ValueError(f"bpe_train_bytes={bpe_train_bytes} must be at least 1 byte (e.g. {BPE_TRAIN_BYTES})")
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir).expanduser()
        self.tokenizer: tiktoken.Encoding | None = None
        self.token_bytes: Tensor | None = None  # (vocab_size,) bytes per token, for bits per byte
        self.datasets: dict[str, Dataset] = {}

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError("the vocabulary is known once the tokenizer is built: call setup() first")
        return self.tokenizer.n_vocab

    def setup(self, stage: str | None = None, tokenizer: tiktoken.Encoding | None = None) -> None:
        """Build the tokenizer and the datasets; ``tokenizer``, a ready one (a checkpoint's own, for
        the audit), is used instead of building one: nothing is trained or downloaded for it."""
        if self.tokenizer is not None:
            return
        hp = self.hparams
        corpus = open_corpus(hp.corpus, hp.path, self.cache_dir, hp.max_document_chars, hp.text_field)
        if tokenizer is None:
            train_text = None
            if hp.tokenizer == "bpe":
                train_text = training_sample(corpus.documents(), hp.val_fraction, hp.bpe_train_bytes)
            tokenizer = build_tokenizer(
                hp.tokenizer,
                vocab_size=hp.vocab_size,
                train_text=train_text,
                cache_dir=self.cache_dir / "tokenizers",
                ranks_path=hp.ranks_path,
            )
        self.tokenizer = tokenizer
        self.token_bytes = torch.from_numpy(token_byte_lengths(self.tokenizer))
        splits = cached_token_splits(corpus, self.tokenizer, hp.val_fraction, self.cache_dir / "tokens")
        for split, tokens in splits.items():
            check_split(hp.corpus, split, tokens, hp.context_length, self.tokenizer.n_vocab)
            self.datasets[split] = self.make_dataset(split, tokens)
        epoch = len(self.train_sampler())
        if hp.batch_size * hp.accumulate > epoch:  # the loader would cut every step to the whole epoch
            raise DataError(
                f"data.batch_size={hp.batch_size} x step.accumulate={hp.accumulate} is more rows per step than an "
                f"epoch of corpus {hp.corpus!r} holds ({epoch:,}): use data.batch_size x step.accumulate <= {epoch}, "
                "or more data"
            )

    def make_dataset(self, split: str, tokens: TokenSplit) -> Dataset:
        context_length = self.hparams.context_length
        if self.hparams.mode == "padded":
            return DocumentRows(tokens.tokens, tokens.offsets, context_length)
        return PackedWindows(tokens.tokens, context_length, stride=1 if split == "train" else context_length)

    def train_sampler(self) -> EpochSampler:
        dataset = self.datasets["train"]
        if self.hparams.mode == "padded":
            return EpochSampler(len(dataset), seed=self.hparams.seed)
        # an epoch draws as many windows as it takes to see about every token once
        n_windows = len(dataset) // self.hparams.context_length + 1
        return EpochSampler(len(dataset), num_samples=n_windows, replacement=True, seed=self.hparams.seed)

    def train_dataloader(self) -> ResumableDataLoader:
        return self.loader(
            self.datasets["train"],
            self.train_sampler(),
            loader_class=ResumableDataLoader,
            accumulate=self.hparams.accumulate,
        )

    def val_dataloader(self) -> DataLoader:
        dataset = self.datasets["val"]
        if self.hparams.val_batches is not None:
            dataset = evenly_spaced(dataset, self.hparams.val_batches * self.hparams.batch_size)
        # the data-parallel size and rank: the processes of a tensor-parallel group share batches
        replicas = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        if replicas is None or replicas["num_replicas"] == 1:
            return self.loader(dataset)
        # each data-parallel rank its share, every row counted once (see ValidationShard)
        shard = ValidationShard(len(dataset), replicas["num_replicas"], replicas["rank"])
        return self.loader(WithBlankRow(dataset, self.hparams.ignore_index), shard)

    def loader(
        self,
        dataset: Dataset,
        sampler: Sampler | None = None,
        loader_class: type[DataLoader] = DataLoader,
        accumulate: int | None = None,
    ) -> DataLoader:
        """Batches of ``batch_size`` rows; with ``accumulate``, lists of that many batches."""
        collate = default_collate
        if self.hparams.mode == "padded":
            collate = partial(pad_batch, pad_id=self.tokenizer.eot_token, ignore_index=self.hparams.ignore_index)
        batch_size = self.hparams.batch_size
        if accumulate is not None:
            collate = partial(micro_batches, batch_size=batch_size, collate=collate)
            batch_size *= accumulate
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            # Starting a pass draws the workers' base seed from this generator rather than from the
            # global RNG, so a resumed run, which starts passes at other points, keeps its random stream.
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )
