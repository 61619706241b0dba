"""Documents: how text is cut into them, and which of them go to validation, as they stream by.

A text is cut at blank lines into paragraphs; a paragraph longer than ``max_chars`` characters is
cut at line ends into pieces of at most that many (a single longer line at whitespace), so that
text without blank lines still makes many documents. Every ``1 / val_fraction``-th document goes
to validation. Both rules read their input once, in order, and hold little of it at a time: a
corpus of any size streams through them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from losslab.files import DataError

MAX_DOCUMENT_CHARS = 4096  # above tiny Shakespeare's longest speech (3,080), which stays whole
SPLITS = ("train", "val")
BLANK_LINES = re.compile(r"\n\s*\n")
LAST_WHITESPACE = re.compile(r"\s(?=\S*$)")


def paragraphs(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """The blank-line separated parts of ``text`` that hold more than whitespace, those longer than
    ``max_chars`` characters cut into pieces (see :class:`ParagraphCutter`)."""
    return list(stream_paragraphs([text], max_chars))


def stream_paragraphs(pieces: Iterable[str], max_chars: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """The :func:`paragraphs` of the text that ``pieces`` make up, read piece by piece.

    A blank-line separator is known to be whole once a character that is not whitespace follows
    it, so each piece is split up to its last such character, and the whitespace after it waits
    for the next piece. The paragraph that a piece ends in goes on in the next one: a
    :class:`ParagraphCutter` holds it, which keeps at most a few times ``max_chars`` of it.
    """
    cutter = ParagraphCutter(max_chars)
    whitespace = ""  # the end of the text so far, which may be the beginning of a separator
    for piece in pieces:
        text = whitespace + piece
        end = len(text.rstrip())
        yield from split_paragraphs(text[:end], cutter)
        whitespace = text[end:]
    yield from split_paragraphs(whitespace, cutter)
    yield from with_text(cutter.finish())


def split_paragraphs(text: str, cutter: ParagraphCutter) -> Iterator[str]:
    """The pieces of the paragraphs that ``text`` completes. Of its blank-line separated parts, the
    first goes on the paragraph that ``cutter`` holds, and the last stays in ``cutter``: the text
    after ``text`` may go on with it."""
    first, *others = BLANK_LINES.split(text)
    yield from with_text(cutter.add(first))
    for paragraph in others:
        yield from with_text(cutter.finish())
        yield from with_text(cutter.add(paragraph))


def with_text(pieces: list[str]) -> list[str]:
    """The ``pieces`` that hold more than whitespace."""
    return [piece for piece in pieces if piece.strip()]


class ParagraphCutter:
    """Cuts a paragraph, given in parts, into pieces of at most ``max_chars`` characters.

    A paragraph of at most ``max_chars`` stays whole. A longer one is cut at line ends: each piece
    takes the next lines while they fit, and a line longer than ``max_chars`` is first cut by
    :func:`cut_line`. Lines are taken in order and never given back, so a piece is final as soon
    as the next line does not fit in it: the cutter holds the piece being filled and the end of
    the last line, whatever the paragraph's length.
    """

    def __init__(self, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError(f"max_document_chars={max_chars} must be at least 1 character")
        self.max_chars = max_chars
        self.text = ""  # the paragraph's text not yet cut into lines
        self.lines: list[str] = []  # the lines of the piece being filled
        self.size = 0  # its characters, with the newlines between its lines

    def add(self, text: str) -> list[str]:
        """The pieces that ``text``, the paragraph's next part, completes."""
        self.text += text
        if self.is_whole():
            return []
        parts = self.cut_lines()
        self.text = parts.pop()  # the end of the last line, which the next part may go on
        return self.take(parts)

    def finish(self) -> list[str]:
        """The paragraph's last pieces; the cutter is then empty, ready for the next paragraph."""
        if self.is_whole():
            pieces = [self.text]
        else:
            pieces = self.take(self.cut_lines())
            pieces.append("\n".join(self.lines))
        self.text, self.lines, self.size = "", [], 0
        return pieces

    def is_whole(self) -> bool:
        """Whether the paragraph so far fits in one piece: most never need cutting into lines."""
        return not self.lines and len(self.text) <= self.max_chars

    def cut_lines(self) -> list[str]:
        """The lines of the text not cut yet, those longer than ``max_chars`` cut by :func:`cut_line`."""
        return [part for line in self.text.split("\n") for part in cut_line(line, self.max_chars)]

    def take(self, lines: list[str]) -> list[str]:
        """Put ``lines`` into the piece being filled, in order; return the pieces they fill."""
        full = []
        for line in lines:
            if self.lines and self.size + 1 + len(line) > self.max_chars:  # 1: the newline before the line
                full.append("\n".join(self.lines))
                self.lines, self.size = [], 0
            self.size += 1 + len(line) if self.lines else len(line)
            self.lines.append(line)
        return full


def cut_line(line: str, max_chars: int) -> list[str]:
    """``line`` in pieces of at most ``max_chars`` characters, each cut at the last whitespace that
    keeps it within the maximum (that whitespace is dropped), or at the maximum when there is none.

    Every piece but the last depends only on the line's first ``max_chars + 1`` characters from
    where it starts, so the pieces of a line's beginning are those of the whole line but the last.
    """
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


def assign_splits(documents: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
    """``(split, document)`` for each of ``documents``: document ``i`` goes to val when
    ``i * val_fraction`` crosses an integer, so val gets every ``1 / val_fraction``-th document,
    spread over the corpus. A corpus of fewer documents than ``1 / val_fraction``, where no ``i``
    crosses one, gives val its last.

    Each document comes out as soon as its split is known, in order within each split: a val
    document at once, a train document when the next one comes (the last one is val's when the
    stream ends with none in val).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    held = None  # the latest train document
    n_documents = n_val = 0
    for i, document in enumerate(documents):
        n_documents += 1
        if int((i + 1) * val_fraction) > int(i * val_fraction):
            n_val += 1
            yield "val", document
        else:
            if held is not None:
                yield "train", held
            held = document
    if n_documents < 2:
        raise DataError(
            f"{n_documents} document(s) cannot be split into train and val, which need one each: "
            "separate documents with blank lines, add more text, or lower data.max_document_chars "
            "(paragraphs longer than it are cut into several documents)"
        )
    yield ("train" if n_val else "val"), held


def split_documents(documents: Iterable[str], val_fraction: float) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}``, as :func:`assign_splits` assigns ``documents``."""
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split, document in assign_splits(documents, val_fraction):
        splits[split].append(document)
    return splits


def training_sample(documents: Iterable[str], val_fraction: float, max_bytes: int) -> list[str]:
    """The first training documents of ``documents``, in order, until they hold ``max_bytes``
    bytes of UTF-8 (the one that reaches it included): all of them when the train split is smaller."""
    sample = []
    size = 0
    for split, document in assign_splits(documents, val_fraction):
        if split == "train":
            if size >= max_bytes:
                break
            sample.append(document)
            size += len(document.encode())
    return sample
