"""Corpora stream: the same documents, splits and token files as when a corpus was read whole, in
memory that does not grow with the corpus."""

import io
import random
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from losslab.data import DataConfig, GPTDataModule, corpora, token_cache
from losslab.data.corpora import open_corpus, text_pieces
from losslab.data.documents import ParagraphCutter, cut_line, stream_paragraphs, training_sample
from losslab.data.token_cache import write_token_splits
from losslab.tokenizers import build_tokenizer, text_digest

# What the corpus was cut into before it streamed: these functions, given the whole text.
BLANK_LINES = re.compile(r"\n\s*\n")


def whole_text_paragraphs(text: str, max_chars: int) -> list[str]:
    return [
        piece for part in BLANK_LINES.split(text) for piece in whole_paragraph_pieces(part, max_chars) if piece.strip()
    ]


def whole_paragraph_pieces(paragraph: str, max_chars: int) -> list[str]:
    if len(paragraph) <= max_chars:
        return [paragraph]
    pieces, lines, size = [], [], 0
    for line in [part for whole in paragraph.split("\n") for part in cut_line(whole, max_chars)]:
        if lines and size + 1 + len(line) > max_chars:
            pieces.append("\n".join(lines))
            lines = []
        size = size + 1 + len(line) if lines else len(line)
        lines.append(line)
    pieces.append("\n".join(lines))
    return pieces


def whole_corpus_split(documents: list[str], val_fraction: float) -> dict[str, list[str]]:
    splits = {"train": [], "val": []}
    for i, document in enumerate(documents):
        splits["val" if int((i + 1) * val_fraction) > int(i * val_fraction) else "train"].append(document)
    if not splits["val"]:
        splits["val"].append(splits["train"].pop())
    return splits


def token_file_bytes(documents: list[str], enc) -> tuple[bytes, bytes]:
    """The ``.bin`` and ``.offsets.npy`` that tokenizing ``documents`` one by one gives."""
    rows = [enc.encode_ordinary(document) + [enc.eot_token] for document in documents]
    offsets = io.BytesIO()
    np.save(offsets, np.cumsum([0] + [len(row) for row in rows]).astype(np.int64))
    return np.array([token for row in rows for token in row], dtype=np.uint16).tobytes(), offsets.getvalue()


def make_corpus(path: Path, mib: float, seed: int = 0) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_corpus.py"), str(path), "--mib", str(mib), "--seed", str(seed)],
        check=True,
        capture_output=True,
    )
    return path


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
    return [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)])]


def test_streamed_paragraphs_are_those_of_the_whole_text():
    rng = random.Random(0)
    alphabet = ["a", "b", "word ", " ", "\n", "\n", "\t", "\r", "\n\n", " \n ", "\u3000", "\u2028", "é"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        max_chars = rng.randint(1, 12)
        assert list(stream_paragraphs(random_pieces(text, rng), max_chars)) == whole_text_paragraphs(text, max_chars)


def test_a_paragraph_of_any_length_is_cut_in_bounded_memory():
    rng = random.Random(1)
    lines = ["".join(rng.choice("ab ") for _ in range(rng.randint(0, 150))) for _ in range(3000)]
    paragraph = "\n".join(lines) + " " + "x" * 5000  # no blank line at all, and a line with no whitespace
    cutter = ParagraphCutter(100)
    pieces = []
    for start in range(0, len(paragraph), 997):
        pieces += cutter.add(paragraph[start : start + 997])
        assert len(cutter.text) <= 1100 and cutter.size <= 100  # the last line's end, the piece being filled
    assert pieces + cutter.finish() == whole_paragraph_pieces(paragraph, 100)


def test_pydoc_token_files_and_bpe_are_those_of_the_whole_corpus(tmp_path):
    corpus = open_corpus("pydoc")
    splits = whole_corpus_split(list(corpus.documents()), 0.1)
    enc = build_tokenizer("bpe", vocab_size=512, train_text=splits["train"])
    assert_token_files(corpus, enc, splits, tmp_path)
    assert_same_bpe(corpus, splits["train"], tmp_path)


def test_shakespeare_token_files_and_bpe_are_those_of_the_whole_corpus(shakespeare_path, tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "READ_BYTES", 4099)  # pieces that end anywhere: in a word, a separator
    corpus = open_corpus("shakespeare", shakespeare_path)
    splits = whole_corpus_split(whole_text_paragraphs(shakespeare_path.read_text(), 4096), 0.1)
    assert_token_files(corpus, build_tokenizer("bytes"), splits, tmp_path)
    assert_same_bpe(corpus, splits["train"], tmp_path)


def assert_token_files(corpus, enc, splits, folder):
    write_token_splits(corpus, enc, 0.1, folder, {"train": "train", "val": "val"})
    for split, documents in splits.items():
        tokens, offsets = token_file_bytes(documents, enc)
        assert (folder / f"{split}.bin").read_bytes() == tokens
        assert (folder / f"{split}.offsets.npy").read_bytes() == offsets


def assert_same_bpe(corpus, train_documents, folder):
    assert training_sample(corpus.documents(), 0.1, 100_000_000) == train_documents  # the cached name stays
    first = training_sample(corpus.documents(), 0.1, 1000)
    assert first == train_documents[: len(first)] and sum(len(doc.encode()) for doc in first[:-1]) < 1000
    assert sum(len(doc.encode()) for doc in first) >= 1000


def test_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "READ_BYTES", 1 << 16)
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 1 << 16)
    monkeypatch.setattr(token_cache, "available_cores", lambda: 2)
    enc = build_tokenizer("bytes")
    peaks = {}
    for mib in (2, 8):
        corpus = open_corpus("text", make_corpus(tmp_path / f"{mib}.txt", mib))
        tracemalloc.start()
        write_token_splits(corpus, enc, 0.1, tmp_path, {"train": f"train{mib}", "val": f"val{mib}"})
        peaks[mib] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert (tmp_path / "train8.bin").stat().st_size > 14 * 2**20  # two bytes a token
    assert peaks[8] < 4 * 2**20 and peaks[8] < peaks[2] + 2**19, peaks


def test_text_is_decoded_in_pieces_as_it_was_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "READ_BYTES", 3)  # every multi-byte character is cut somewhere
    path = tmp_path / "mixed.txt"
    data = "héllo wörld €uro 😀 ".encode() * 3 + b"bad \xff\xfe here \xe2\x82 cut " + "ok ✓".encode() + b"\xc3"
    path.write_bytes(data)
    bad_byte = data.index(b"\xff")
    with pytest.warns(UserWarning, match=rf"mixed.txt is not valid UTF-8 \(first bad byte at offset {bad_byte}\)"):
        text = "".join(text_pieces(path))
    assert text == data.decode("utf-8", errors="replace")
    path.write_bytes(data[: data.index(b"bad")])
    assert "".join(text_pieces(path)) == data[: data.index(b"bad")].decode()


def test_token_files_are_rebuilt_when_a_file_changes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one\n\ntwo\n\nthree\n")
    first = open_corpus("text", path).identity()
    assert open_corpus("text", path).identity() == first
    path.write_text("one\n\ntwo\n\nthree\n")  # the same bytes, written again: a new modification time
    assert open_corpus("text", path).identity() != first
    assert open_corpus("text", path, max_document_chars=10).identity() != open_corpus("text", path).identity()


def test_progress_is_logged_in_lines_when_stderr_is_not_a_terminal(tmp_path, capfd, caplog):
    caplog.set_level("INFO", logger="losslab.data.token_cache")
    write_token_splits(open_corpus("pydoc"), build_tokenizer("bytes"), 0.1, tmp_path, {"train": "t", "val": "v"})
    assert "\r" not in capfd.readouterr().err  # no frames of a redrawn bar in a log
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("tokenizing pydoc:   0% of ") and lines[0].endswith("B/s]")
    assert re.fullmatch(r"t: [\d,]+ tokens in [\d,]+ documents", lines[-2])


def test_bpe_learns_from_the_first_bpe_train_bytes_of_the_training_split(tmp_path):
    options = dict(tokenizer="bpe", vocab_size=300, context_length=8, cache_dir=tmp_path)
    whole = GPTDataModule(DataConfig(**options))
    whole.setup()
    splits = whole_corpus_split(list(open_corpus("pydoc").documents()), 0.1)
    assert whole.tokenizer.name == f"bpe300-{text_digest(splits['train'])[:16]}"
    sampled = GPTDataModule(DataConfig(**options, bpe_train_bytes=20_000))
    sampled.setup()
    assert sampled.tokenizer.name != whole.tokenizer.name
    with pytest.raises(ValueError, match="bpe_train_bytes=0: the BPE.s training sample must be an int >= 1 bytes"):
        DataConfig(bpe_train_bytes=0)
