"""Tokenizers: every one is a :class:`tiktoken.Encoding`.

>>> enc = build_tokenizer("bpe", vocab_size=4096, train_text=documents, cache_dir="cache/tokenizers")
>>> enc.encode_ordinary("Hello world")

- ``gpt2``: GPT-2's 50,257 tokens, from tiktoken's cache (``TIKTOKEN_CACHE_DIR``) or a local ranks
  file (``ranks_path``, the ``r50k_base.tiktoken`` format);
- ``bpe``: a byte-level BPE trained here (:mod:`losslab.bpe`) on the given text, cached on disk;
- ``bytes``: the 256 byte values.

Each ends with the ``<|endoftext|>`` special token, so that ``n_vocab`` counts it.

The settings a run gives them (``data.tokenizer``, ``data.vocab_size``, ``data.ranks_path``) are checked
before any data work by :func:`check_tokenizer_settings`.

A checkpoint stores its tokenizer as plain data (:func:`tokenizer_to_data`, read back by
:func:`tokenizer_from_data`), never as a pickle, which could run code when loaded; an exported
model keeps it as two files (:func:`export_tokenizer`, :func:`load_exported_tokenizer`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from losslab.bpe import train_bpe
from losslab.files import DataError, replaced_atomically
from losslab.settings import is_int_at_least, require

TOKENIZERS = ("gpt2", "bpe", "bytes")
# The vocabulary's size (<|endoftext|> included) where the tokenizer fixes it. bpe's is its
# vocab_size, which counts the 256 bytes and <|endoftext|> too, so it is at least 257.
FIXED_VOCAB_SIZES = {"bytes": 257, "gpt2": 50257}
BPE_MIN_VOCAB_SIZE = 257
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# What tokenizer_to_data stores, and the type of each.
TOKENIZER_DATA = {"name": str, "pattern": str, "ranks": bytes, "special_tokens": dict, "n_vocab": int, "sha256": str}


def build_tokenizer(
    name: str,
    *,
    vocab_size: int | None = None,
    train_text: Iterable[str] | None = None,
    cache_dir: str | Path | None = None,
    ranks_path: str | Path | None = None,
) -> tiktoken.Encoding:
    """The tokenizer called ``name``, one of :data:`TOKENIZERS`.

    ``vocab_size`` (which counts the 256 bytes and ``<|endoftext|>``), ``train_text`` and
    ``cache_dir`` (where trained ranks are kept; ``None`` trains every time) are for ``bpe``;
    ``ranks_path`` is for ``gpt2``. The others ignore them.
    """
    if name == "gpt2":
        return gpt2_tokenizer(ranks_path)
    if name == "bpe":
        if vocab_size is None or train_text is None:
            raise ValueError("the bpe tokenizer needs vocab_size and train_text")
        return bpe_tokenizer(list(train_text), vocab_size, cache_dir)
    if name == "bytes":
        return encoding_from_ranks("bytes", {bytes([b]): b for b in range(256)})
    raise ValueError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")


def check_tokenizer_settings(name: str, vocab_size: int | None = None, ranks_path: str | Path | None = None) -> None:
    """Raise ValueError, naming the setting as the config does (``tokenizer``, ``vocab_size``,
    ``ranks_path`` under ``data.``), for settings that :func:`build_tokenizer` cannot build from.

    Nothing is read: ``ranks_path`` must only be a file. ``vocab_size`` is bpe's; the others have
    their own (:data:`FIXED_VOCAB_SIZES`) and ignore it.
    """
    require(
        name in TOKENIZERS,
        "tokenizer",
        name,
        f"the tokenizer must be one of {', '.join(TOKENIZERS)}",
        "tokenizer=bytes",
    )
    require(
        ranks_path is None or (isinstance(ranks_path, (str, Path)) and Path(ranks_path).is_file()),
        "ranks_path",
        ranks_path,
        "no such file (or not a regular file): give a local copy of GPT-2's ranks",
        "data.ranks_path=path/to/r50k_base.tiktoken",
    )
    require(
        name != "bpe" or is_int_at_least(vocab_size, BPE_MIN_VOCAB_SIZE),
        "vocab_size",
        vocab_size,
        f"tokenizer=bpe needs an int >= {BPE_MIN_VOCAB_SIZE} (256 bytes and <|endoftext|>, then the merges)",
        "data.vocab_size=4096",
    )


def encoding_from_ranks(name: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """An Encoding with GPT-2's split pattern and ``<|endoftext|>`` right after the ranks."""
    return tiktoken.Encoding(
        name=name,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)},
    )


def gpt2_tokenizer(ranks_path: str | Path | None = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer from a local ranks file, else from tiktoken's cache, with no download."""
    if ranks_path is not None:
        return encoding_from_ranks("gpt2", load_ranks(Path(ranks_path), GPT2_RANKS_SHA256))
    try:
        return tiktoken.get_encoding("r50k_base")
    except (OSError, ValueError):  # offline (requests' errors are OSErrors) or a corrupt download
        # `from None`: the network stack trace says less than this message
        raise DataError(
            "cannot load GPT-2's tokenizer: tiktoken found no cached GPT-2 ranks in "
            f"{os.environ.get('TIKTOKEN_CACHE_DIR', 'its default cache')} and could not download "
            "them: set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 ranks, "
            "or give data.ranks_path=<a local r50k_base.tiktoken file>"
        ) from None


def text_digest(texts: Iterable[str]) -> str:
    """sha256 of a sequence of texts, where the boundaries between texts count too."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def bpe_tokenizer(train_text: Sequence[str], vocab_size: int, cache_dir: str | Path | None = None) -> tiktoken.Encoding:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``train_text``, cached in ``cache_dir``."""
    name = f"bpe{vocab_size}-{text_digest(train_text)[:16]}"
    if cache_dir is None:
        return encoding_from_ranks(name, train_bpe(train_text, vocab_size))
    path = Path(cache_dir) / f"{name}.tiktoken"
    ranks = cached_bpe_ranks(path, vocab_size)
    if ranks is None:
        ranks = train_bpe(train_text, vocab_size)
        save_ranks(ranks, path)
    return encoding_from_ranks(name, ranks)


def cached_bpe_ranks(path: Path, vocab_size: int) -> dict[bytes, int] | None:
    """The ranks that :func:`train_bpe` left in ``path``; None when there are none, or when they are
    damaged (with a warning that says how: they are trained again)."""
    if not os.path.lexists(path):
        return None
    try:
        problem = None if path.is_file() else "not a regular file"  # reading a FIFO would wait forever
        ranks = load_ranks(path) if problem is None else {}
        problem = problem or bpe_ranks_problem(ranks, vocab_size)
    except (OSError, ValueError) as error:  # unreadable, or a line that is not <base64> <rank>
        problem = f"{type(error).__name__}: {error}"
    if problem is None:
        return ranks
    warnings.warn(f"the trained tokenizer {path} is damaged ({problem}): training it again", stacklevel=2)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # renaming the new ranks over a folder would fail
    return None


def bpe_ranks_problem(ranks: dict[bytes, int], vocab_size: int) -> str | None:
    """What keeps ``ranks`` from being ranks that :func:`train_bpe` gives for ``vocab_size``: the 256
    bytes in order, then tokens each made of two tokens of lower rank, ``vocab_size - 1`` in all."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    if [rank for _, rank in by_rank] != list(range(vocab_size - 1)):
        return f"its ranks are not 0 to {vocab_size - 2}"
    for token, rank in by_rank:
        if rank < 256 and token != bytes([rank]):
            return f"token {rank} is {token!r}, not the byte {bytes([rank])!r}"
        parts = ((token[:i], token[i:]) for i in range(1, len(token)))
        if rank >= 256 and not any(ranks.get(a, rank) < rank and ranks.get(b, rank) < rank for a, b in parts):
            return f"token {rank} ({token!r}) is not two tokens of lower rank merged"
    return None


def ranks_to_bytes(ranks: dict[bytes, int]) -> bytes:
    """Ranks in tiktoken's ``.tiktoken`` format: a line ``<base64 token> <rank>`` per token."""
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks.items())


def ranks_from_bytes(data: bytes) -> dict[bytes, int]:
    """Ranks from the bytes of a ``.tiktoken`` file; ValueError when a line is not ``<base64> <int>``."""
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
    return ranks


def save_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """Write ranks in tiktoken's ``.tiktoken`` format, atomically."""
    with replaced_atomically(path) as file:
        file.write(ranks_to_bytes(ranks))


def load_ranks(path: Path, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Read a ``.tiktoken`` ranks file.

    Not ``tiktoken.load.load_tiktoken_bpe``: that one also copies the file into tiktoken's cache
    folder, which fails when ``TIKTOKEN_CACHE_DIR`` is read-only.
    """
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataError(
            f"{path} is not GPT-2's ranks file (its sha256 is not {expected_sha256}): give data.ranks_path=<r50k_base.tiktoken>"
        )
    return ranks_from_bytes(data)


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """The byte length of each token id, 0 for special tokens (for bits per byte)."""
    return np.array(
        [0 if enc.is_special_token(i) else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
        dtype=np.int64,
    )


def tokenizer_fingerprint(enc: tiktoken.Encoding) -> str:
    """sha256 of the bytes of every token of ``enc``, special tokens included.

    With GPT-2's split pattern, which every tokenizer here uses, they decide how ``enc`` tokenizes.
    """
    digest = hashlib.sha256()
    for i in range(enc.n_vocab):
        token = enc.decode_single_token_bytes(i)
        digest.update(len(token).to_bytes(8, "little") + token)
    return digest.hexdigest()


def tokenizer_to_data(enc: tiktoken.Encoding) -> dict[str, Any]:
    """``enc`` as plain data, which a checkpoint stores and ``torch.load(weights_only=True)`` reads.

    The whole tokenizer, so that a checkpoint needs nothing else, even offline (GPT-2's ranks take
    0.8 MB): its name, split pattern and special tokens; its ranks as the bytes of a ``.tiktoken``
    file (one object: as a dict of 50,257 entries, torch's weights-only unpickler takes half a
    second to read them); its size and the sha256 of its tokens (:func:`tokenizer_fingerprint`).
    """
    return {
        "name": enc.name,
        # tiktoken keeps these private, and its README extends encodings through them
        "pattern": enc._pat_str,
        "ranks": ranks_to_bytes(enc._mergeable_ranks),
        "special_tokens": dict(enc._special_tokens),
        "n_vocab": enc.n_vocab,
        "sha256": tokenizer_fingerprint(enc),
    }


def tokenizer_from_data(data: Any) -> tiktoken.Encoding:
    """The tokenizer that :func:`tokenizer_to_data` gave ``data`` for.

    Raises ValueError, saying what is wrong, when ``data`` is not such a dict or its tokens are not
    the ones its ``n_vocab`` and ``sha256`` describe.
    """
    wrong = [
        key for key, kind in TOKENIZER_DATA.items() if not isinstance(data, dict) or not isinstance(data.get(key), kind)
    ]
    if wrong:
        raise ValueError(f"the tokenizer is not stored as data: {', '.join(wrong)} missing or of another type")
    try:
        enc = tiktoken.Encoding(
            name=data["name"],
            pat_str=data["pattern"],
            mergeable_ranks=ranks_from_bytes(data["ranks"]),
            special_tokens=data["special_tokens"],
        )
        sha256 = tokenizer_fingerprint(enc)
    except (ValueError, TypeError, KeyError) as error:  # what tiktoken raises for a bad pattern, token or id
        raise ValueError(f"the tokenizer cannot be rebuilt: {error}") from None
    if enc.n_vocab != data["n_vocab"] or sha256 != data["sha256"]:
        raise ValueError("the tokenizer's tokens are not those its n_vocab and sha256 describe")
    return enc


def export_tokenizer(enc: tiktoken.Encoding, out_dir: str | Path) -> None:
    """Write ``enc`` to ``out_dir/tiktoken/``: ``ranks.tiktoken`` (its ranks, in tiktoken's own
    format) and ``encoding.json`` (its name, split pattern, special tokens, size and sha256)."""
    folder = Path(out_dir) / "tiktoken"
    folder.mkdir(parents=True, exist_ok=True)
    data = tokenizer_to_data(enc)
    (folder / "ranks.tiktoken").write_bytes(data.pop("ranks"))
    (folder / "encoding.json").write_text(json.dumps(data, indent=2) + "\n")


def load_exported_tokenizer(out_dir: str | Path) -> tiktoken.Encoding:
    """The tokenizer that :func:`export_tokenizer` (``scripts/export.py``) wrote to ``out_dir``."""
    folder = Path(out_dir) / "tiktoken"
    data = json.loads((folder / "encoding.json").read_text())
    return tokenizer_from_data({**data, "ranks": (folder / "ranks.tiktoken").read_bytes()})
