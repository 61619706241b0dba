"""The LightningDataModule: a corpus, its tokenizer and its batches for next-token training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

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
from losslab.data.corpora import CORPORA, PATH_CORPORA, open_corpus
from losslab.data.documents import MAX_DOCUMENT_CHARS, training_sample
from losslab.data.token_cache import TokenSplit, cached_token_splits
from losslab.files import DataError
from losslab.settings import is_int_at_least, is_number, require
from losslab.targets import IGNORE_INDEX
from losslab.tokenizers import build_tokenizer, check_tokenizer_settings, token_byte_lengths

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


# DataConfig's settings that stand alone: (name, whether a value is right, what it must be, an example).
SETTING_CHECKS: tuple[tuple[str, Callable[[Any], bool], str, str], ...] = (
    ("corpus", lambda v: v in CORPORA, f"the corpus must be one of {', '.join(CORPORA)}", "data=shakespeare"),
    (
        "context_length",
        lambda v: is_int_at_least(v, 1),
        "the rows' length must be an int >= 1 token",
        "data.context_length=128",
    ),
    ("batch_size", lambda v: is_int_at_least(v, 1), "the batch size must be an int >= 1 row", "data.batch_size=16"),
    ("mode", lambda v: v in MODES, f"the mode must be one of {', '.join(MODES)}", "data.mode=padded"),
    (
        "val_fraction",
        lambda v: is_number(v) and 0 < v < 1,
        "the validation share must be in (0, 1)",
        "data.val_fraction=0.1",
    ),
    (
        "val_batches",
        lambda v: v is None or is_int_at_least(v, 1),
        "the validation batches must be an int >= 1, or null for the whole split",
        "data.val_batches=20",
    ),
    (
        "max_document_chars",
        lambda v: is_int_at_least(v, 1),
        "a document's longest piece must be an int >= 1 characters",
        "data.max_document_chars=4096",
    ),
    (
        "bpe_train_bytes",
        lambda v: is_int_at_least(v, 1),
        "the BPE's training sample must be an int >= 1 bytes",
        "data.bpe_train_bytes=100_000_000",
    ),
    (
        "text_field",
        lambda v: isinstance(v, str) and v != "",
        "the records' text field must be a non-empty name",
        "data.text_field=text",
    ),
    ("num_workers", lambda v: is_int_at_least(v, 0), "the loader's workers must be an int >= 0", "data.num_workers=2"),
    (
        "cache_dir",
        lambda v: isinstance(v, (str, Path)) and str(v) != "",
        "the cache must be a folder's path",
        "paths.cache_dir=.cache/losslab",
    ),
)


@dataclass(frozen=True)
class DataConfig:
    """What the data module is built from: a corpus, its tokenizer and its batches. Each value is
    checked here, before any data work, with a message that names it and the fix (as the config
    writes it: ``data.batch_size=16``); what needs the data (a corpus too small for a batch) is
    checked in :meth:`GPTDataModule.setup`.

    Hydra builds it from ``conf/data/*.yaml`` and ``conf/tokenizer/*.yaml`` (``data.*``); losslab
    sets ``accumulate`` from ``step.accumulate``.
    """

    corpus: str = "pydoc"  # one of CORPORA
    # text, jsonl and parquet: a file, a folder of such files or a glob; shakespeare: a local copy
    path: str | Path | None = None
    tokenizer: str = "bpe"  # a name that losslab.tokenizers.build_tokenizer knows
    vocab_size: int | None = 4096  # bpe's, counting the 256 bytes and <|endoftext|>; the others ignore it
    # bpe learns from the first training documents, in corpus order, until they hold this many bytes
    bpe_train_bytes: int = BPE_TRAIN_BYTES
    ranks_path: str | Path | None = None  # gpt2: a local r50k_base.tiktoken instead of tiktoken's cache
    context_length: int = 256  # tokens per row (T)
    batch_size: int = 32  # rows per batch
    # micro-batches per training batch: an optimizer step trains on batch_size * accumulate rows per device
    accumulate: int = 1
    mode: str = "packed"  # packed or padded (see losslab.data.batching)
    val_fraction: float = 0.1  # the share of documents held out for validation
    # shakespeare and text: paragraphs longer than this are cut at line ends into documents of at most it
    max_document_chars: int = MAX_DOCUMENT_CHARS
    text_field: str = "text"  # jsonl and parquet: the field (column) that holds each document
    val_batches: int | None = None  # at most this many validation batches, evenly over the split; None: all
    num_workers: int = 0  # DataLoader worker processes
    cache_dir: str | Path = "cache"  # downloads, trained tokenizers and token files
    seed: int = 0  # the training order's: the same seed gives the same batches
    # the target of a padded position (padded mode): the loss's own, so that it ignores them (losslab.targets)
    ignore_index: int = IGNORE_INDEX

    @property
    def rows_per_step(self) -> int:
        """The rows an optimizer step trains on in each data-parallel process: ``batch_size * accumulate``."""
        return self.batch_size * self.accumulate

    def __post_init__(self) -> None:
        for name, ok, must_be, example in SETTING_CHECKS:
            value = getattr(self, name)
            require(ok(value), name, value, must_be, example)
        check_tokenizer_settings(self.tokenizer, self.vocab_size, self.ranks_path)
        require(
            self.corpus not in PATH_CORPORA or self.path is not None,
            "path",
            self.path,
            f"data={self.corpus} reads your own files: give data.path=<a file, a folder of {self.corpus} files or a glob>",
        )
        if not is_int_at_least(self.accumulate, 1):  # step.accumulate in a config, checked there
            raise ValueError(f"accumulate={self.accumulate} must be at least 1 micro-batch per step")


class GPTDataModule(L.LightningDataModule):
    """A corpus, its tokenizer and its batches for next-token training, as ``config`` describes them.

    Its hyperparameters (Lightning's ``hparams``, in checkpoints and the logger's ``hparams.yaml``)
    are the config's fields. Call ``setup()`` before reading ``tokenizer``, ``vocab_size`` or
    ``token_bytes``; later calls return at once.
    """

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        self.config = config
        self.save_hyperparameters(asdict(config))
        self.cache_dir = Path(config.cache_dir).expanduser()
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
        config = self.config
        corpus = open_corpus(config.corpus, config.path, self.cache_dir, config.max_document_chars, config.text_field)
        if tokenizer is None:
            train_text = None
            if config.tokenizer == "bpe":
                train_text = training_sample(corpus.documents(), config.val_fraction, config.bpe_train_bytes)
            tokenizer = build_tokenizer(
                config.tokenizer,
                vocab_size=config.vocab_size,
                train_text=train_text,
                cache_dir=self.cache_dir / "tokenizers",
                ranks_path=config.ranks_path,
            )
        self.tokenizer = tokenizer
        self.token_bytes = torch.from_numpy(token_byte_lengths(self.tokenizer))
        splits = cached_token_splits(corpus, self.tokenizer, config.val_fraction, self.cache_dir / "tokens")
        for split, tokens in splits.items():
            check_split(config.corpus, split, tokens, config.context_length, self.tokenizer.n_vocab)
            self.datasets[split] = self.make_dataset(split, tokens)
        epoch = len(self.train_sampler())
        if config.rows_per_step > epoch:  # the loader would cut every step to the whole epoch
            raise DataError(
                f"data.batch_size={config.batch_size} x step.accumulate={config.accumulate} is more rows per step than an "
                f"epoch of corpus {config.corpus!r} holds ({epoch:,}): use data.batch_size x step.accumulate <= {epoch}, "
                "or more data"
            )

    def make_dataset(self, split: str, tokens: TokenSplit) -> Dataset:
        context_length = self.config.context_length
        if self.config.mode == "padded":
            return DocumentRows(tokens.tokens, tokens.offsets, context_length)
        return PackedWindows(tokens.tokens, context_length, stride=1 if split == "train" else context_length)

    def train_sampler(self) -> EpochSampler:
        dataset = self.datasets["train"]
        if self.config.mode == "padded":
            return EpochSampler(len(dataset), seed=self.config.seed)
        # an epoch draws as many windows as it takes to see about every token once
        n_windows = len(dataset) // self.config.context_length + 1
        return EpochSampler(len(dataset), num_samples=n_windows, replacement=True, seed=self.config.seed)

    def train_dataloader(self) -> ResumableDataLoader:
        return self.loader(
            self.datasets["train"],
            self.train_sampler(),
            loader_class=ResumableDataLoader,
            accumulate=self.config.accumulate,
        )

    def val_dataloader(self) -> DataLoader:
        dataset = self.datasets["val"]
        if self.config.val_batches is not None:
            dataset = evenly_spaced(dataset, self.config.val_batches * self.config.batch_size)
        # the data-parallel size and rank: the processes of a tensor-parallel group share batches
        replicas = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        if replicas is None or replicas["num_replicas"] == 1:
            return self.loader(dataset)
        # each data-parallel rank its share, every row counted once (see ValidationShard)
        shard = ValidationShard(len(dataset), replicas["num_replicas"], replicas["rank"])
        return self.loader(WithBlankRow(dataset, self.config.ignore_index), shard)

    def loader(
        self,
        dataset: Dataset,
        sampler: Sampler | None = None,
        loader_class: type[DataLoader] = DataLoader,
        accumulate: int | None = None,
    ) -> DataLoader:
        """Batches of ``batch_size`` rows; with ``accumulate``, lists of that many batches."""
        collate = default_collate
        if self.config.mode == "padded":
            collate = partial(pad_batch, pad_id=self.tokenizer.eot_token, ignore_index=self.config.ignore_index)
        batch_size = self.config.batch_size
        if accumulate is not None:
            collate = partial(micro_batches, batch_size=batch_size, collate=collate)
            batch_size *= accumulate
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
            # Starting a pass draws the workers' base seed from this generator rather than from the
            # global RNG, so a resumed run, which starts passes at other points, keeps its random stream.
            generator=torch.Generator().manual_seed(self.config.seed),
        )
