"""The token cache: each split of a corpus tokenized once, into files that training maps.

In ``cache_dir/tokens``, ``<name>.bin`` holds a split's documents' tokens back to back, each
followed by ``<|endoftext|>``; ``<name>.offsets.npy`` where each document starts, then the end;
``<name>.json`` the token dtype and the size and sha256 of both files, checked on load with the
offsets against the token file's length: a split whose files disagree in any way (or are not
regular files) is written again, with a warning that says what is wrong. ``<name>`` is the corpus,
the split and a hash of what the tokens depend on: the corpus's identity (see
:meth:`Corpus.identity`), the validation share and the tokenizer's tokens.

The corpus is read once for both splits, as a stream: documents go to their split as they come
(:func:`~losslab.data.documents.assign_splits`), are tokenized in batches on every core (tiktoken
releases the GIL) and written as they come back, in order. Memory holds a few batches per core,
whatever the corpus's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tiktoken
from tqdm import tqdm

from losslab.data.corpora import Corpus
from losslab.data.documents import SPLITS, assign_splits
from losslab.files import replaced_atomically
from losslab.tokenizers import text_digest, tokenizer_fingerprint

# Part of every token file's name: change it when the same corpus, options and tokenizer would
# give other token files (new document or split rules, another file format).
RULES_VERSION = "2"
BATCH_CHARS = 1 << 18  # characters of documents per tokenizing task
LOG_EVERY_S = 30  # where stderr is not a terminal, a progress line this often

log = logging.getLogger(__name__)


@dataclass
class TokenSplit:
    """A split as tokens: its documents back to back, each followed by ``<|endoftext|>``."""

    tokens: np.ndarray  # a read-only memmap of the split's token file
    offsets: np.ndarray  # (n_documents + 1,): where each document starts, then the end


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if n_vocab - 1 <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def cached_token_splits(
    corpus: Corpus, enc: tiktoken.Encoding, val_fraction: float, folder: Path
) -> dict[str, TokenSplit]:
    """The tokens of each split of ``corpus`` from ``folder``; the splits whose files are absent or
    damaged (see :func:`cache_problem`) are written first, in one pass over the corpus."""
    key = text_digest([RULES_VERSION, corpus.identity(), repr(val_fraction), tokenizer_fingerprint(enc)])
    names = {split: f"{corpus.name}-{split}-{key[:16]}" for split in SPLITS}
    dtype = token_dtype(enc.n_vocab)
    to_write = {split: name for split, name in names.items() if not cache_is_valid(folder, name, dtype)}
    if to_write:
        write_token_splits(corpus, enc, val_fraction, folder, to_write)
    return {split: read_token_split(folder, name) for split, name in names.items()}


def cache_files(folder: Path, name: str) -> list[Path]:
    """The files of a cached split: its tokens, its offsets and their description."""
    return [folder / f"{name}{suffix}" for suffix in (".bin", ".offsets.npy", ".json")]


def read_token_split(folder: Path, name: str) -> TokenSplit:
    """The split that ``folder/<name>.*`` holds."""
    meta = json.loads((folder / f"{name}.json").read_text())
    return TokenSplit(
        tokens=np.memmap(folder / f"{name}.bin", dtype=meta["dtype"], mode="r"),
        offsets=np.load(folder / f"{name}.offsets.npy"),
    )


def cache_is_valid(folder: Path, name: str, dtype: np.dtype) -> bool:
    """Whether ``folder/<name>.*`` holds a whole split of tokens of ``dtype``. A damaged one gets a
    warning that says what is wrong with it, and is written anew (a folder at one of its names is
    removed first: renaming a file over it would fail). Without a description it is absent (or another
    process is writing it), and written anew without a word."""
    if not os.path.lexists(folder / f"{name}.json"):
        return False
    try:
        problem = cache_problem(folder, name, dtype)
    except (OSError, ValueError) as error:  # unreadable, not JSON, not an .npy file...
        problem = f"{type(error).__name__}: {error}"
    if problem is None:
        return True
    warnings.warn(f"the token cache {folder / name}.* is damaged ({problem}): rebuilding it", stacklevel=2)
    for path in cache_files(folder, name):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    return False


def cache_problem(folder: Path, name: str, dtype: np.dtype) -> str | None:
    """What is wrong with the cached split ``folder/<name>.*``, if anything: its description must be a
    JSON object giving ``dtype``, and the size and sha256 of exactly its two files, which must be
    regular files of those sizes and checksums; the offsets must start at 0, never decrease and end
    at the number of tokens in the token file. Raises OSError or ValueError where a file cannot be
    read as what it should be."""
    tokens, offsets, description = cache_files(folder, name)
    missing = [path.name for path in (tokens, offsets, description) if not path.is_file()]
    if missing:
        return f"{', '.join(missing)} missing or not a regular file"
    meta = json.loads(description.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return "its description is not an object with the files' records"
    if meta.get("dtype") != dtype.name:
        return f"its description gives the tokens as {meta.get('dtype')!r}, where this tokenizer's are {dtype.name}"
    if sorted(meta["files"]) != sorted([tokens.name, offsets.name]):
        return f"its description records {sorted(meta['files'])}, not its two files"
    changed = [file for file, record in meta["files"].items() if file_record(folder / file) != record]
    if changed:
        return f"{', '.join(changed)}: not the size and sha256 recorded"
    ends = np.load(offsets, allow_pickle=False)
    n_tokens, remainder = divmod(tokens.stat().st_size, dtype.itemsize)
    if ends.dtype != np.int64 or ends.ndim != 1 or len(ends) < 2 or ends[0] != 0 or (np.diff(ends) < 0).any():
        return "its offsets are not where documents start"
    if remainder or ends[-1] != n_tokens:
        return f"its offsets end at token {ends[-1]:,}, its token file holds {tokens.stat().st_size:,} bytes of {dtype.name}"
    return None


def write_token_splits(
    corpus: Corpus, enc: tiktoken.Encoding, val_fraction: float, folder: Path, names: dict[str, str]
) -> None:
    """Tokenize the documents of the splits in ``names`` into ``folder/<name>.*``, in one pass over
    ``corpus``; the documents of the other split are read and dropped."""
    dtype = token_dtype(enc.n_vocab)
    with ExitStack() as stack:
        outputs = {split: stack.enter_context(token_files(folder, name, dtype)) for split, name in names.items()}
        progress = stack.enter_context(progress_bar(corpus.size(), f"tokenizing {corpus.name}"))
        documents = assign_splits(corpus.documents(progress.update), val_fraction)
        wanted = ((split, document) for split, document in documents if split in outputs)
        for split, tokens, lengths in tokenized(document_batches(wanted), enc, dtype):
            outputs[split].write(tokens, lengths)
    for split, output in outputs.items():
        log.info(f"{names[split]}: {output.n_tokens:,} tokens in {output.n_documents:,} documents")


def document_batches(documents: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """``(split, batch)``: the documents of each split in order, about :data:`BATCH_CHARS`
    characters of them at a time."""
    batch: dict[str, list[str]] = {split: [] for split in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    for split, document in documents:
        batch[split].append(document)
        size[split] += len(document)
        if size[split] >= BATCH_CHARS:
            yield split, batch[split]
            batch[split], size[split] = [], 0
    yield from ((split, rest) for split, rest in batch.items() if rest)


def tokenized(
    batches: Iterable[tuple[str, list[str]]], enc: tiktoken.Encoding, dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(split, tokens, lengths)`` for each batch (see :func:`encode_documents`), in order.

    The batches are tokenized on every core, at most two per core at a time: reading the next
    batches goes on while the first are tokenized, and memory holds no more of them.
    """
    workers = available_cores()
    pending: deque[tuple[str, Future]] = deque()
    with ThreadPoolExecutor(workers) as pool:
        for split, documents in batches:
            pending.append((split, pool.submit(encode_documents, enc, documents, dtype)))
            if len(pending) >= 2 * workers:
                split, result = pending.popleft()
                yield split, *result.result()
        for split, result in pending:
            yield split, *result.result()


def encode_documents(enc: tiktoken.Encoding, documents: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of ``documents``, each followed by ``<|endoftext|>``, and how many each took.

    ``encode_to_numpy`` with no special tokens gives ``encode_ordinary``'s tokens, as an array
    rather than a list of Python ints.
    """
    end = np.array([enc.eot_token], dtype=np.uint32)
    rows = [enc.encode_to_numpy(document, disallowed_special=()) for document in documents]
    tokens = np.concatenate([part for row in rows for part in (row, end)]).astype(dtype)
    return tokens, np.array([len(row) + 1 for row in rows], dtype=np.int64)


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def token_files(folder: Path, name: str, dtype: np.dtype) -> Iterator[TokenWriter]:
    """A writer of the token files ``folder/<name>.*``. When the block ends without an error, the
    files are put in place and then described (``.json``, last: a description always describes
    whole files); else nothing is left."""
    with replaced_atomically(folder / f"{name}.bin") as tokens, tempfile.TemporaryFile(dir=folder) as offsets:
        writer = TokenWriter(tokens, offsets)
        yield writer
        with replaced_atomically(folder / f"{name}.offsets.npy") as file:
            writer.save_offsets(file)
    files = [f"{name}.bin", f"{name}.offsets.npy"]
    meta = {"dtype": dtype.name, "files": {file: file_record(folder / file) for file in files}}
    with replaced_atomically(folder / f"{name}.json") as file:
        file.write(json.dumps(meta, indent=2).encode())


class TokenWriter:
    """Appends documents to a split's token file, and where each ends to a temporary file: the
    offsets grow with the corpus too, so they wait on disk until :meth:`save_offsets`."""

    def __init__(self, tokens: BinaryIO, offsets: BinaryIO) -> None:
        self.tokens = tokens
        self.offsets = offsets
        self.n_tokens = self.n_documents = 0
        offsets.write(np.zeros(1, dtype=np.int64).tobytes())  # the first document starts at 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: their ``tokens`` back to back, and how many each took."""
        tokens.tofile(self.tokens)
        self.offsets.write((self.n_tokens + np.cumsum(lengths)).tobytes())
        self.n_tokens += len(tokens)
        self.n_documents += len(lengths)

    def save_offsets(self, file: BinaryIO) -> None:
        """Write the offsets to ``file`` as ``np.save`` writes an int64 array."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(file, {**header, "shape": (self.n_documents + 1,)})
        self.offsets.seek(0)
        shutil.copyfileobj(self.offsets, file)


def progress_bar(total: int, desc: str) -> tqdm:
    """A progress bar of bytes read: tqdm's bar in a terminal; elsewhere (CI, output sent to a
    file), where the frames of a redrawn bar would fill the log, a log line every
    :data:`LOG_EVERY_S` seconds."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
    return ProgressLines(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        mininterval=LOG_EVERY_S,
        maxinterval=LOG_EVERY_S,
        leave=False,
        bar_format="{desc}: {percentage:3.0f}% of {total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
    )


class ProgressLines(tqdm):
    """tqdm whose every display is a log line (tqdm's documented way to show progress elsewhere)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # closing, with leave=False: a log has nothing to clear
            return False
        log.info(self.format_meter(**self.format_dict))
        return True


def file_record(path: Path) -> dict[str, int | str]:
    """What the cache records of a file to notice when it changes: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
