"""Corpora, the token cache and batching, behind one LightningDataModule.

A corpus is a list of documents:

- ``pydoc``: the English reference documentation that every CPython carries
  (``pydoc_data.topics``), one topic per document;
- ``shakespeare``: tiny Shakespeare, downloaded once (or read from ``path``), one speech per
  document;
- ``text``: your own UTF-8 files (``path``: a file, a folder of ``*.txt`` files or a glob), one
  paragraph per document.

Paragraphs and speeches are separated by blank lines; one longer than ``max_document_chars`` is cut
at line ends into pieces of at most that many characters, so text without blank lines still makes
many documents. Every ``1 / val_fraction``-th document goes to validation (the last document when
there are fewer than ``1 / val_fraction``), so both splits cover the whole corpus, and the
tokenizer learns from ``train`` only.

Each split is tokenized once into ``cache_dir/tokens``: ``<name>.bin`` holds the documents'
tokens back to back, each followed by ``<|endoftext|>``; ``<name>.offsets.npy`` where each document
starts; ``<name>.json`` the token dtype and the size and sha256 of both files, checked on load.
``<name>`` is the corpus, the split and a hash of the split's documents and of the tokenizer.

Batches are dicts of ``input_ids`` and ``targets``, both ``(B, T)`` and aligned (``targets[:, t]``
is the token that position ``t`` predicts, ``ignore_index`` where there is none: see
:mod:`losslab.targets`), in one of two modes:

- ``packed``: windows of ``context_length + 1`` tokens cut anywhere in the split, as in nanoGPT;
- ``padded``: one document (or a piece of a long one) per row, padded on the right, plus an
  ``attention_mask``.

A training batch is a list of ``accumulate`` such batches, the micro-batches of one optimizer step.

The training order is resumable: each epoch's order is a pure function of the seed and the epoch
(:class:`EpochSampler`), and the training loader (:class:`ResumableDataLoader`) is checkpointed by
Lightning's fit loop with the number of batches it has handed out, so a resumed run continues the
epoch exactly where the checkpoint left it.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import re
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import lightning as L
import numpy as np
import tiktoken
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate
from tqdm import tqdm

from losslab.files import replaced_atomically
from losslab.targets import IGNORE_INDEX, shift_labels
from losslab.tokenizers import build_tokenizer, text_digest, token_byte_lengths, tokenizer_fingerprint

CORPORA = ("pydoc", "shakespeare", "text")
MODES = ("packed", "padded")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BLANK_LINES = re.compile(r"\n\s*\n")
LAST_WHITESPACE = re.compile(r"\s(?=\S*$)")
MAX_DOCUMENT_CHARS = 4096  # above tiny Shakespeare's longest speech (3,080), which stays whole
TOKENIZE_CHUNK = 1024  # documents per encode_ordinary_batch call


# Corpora


def load_documents(
    corpus: str,
    path: str | Path | None = None,
    cache_dir: str | Path = "cache",
    max_document_chars: int = MAX_DOCUMENT_CHARS,
) -> list[str]:
    """The documents of ``corpus``, one of :data:`CORPORA`; ``cache_dir`` keeps downloads.

    ``shakespeare`` and ``text`` documents are :func:`paragraphs` of at most ``max_document_chars``
    characters; ``pydoc`` topics are kept whole, whatever their length.
    """
    if corpus == "pydoc":
        documents = [topics[name] for name in sorted(topics)]
    elif corpus == "shakespeare":
        file = Path(path) if path is not None else download_shakespeare(Path(cache_dir) / "corpora")
        documents = paragraphs(read_text(file), max_document_chars)
    elif corpus == "text":
        if path is None:
            raise ValueError("the text corpus needs data.path=<a file, a folder of .txt files or a glob>")
        documents = [doc for file in text_files(path) for doc in paragraphs(read_text(file), max_document_chars)]
    else:
        raise ValueError(f"unknown corpus {corpus!r}: choose one of {', '.join(CORPORA)}")
    if not documents:
        raise ValueError(f"corpus {corpus!r} ({path}) holds no text: point data.path at files with text in them")
    return documents


def download_shakespeare(folder: Path) -> Path:
    """tiny Shakespeare in ``folder``, downloaded unless a copy with the right sha256 is there."""
    path = folder / "tinyshakespeare.txt"
    if path.exists() and file_sha256(path) == SHAKESPEARE_SHA256:
        return path
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except OSError as error:
        raise RuntimeError(
            f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({error}): "
            "download it yourself and set data.path=<your local copy>"
        ) from None
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise RuntimeError(
            f"the file downloaded from {SHAKESPEARE_URL} is not tiny Shakespeare (its sha256 differs): "
            "set data.path=<a local copy> instead"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def text_files(path: str | Path) -> list[Path]:
    """The files that ``path`` names: itself, the ``*.txt`` below a folder, or a glob's matches, sorted."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(file for file in path.rglob("*.txt") if file.is_file())
        if not files:
            raise ValueError(f"folder {path} holds no *.txt files: put the corpus in .txt files or give a glob")
        return files
    if not any(char in str(path) for char in "*?["):
        raise FileNotFoundError(f"corpus path {path} does not exist: set data.path to a file, a folder or a glob")
    files = sorted(Path(file) for file in glob.glob(str(path), recursive=True) if Path(file).is_file())
    if not files:
        raise FileNotFoundError(f"glob {path} matches no files: check data.path")
    return files


def read_text(path: Path) -> str:
    """The text of ``path`` as UTF-8; invalid bytes become U+FFFD, with a warning naming the file."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        warnings.warn(
            f"{path} is not valid UTF-8 (first bad byte at offset {error.start}): its undecodable bytes "
            "were replaced by U+FFFD; convert the file to UTF-8 (e.g. with iconv) to keep them",
            stacklevel=2,
        )
        return data.decode("utf-8", errors="replace")


def paragraphs(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """The blank-line separated parts of ``text`` that hold more than whitespace, those longer than
    ``max_chars`` characters cut into pieces by :func:`cut_paragraph`."""
    if max_chars < 1:
        raise ValueError(f"max_document_chars={max_chars} must be at least 1 character")
    return [piece for part in BLANK_LINES.split(text) for piece in cut_paragraph(part, max_chars) if piece.strip()]


def cut_paragraph(paragraph: str, max_chars: int) -> list[str]:
    """``paragraph`` itself when it has at most ``max_chars`` characters, else cut at line ends into
    pieces of at most ``max_chars``: each piece takes the next lines while they fit, and a line
    longer than ``max_chars`` is first cut by :func:`cut_line`."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    short_lines = [part for line in paragraph.split("\n") for part in cut_line(line, max_chars)]
    pieces: list[str] = []
    lines: list[str] = []  # the lines of the piece being filled
    size = 0  # its characters, with the newlines between its lines
    for line in short_lines:
        if lines and size + 1 + len(line) > max_chars:  # 1: the newline before the line
            pieces.append("\n".join(lines))
            lines = []
        size = size + 1 + len(line) if lines else len(line)
        lines.append(line)
    pieces.append("\n".join(lines))
    return pieces


def cut_line(line: str, max_chars: int) -> list[str]:
    """``line`` in pieces of at most ``max_chars`` characters, each cut at the last whitespace that
    keeps it within the maximum (that whitespace is dropped), or at the maximum when there is none."""
    pieces = []
    start = 0  # of the rest of the line
    while len(line) - start > max_chars:
        head = line[start : start + max_chars + 1]
        whitespace = LAST_WHITESPACE.search(head)
        if whitespace and whitespace.start() > 0:
            pieces.append(head[: whitespace.start()])
            start += whitespace.start() + 1
        else:
            pieces.append(head[:max_chars])
            start += max_chars
    pieces.append(line[start:])
    return pieces


def split_documents(documents: list[str], val_fraction: float) -> dict[str, list[str]]:
    """``{"train": ..., "val": ...}``: document ``i`` goes to val when ``i * val_fraction`` crosses
    an integer, so val gets every ``1 / val_fraction``-th document, spread over the corpus; a corpus
    of fewer documents than ``1 / val_fraction``, where no ``i`` crosses one, gives val its last."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    if len(documents) < 2:
        raise ValueError(
            f"{len(documents)} document(s) cannot be split into train and val, which need one each: "
            "separate documents with blank lines, add more text, or lower data.max_document_chars "
            "(paragraphs longer than it are cut into several documents)"
        )
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i, document in enumerate(documents):
        to_val = int((i + 1) * val_fraction) > int(i * val_fraction)
        splits["val" if to_val else "train"].append(document)
    if not splits["val"]:
        splits["val"].append(splits["train"].pop())
    return splits


# Token cache


@dataclass
class TokenSplit:
    """A split as tokens: its documents back to back, each followed by ``<|endoftext|>``."""

    tokens: np.ndarray  # a read-only memmap of the split's token file
    offsets: np.ndarray  # (n_documents + 1,): where each document starts, then the end


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if n_vocab - 1 <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def cached_token_split(documents: list[str], enc: tiktoken.Encoding, folder: Path, name: str) -> TokenSplit:
    """The tokens of ``documents`` from ``folder/<name>.*``, written first when absent or damaged."""
    meta_path = folder / f"{name}.json"
    if not cache_is_valid(meta_path):
        write_token_split(documents, enc, folder, name)
    meta = json.loads(meta_path.read_text())
    return TokenSplit(
        tokens=np.memmap(folder / f"{name}.bin", dtype=meta["dtype"], mode="r"),
        offsets=np.load(folder / f"{name}.offsets.npy"),
    )


def cache_is_valid(meta_path: Path) -> bool:
    """Whether the files that ``meta_path`` describes are there with their recorded size and sha256."""
    if not meta_path.exists():
        return False
    try:
        records = json.loads(meta_path.read_text())["files"]
        paths = {meta_path.parent / file: record for file, record in records.items()}
    except (ValueError, KeyError, AttributeError):  # the description itself is damaged
        paths = None
    if paths and all(path.exists() and file_record(path) == record for path, record in paths.items()):
        return True
    warnings.warn(
        f"the token cache {meta_path.with_suffix('.*')} is damaged (its files or their description "
        "do not match the sizes and checksums recorded): rebuilding it",
        stacklevel=2,
    )
    return False


def write_token_split(documents: list[str], enc: tiktoken.Encoding, folder: Path, name: str) -> None:
    """Tokenize ``documents`` into ``folder/<name>.bin`` and ``.offsets.npy``, then describe them in ``.json``."""
    dtype = token_dtype(enc.n_vocab)
    lengths = write_tokens(documents, enc, folder / f"{name}.bin", dtype, desc=f"tokenizing {name}")
    with replaced_atomically(folder / f"{name}.offsets.npy") as file:
        np.save(file, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    files = [f"{name}.bin", f"{name}.offsets.npy"]
    meta = {"dtype": dtype.name, "files": {file: file_record(folder / file) for file in files}}
    with replaced_atomically(folder / f"{name}.json") as file:
        file.write(json.dumps(meta, indent=2).encode())


def write_tokens(documents: list[str], enc: tiktoken.Encoding, path: Path, dtype: np.dtype, desc: str) -> list[int]:
    """Write each document's tokens and ``<|endoftext|>`` to ``path``; return how many tokens each took."""
    lengths = []
    with replaced_atomically(path) as file, tqdm(total=len(documents), desc=desc, unit="doc") as progress:
        for start in range(0, len(documents), TOKENIZE_CHUNK):
            chunk = documents[start : start + TOKENIZE_CHUNK]
            rows = [ids + [enc.eot_token] for ids in enc.encode_ordinary_batch(chunk)]
            np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype).tofile(file)
            lengths += [len(row) for row in rows]
            progress.update(len(chunk))
    return lengths


def file_record(path: Path) -> dict[str, int | str]:
    """What the cache records of a file to notice when it changes: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Batching


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


def check_split(corpus: str, split: str, tokens: TokenSplit, context_length: int, vocab_size: int) -> None:
    """Raise when a split holds fewer than the ``context_length + 1`` tokens of one window, or a
    token id outside the vocabulary: checked once here, where the data enters, so that nothing
    checks it again at every step."""
    if len(tokens.tokens) < context_length + 1:
        raise ValueError(
            f"the {split} split of corpus {corpus!r} has {len(tokens.tokens)} tokens, fewer than "
            f"context_length + 1 = {context_length + 1}: use a smaller context_length or more data"
        )
    largest = int(tokens.tokens.max())
    if largest >= vocab_size:
        raise ValueError(
            f"the {split} split of corpus {corpus!r} holds token id {largest}, outside the tokenizer's "
            f"vocabulary of {vocab_size}: delete its token files in the cache (cache_dir/tokens) to rebuild them"
        )


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
    through ``set_epoch``) and how many batches the pass has handed out. Once restored, a pass of
    that same epoch skips as many batches, reading and dropping them; a pass of a later epoch
    (the checkpoint was saved at the end of an epoch) starts from the beginning. With a sampler
    whose order is fixed for each epoch (:class:`EpochSampler`), the resumed pass goes on with the
    batches the interrupted run would have trained on next, whatever the batching or the workers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = {"epoch": 0, "batches": 0}  # of the current pass
        self.resume_at: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self.resume_at["batches"] if self.resume_at and self.resume_at["epoch"] == epoch else 0
        self.resume_at = None
        self.position = {"epoch": epoch, "batches": 0}
        for batch in super().__iter__():
            self.position["batches"] += 1
            if self.position["batches"] > skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_at = dict(state_dict)


def evenly_spaced(dataset: Dataset, n: int) -> Dataset:
    """At most ``n`` items of ``dataset``, spread over all of it."""
    if n >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).astype(np.int64).tolist())


class GPTDataModule(L.LightningDataModule):
    """A corpus, its tokenizer and its batches for next-token training.

    Args:
        corpus: one of :data:`CORPORA`.
        path: for ``text``, a file, a folder of ``*.txt`` files or a glob; for ``shakespeare``, a
            local copy instead of downloading.
        tokenizer: a name that :func:`losslab.tokenizers.build_tokenizer` knows.
        vocab_size: for ``bpe``, counting the 256 bytes and ``<|endoftext|>``.
        ranks_path: for ``gpt2``, a local ``r50k_base.tiktoken`` instead of tiktoken's cache.
        context_length: tokens per row (``T``).
        batch_size: rows per batch.
        accumulate: micro-batches per training batch (gradient accumulation): an optimizer step
            trains on ``batch_size * accumulate`` rows per device.
        mode: ``packed`` or ``padded`` (see the module's docstring).
        val_fraction: the share of documents held out for validation.
        max_document_chars: for ``shakespeare`` and ``text``, paragraphs longer than this many
            characters are cut at line ends into documents of at most this size.
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
        ranks_path: str | None = None,
        context_length: int = 256,
        batch_size: int = 32,
        accumulate: int = 1,
        mode: str = "packed",
        val_fraction: float = 0.1,
        max_document_chars: int = MAX_DOCUMENT_CHARS,
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
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir).expanduser()
        self.tokenizer: tiktoken.Encoding | None = None
        self.token_bytes: Tensor | None = None  # (vocab_size,) bytes per token, for bits per byte
        self.tokenizer_fingerprint: str | None = None  # see losslab.tokenizers.tokenizer_fingerprint
        self.datasets: dict[str, Dataset] = {}

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError("the vocabulary is known once the tokenizer is built: call setup() first")
        return self.tokenizer.n_vocab

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        hp = self.hparams
        all_documents = load_documents(hp.corpus, hp.path, self.cache_dir, hp.max_document_chars)
        documents = split_documents(all_documents, hp.val_fraction)
        self.tokenizer = build_tokenizer(
            hp.tokenizer,
            vocab_size=hp.vocab_size,
            train_text=documents["train"],
            cache_dir=self.cache_dir / "tokenizers",
            ranks_path=hp.ranks_path,
        )
        self.token_bytes = torch.from_numpy(token_byte_lengths(self.tokenizer))
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        for split, docs in documents.items():
            name = f"{hp.corpus}-{split}-{text_digest([self.tokenizer_fingerprint, *docs])[:16]}"
            tokens = cached_token_split(docs, self.tokenizer, self.cache_dir / "tokens", name)
            check_split(hp.corpus, split, tokens, hp.context_length, self.tokenizer.n_vocab)
            self.datasets[split] = self.make_dataset(split, tokens)

    def make_dataset(self, split: str, tokens: TokenSplit) -> Dataset:
        context_length = self.hparams.context_length
        if self.hparams.mode == "padded":
            return DocumentRows(tokens.tokens, tokens.offsets, context_length)
        return PackedWindows(tokens.tokens, context_length, stride=1 if split == "train" else context_length)

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self.datasets["train"]
        if self.hparams.mode == "padded":
            sampler = EpochSampler(len(dataset), seed=self.hparams.seed)
        else:
            # an epoch draws as many windows as it takes to see about every token once
            n_windows = len(dataset) // self.hparams.context_length + 1
            sampler = EpochSampler(len(dataset), num_samples=n_windows, replacement=True, seed=self.hparams.seed)
        return self.loader(dataset, sampler, loader_class=ResumableDataLoader, accumulate=self.hparams.accumulate)

    def val_dataloader(self) -> DataLoader:
        dataset = self.datasets["val"]
        if self.hparams.val_batches is not None:
            dataset = evenly_spaced(dataset, self.hparams.val_batches * self.hparams.batch_size)
        return self.loader(dataset)

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
