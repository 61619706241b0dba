"""Write a generated text corpus of a given size, to measure the data pipeline on more text than fits in memory.

Random sentences from the words of CPython's documentation (``pydoc_data.topics``), drawn with
their frequencies there; one sentence per line, 1 to 12 sentences per paragraph, paragraphs
separated by blank lines, and one paragraph in 50 of 60 to 120 sentences (longer than
``data.max_document_chars``, so that it is cut into several documents). The same seed gives the
same file:

    python scripts/make_corpus.py /tmp/corpus_1g.txt --mib 1024
    python train.py data=text data.path=/tmp/corpus_1g.txt tokenizer=gpt2
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np

WORD = re.compile(r"[A-Za-z]+")
BLOCK_PARAGRAPHS = 2000  # paragraphs drawn at a time


def vocabulary() -> tuple[list[str], np.ndarray]:
    """The words of pydoc's topics and how often each occurs there, as probabilities."""
    counts = collections.Counter(word.lower() for text in topics.values() for word in WORD.findall(text))
    words = sorted(counts)
    frequencies = np.array([counts[word] for word in words], dtype=np.float64)
    return words, frequencies / frequencies.sum()


def paragraph(rng: np.random.Generator, words: list[str], probabilities: np.ndarray) -> str:
    """Sentences of 4 to 24 words, one per line."""
    n_sentences = rng.integers(60, 121) if rng.random() < 0.02 else rng.integers(1, 13)
    lengths = rng.integers(4, 25, size=n_sentences)
    drawn = rng.choice(len(words), size=int(lengths.sum()), p=probabilities)
    sentences = []
    start = 0
    for length in lengths:
        sentence = " ".join(words[i] for i in drawn[start : start + length])
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        start += length
    return "\n".join(sentences)


def write_corpus(path: Path, size: int, seed: int) -> None:
    """Paragraphs into ``path`` until it holds at least ``size`` bytes."""
    rng = np.random.default_rng(seed)
    words, probabilities = vocabulary()
    written = 0
    with open(path, "w", encoding="utf-8") as file:
        while written < size:
            block = "".join(paragraph(rng, words, probabilities) + "\n\n" for _ in range(BLOCK_PARAGRAPHS))
            file.write(block)
            written += len(block)  # ASCII: a byte per character


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="the file to write")
    parser.add_argument("--mib", type=float, default=1024, help="its size in MiB (default 1024: 1 GiB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_corpus(args.path, int(args.mib * 2**20), args.seed)
    print(f"wrote {args.path} ({args.path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
