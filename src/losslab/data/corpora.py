"""Corpora: where documents come from, read as a stream so that a corpus of any size fits.

- ``pydoc``: the English reference documentation that every CPython carries
  (``pydoc_data.topics``), one topic per document, whatever its length;
- ``shakespeare``: tiny Shakespeare, downloaded once (or read from ``path``), one speech per
  document;
- ``text``: your own UTF-8 files (``path``: a file, a folder of ``*.txt`` files or a glob), one
  paragraph per document;
- ``jsonl``: JSON Lines (``path``: a file, a folder of ``*.jsonl`` and ``*.jsonl.gz`` files or a
  glob), one record per document: its ``text_field``, whole;
- ``parquet``: Parquet files (``path``: a file, a folder of ``*.parquet`` files or a glob, read
  with pyarrow), one row per document: its ``text_field`` column, whole.

Speeches and paragraphs are cut by :mod:`losslab.data.documents`. Records and rows are kept
whole, as their author made them (:mod:`losslab.data.records`); one whose text is empty, blank or
null is skipped.

A corpus is a :class:`Corpus`: a new one is a subclass here, a line in :func:`open_corpus` and
its ``conf/data/<name>.yaml``.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import urllib.request
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from pydoc_data.topics import topics

from losslab.data.documents import MAX_DOCUMENT_CHARS, stream_paragraphs
from losslab.data.records import (
    as_documents,
    check_text_column,
    gzip_lines,
    import_parquet,
    parquet_errors,
    record_text,
)
from losslab.files import DataError
from losslab.tokenizers import text_digest

CORPORA = ("pydoc", "shakespeare", "text", "jsonl", "parquet")
PATH_CORPORA = ("text", "jsonl", "parquet")  # read from data.path, which they need
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
READ_BYTES = 1 << 20  # a text file is read this many bytes at a time
BINARY_SNIFF_BYTES = 8000  # a NUL byte in a text file's first 8,000 bytes makes it binary (git's rule)
CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])  # all but tab, newlines, form feed
BINARY_CONTROL_SHARE = 0.3  # or more than this share of them control characters (as Perl's -B tells)
PARQUET_ROWS = 1024  # rows read at a time
Progress = Callable[[int], object]  # told how many more bytes of the corpus were read


def no_progress(n_bytes: int) -> None:
    """A :data:`Progress` that shows nothing."""


class Corpus(ABC):
    """A corpus: its documents, read in order as a stream, and what they depend on."""

    name: str

    def documents(self, progress: Progress = no_progress) -> Iterator[str]:
        """The documents, in order; ``progress`` is told of the bytes read as they are read.

        Raises ValueError when there are none.
        """
        empty = True
        for document in self.read(progress):
            empty = False
            yield document
        if empty:
            raise DataError(
                f"corpus {self.name!r} ({self.where()}) holds no text: point data.path at files with text in them"
            )

    @abstractmethod
    def read(self, progress: Progress) -> Iterator[str]:
        """The documents, as :meth:`documents` gives them."""

    @abstractmethod
    def size(self) -> int:
        """The bytes that reading the documents reads, for a progress bar."""

    @abstractmethod
    def identity(self) -> str:
        """What the documents depend on: two corpora of the same identity give the same documents."""

    @abstractmethod
    def where(self) -> str:
        """Where the documents come from, for messages."""


class Pydoc(Corpus):
    """CPython's reference documentation, a topic per document, sorted by the topics' names."""

    name = "pydoc"

    def read(self, progress: Progress) -> Iterator[str]:
        for name in sorted(topics):
            progress(len(topics[name].encode()))
            yield topics[name]

    def size(self) -> int:
        return sum(len(topic.encode()) for topic in topics.values())

    def identity(self) -> str:
        return text_digest(topics[name] for name in sorted(topics))  # the topics change with Python's version

    def where(self) -> str:
        return "pydoc_data.topics"


class Files(Corpus):
    """A corpus read from ``files``, in that order, which identify it by their paths, sizes and
    modification times: a file changed in place (or touched) gives new documents, and a copy of
    the same bytes elsewhere is another corpus."""

    def __init__(self, name: str, files: list[Path], options: str) -> None:
        self.name = name
        self.files = files
        self.options = options  # those of the reader's options that change the documents

    def size(self) -> int:
        return sum(file.stat().st_size for file in self.files)

    def identity(self) -> str:
        stats = [(str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns) for file in self.files]
        return json.dumps([self.name, self.options, stats])

    def where(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files from {self.files[0]} on"


class TextFiles(Files):
    """UTF-8 text files, a paragraph per document (see :mod:`losslab.data.documents`)."""

    def __init__(self, name: str, files: list[Path], max_document_chars: int = MAX_DOCUMENT_CHARS) -> None:
        super().__init__(name, files, f"max_document_chars={max_document_chars}")
        self.max_document_chars = max_document_chars

    def read(self, progress: Progress) -> Iterator[str]:
        for file in self.files:
            yield from stream_paragraphs(text_pieces(file, progress), self.max_document_chars)


class JsonLines(Files):
    """JSON Lines files (gzip-compressed when their name ends in ``.gz``), a record per document:
    the string in its ``text_field``."""

    def __init__(self, files: list[Path], text_field: str) -> None:
        super().__init__("jsonl", files, f"text_field={text_field}")
        self.text_field = text_field

    def read(self, progress: Progress) -> Iterator[str]:
        for file in self.files:
            check = BinaryRecords()
            with open(file, "rb") as raw:
                lines = gzip_lines(raw, file) if file.suffix == ".gz" else raw
                reported = 0  # bytes of the file read, compressed or not
                for number, line in enumerate(lines, start=1):
                    record = line.strip()
                    if record:  # a blank line, at the end of a file say, holds no record
                        text = record_text(record, self.text_field, file, number)
                        yield from check(as_documents(text, f"{file} line {number}"), f"{file} line {number}")
                    if raw.tell() - reported >= READ_BYTES:
                        progress(raw.tell() - reported)
                        reported = raw.tell()
                progress(raw.tell() - reported)


class ParquetFiles(Files):
    """Parquet files, a row per document: the string in its ``text_field`` column."""

    def __init__(self, files: list[Path], text_field: str) -> None:
        super().__init__("parquet", files, f"text_field={text_field}")
        self.text_field = text_field

    def read(self, progress: Progress) -> Iterator[str]:
        parquet = import_parquet()
        for file in self.files:
            check = BinaryRecords()
            with parquet_errors(file):
                table = parquet.ParquetFile(file)
            check_text_column(table.schema_arrow, self.text_field, file)
            size, n_rows = file.stat().st_size, table.metadata.num_rows
            rows = reported = 0  # progress is told of the file's bytes in proportion to the rows read
            batches = table.iter_batches(batch_size=PARQUET_ROWS, columns=[self.text_field])
            while True:
                with parquet_errors(file):
                    batch = next(batches, None)
                if batch is None:
                    break
                for row, text in enumerate(batch.column(0).to_pylist(), start=rows):
                    yield from check(as_documents(text, f"{file} row {row}"), f"{file} row {row}")
                rows += batch.num_rows
                progress(size * rows // n_rows - reported)
                reported = size * rows // n_rows
            progress(size - reported)  # all of it, even with no rows


def binary_start(head: bytes) -> str | None:
    """Why text whose first :data:`BINARY_SNIFF_BYTES` bytes are ``head`` is binary, not text (an image,
    an archive, a file of zeros): a NUL byte among them, as git and grep tell, or mostly control
    characters, as Perl does; None for text."""
    head = head[:BINARY_SNIFF_BYTES]
    nul = head.find(b"\0")
    if nul >= 0:
        return f"a NUL byte at offset {nul}, within its first {BINARY_SNIFF_BYTES:,} bytes"
    controls = len(head) - len(head.translate(None, CONTROL_BYTES))
    if controls > BINARY_CONTROL_SHARE * len(head):
        return f"control characters in {controls:,} of its first {len(head):,} bytes"
    return None


class BinaryRecords:
    """A file's records checked as a text file is (:func:`text_pieces`): one whose first record of text
    is binary (:func:`binary_start`) is refused, a later binary record kept with a warning, once a file."""

    def __init__(self) -> None:
        self.first = True
        self.warned = False

    def __call__(self, documents: list[str], where: str) -> list[str]:
        """``documents``, a record's (:func:`losslab.data.records.as_documents`), after the check."""
        reason = binary_start(documents[0].encode(errors="replace")) if documents else None
        if reason and self.first:
            raise DataError(f"{where} is binary, not text ({reason}): give records of text (UTF-8)")
        if reason and not self.warned:
            warnings.warn(
                f"{where} holds binary, not text ({reason}): kept; remove it if the file is damaged", stacklevel=3
            )
            self.warned = True
        self.first = self.first and not documents
        return documents


def text_pieces(path: Path, progress: Progress = no_progress) -> Iterator[str]:
    """The text of ``path`` as UTF-8, read :data:`READ_BYTES` bytes at a time; invalid bytes
    become U+FFFD, with a warning naming the file and the first of them.

    A binary file is refused: one whose first bytes are binary (:func:`binary_start`). NUL bytes
    further on are kept, with a warning: text with a stray NUL is still text, and a corpus is often
    too large to fail for one at its end.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the next block in the file
    nul_warned = False
    with open(path, "rb") as file:
        while True:
            block = file.read(READ_BYTES)
            reason = binary_start(block) if offset == 0 else None
            if reason:
                raise DataError(f"{path} is binary, not text ({reason}): give text files in data.path (UTF-8)")
            nul = block.find(b"\0")
            if nul >= 0 and not nul_warned:
                warnings.warn(
                    f"{path} holds NUL bytes (the first at offset {nul + offset}), which text does not: they "
                    "are kept as characters; remove them if the file is damaged",
                    stacklevel=2,
                )
                nul_warned = True
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                # the error's offsets count the bytes of a character that the previous block cut,
                # which the decoder still holds
                bad_byte = offset - len(decoder.getstate()[0]) + error.start
                warnings.warn(
                    f"{path} is not valid UTF-8 (first bad byte at offset {bad_byte}): its undecodable bytes "
                    "were replaced by U+FFFD; convert the file to UTF-8 (e.g. with iconv) to keep them",
                    stacklevel=2,
                )
                decoder.errors = "replace"  # for this block again, and the rest of the file
                text = decoder.decode(block, final=not block)
            progress(len(block))
            yield text
            if not block:
                return
            offset += len(block)


def corpus_files(path: str | Path, patterns: tuple[str, ...]) -> list[Path]:
    """The files that ``path`` names: itself, the files below a folder that match ``patterns``
    (``*.txt``), or a glob's matches; sorted."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted({file for pattern in patterns for file in path.rglob(pattern) if file.is_file()})
        if not files:
            names = " or ".join(patterns)
            raise DataError(f"folder {path} holds no {names} files: put the corpus in {names} files or give a glob")
        return files
    if path.exists():  # reading a FIFO waits for a writer, a device may never end
        raise DataError(f"corpus path {path} is not a regular file (a FIFO, socket or device): set data.path to a file")
    if not any(char in str(path) for char in "*?["):
        raise DataError(f"corpus path {path} does not exist: set data.path to a file, a folder or a glob")
    files = sorted(Path(file) for file in glob.glob(str(path), recursive=True) if Path(file).is_file())
    if not files:
        raise DataError(f"glob {path} matches no files: check data.path")
    return files


def download_shakespeare(folder: Path) -> Path:
    """tiny Shakespeare in ``folder``, downloaded unless a copy with the right sha256 is there."""
    path = folder / "tinyshakespeare.txt"
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == SHAKESPEARE_SHA256:
        return path
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except OSError as error:
        raise DataError(
            f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({error}): "
            "download it yourself and set data.path=<your local copy>"
        ) from None
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise DataError(
            f"the file downloaded from {SHAKESPEARE_URL} is not tiny Shakespeare (its sha256 differs): "
            "set data.path=<a local copy> instead"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def open_corpus(
    corpus: str,
    path: str | Path | None = None,
    cache_dir: str | Path = "cache",
    max_document_chars: int = MAX_DOCUMENT_CHARS,
    text_field: str = "text",
) -> Corpus:
    """The corpus called ``corpus``, one of :data:`CORPORA`; ``cache_dir`` keeps downloads.

    Its files are found (or downloaded) here, so that a wrong ``path`` fails at once; they are
    read when its documents are.
    """
    if corpus == "pydoc":
        return Pydoc()
    if corpus == "shakespeare" and path is None:
        return TextFiles(corpus, [download_shakespeare(Path(cache_dir) / "corpora")], max_document_chars)
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}: choose one of {', '.join(CORPORA)}")
    if path is None:
        raise DataError(f"the {corpus} corpus needs data.path=<a file, a folder of {corpus} files or a glob>")
    if corpus in ("shakespeare", "text"):
        return TextFiles(corpus, corpus_files(path, ("*.txt",)), max_document_chars)
    if corpus == "jsonl":
        return JsonLines(corpus_files(path, ("*.jsonl", "*.jsonl.gz")), text_field)
    return ParquetFiles(corpus_files(path, ("*.parquet",)), text_field)


def load_documents(
    corpus: str,
    path: str | Path | None = None,
    cache_dir: str | Path = "cache",
    max_document_chars: int = MAX_DOCUMENT_CHARS,
    text_field: str = "text",
) -> list[str]:
    """Every document of a corpus (see :func:`open_corpus`), in memory: for small corpora."""
    return list(open_corpus(corpus, path, cache_dir, max_document_chars, text_field).documents())
