"""Byte-level BPE, learned here: the merges that turn the 256 bytes into a vocabulary.

:func:`train_bpe` learns them from text split with GPT-2's pattern, as tiktoken splits it when it
encodes, so that the result is a tiktoken ``Encoding``'s ranks (:func:`losslab.tokenizers.bpe_tokenizer`
builds it and caches them).
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

import regex
from tiktoken_ext.openai_public import r50k_pat_str

from losslab.files import DataError

Pair = tuple[int, int]


def train_bpe(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """Learn byte-level BPE merges until ``vocab_size`` tokens (counting ``<|endoftext|>``).

    The text is split with GPT-2's pattern and merges never cross pieces, as in tiktoken's
    encoder. Each step merges the most frequent adjacent pair, the pair of smallest token ids on
    ties, so that the result is deterministic. Returns the tokens' bytes in merge order.
    """
    n_merges = vocab_size - 256 - 1
    if n_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is below 257 (256 bytes and <|endoftext|>)")
    tokens = [bytes([b]) for b in range(256)]
    pairs = PairCounts(count_words(texts))
    for _ in range(n_merges):
        pair = pairs.pop_most_frequent()
        if pair is None:
            raise DataError(
                f"the training text is too small for vocab_size={vocab_size}: it has no pairs left to merge "
                f"after {len(tokens)} tokens: use data.vocab_size<={len(tokens) + 1}, or more text"
            )
        pairs.merge(pair, len(tokens))
        tokens.append(tokens[pair[0]] + tokens[pair[1]])
    return {token: rank for rank, token in enumerate(tokens)}


def count_words(texts: Iterable[str]) -> Counter[str]:
    """How often each piece of GPT-2's pre-tokenization occurs in ``texts``."""
    pattern = regex.compile(r50k_pat_str)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    return counts


class PairCounts:
    """How often each adjacent token pair occurs in the words, kept up to date through merges.

    A merge revisits only the words that hold the pair, and a heap with lazy deletion finds the
    most frequent pair: an entry is stale when the pair's count has changed since it was pushed,
    and each change pushes a new entry.
    """

    def __init__(self, word_counts: Counter[str]) -> None:
        self.freqs = list(word_counts.values())
        self.words: list[list[int]] = [[] for _ in word_counts]
        self.counts: defaultdict[Pair, int] = defaultdict(int)
        self.words_with: defaultdict[Pair, set[int]] = defaultdict(set)
        for i, word in enumerate(word_counts):
            self.respell(i, list(word.encode("utf-8")))
        self.heap = [(-count, pair) for pair, count in self.counts.items()]
        heapq.heapify(self.heap)

    def respell(self, i: int, word: list[int]) -> set[Pair]:
        """Make ``word`` the tokens of word ``i``; return the pairs whose counts it changed."""
        old = self.words[i]
        for pair in zip(old, old[1:]):
            self.counts[pair] -= self.freqs[i]
        for pair in zip(word, word[1:]):
            self.counts[pair] += self.freqs[i]
            self.words_with[pair].add(i)
        self.words[i] = word
        return set(zip(old, old[1:])) | set(zip(word, word[1:]))

    def pop_most_frequent(self) -> Pair | None:
        while self.heap:
            negative_count, pair = heapq.heappop(self.heap)
            if self.counts.get(pair) == -negative_count:
                return pair
        return None

    def merge(self, pair: Pair, new_token: int) -> None:
        """Replace ``pair`` by ``new_token`` in every word and update the counts."""
        changed = set()
        # words_with may list words that no longer hold the pair: merging leaves those as they are
        for i in self.words_with.pop(pair):
            merged = merge_pair(self.words[i], pair, new_token)
            if len(merged) < len(self.words[i]):
                changed |= self.respell(i, merged)
        for p in changed:
            if self.counts[p] > 0:
                heapq.heappush(self.heap, (-self.counts[p], p))
            else:
                del self.counts[p]


def merge_pair(word: list[int], pair: Pair, new_token: int) -> list[int]:
    """``word`` with each occurrence of ``pair``, left to right, replaced by ``new_token``."""
    merged = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            merged.append(new_token)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged
