import base64
import re
import time
from pydoc_data.topics import topics

import pytest
import requests
import tiktoken

from losslab import tokenizers
from losslab.data import load_documents
from losslab.files import DataError
from losslab.tokenizers import build_tokenizer, token_byte_lengths, train_bpe

UNSEEN = "naïve café, 日本語 🤖 \x00\x7f\U0010ffff and <|endoftext|> as text"
SMALL_TEXT = [topics[name] for name in ("if", "while", "for")]


def test_gpt2_from_tiktoken_cache(tiktoken_cache):
    enc = build_tokenizer("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_gpt2_from_ranks_path(tiktoken_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    ranks_path = next(tiktoken_cache.iterdir())  # the cache's one file: r50k_base.tiktoken
    enc = build_tokenizer("gpt2", ranks_path=ranks_path)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    wrong = tmp_path / "wrong.tiktoken"
    wrong.write_bytes(b"IQ== 0\n")
    with pytest.raises(DataError, match="is not GPT-2's ranks file .*: give data.ranks_path="):
        build_tokenizer("gpt2", ranks_path=wrong)


def test_gpt2_without_ranks_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded by other tests

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network in tests")

    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(DataError, match="set TIKTOKEN_CACHE_DIR .* or give data.ranks_path=") as error:
        build_tokenizer("gpt2")
    assert error.value.__suppress_context__


def test_bpe_has_the_requested_size_and_round_trips_unseen_text():
    enc = build_tokenizer("bpe", vocab_size=300, train_text=SMALL_TEXT)
    assert enc.n_vocab == 300 and enc.eot_token == 299
    assert enc.decode(enc.encode_ordinary(UNSEEN)) == UNSEEN
    assert len(enc.encode_ordinary("the while loop")) < len(b"the while loop")


def test_bpe_is_deterministic():
    first = train_bpe(SMALL_TEXT, 300)
    assert train_bpe(SMALL_TEXT, 300) == first
    assert list(first.values()) == list(range(299))


def test_bpe_is_cached(tmp_path, monkeypatch):
    enc = build_tokenizer("bpe", vocab_size=300, train_text=SMALL_TEXT, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.tiktoken"))) == 1

    def no_training(*args):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(tokenizers, "train_bpe", no_training)
    cached = build_tokenizer("bpe", vocab_size=300, train_text=SMALL_TEXT, cache_dir=tmp_path)
    assert cached.token_byte_values() == enc.token_byte_values()
    assert cached.encode_ordinary(UNSEEN) == enc.encode_ordinary(UNSEEN)


@pytest.mark.parametrize(
    "damage,problem",
    [
        ("a line that is not <base64> <rank>", "ValueError"),
        ("truncated", "its ranks are not 0 to 298"),
        ("a token's bytes changed", "token 298 .* is not two tokens of lower rank merged"),
        ("a folder", "not a regular file"),
    ],
)
def test_a_damaged_bpe_in_the_cache_is_trained_again(tmp_path, damage, problem):
    enc = build_tokenizer("bpe", vocab_size=300, train_text=SMALL_TEXT, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.tiktoken")
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "a folder":
        path.unlink()
        (path / "inside").mkdir(parents=True)
    else:
        damaged = {
            "a line that is not <base64> <rank>": [*lines[:-1], b"not a rank\n"],
            "truncated": lines[:-1],
            "a token's bytes changed": [
                *lines[:-1],
                base64.b64encode(enc.decode_single_token_bytes(298) + b"\0") + b" 298\n",
            ],
        }[damage]
        path.write_bytes(b"".join(damaged))
    with pytest.warns(
        UserWarning, match=f"the trained tokenizer {re.escape(str(path))} is damaged .*{problem}.*: training it again"
    ):
        again = build_tokenizer("bpe", vocab_size=300, train_text=SMALL_TEXT, cache_dir=tmp_path)
    assert again.token_byte_values() == enc.token_byte_values()
    assert path.read_bytes() == b"".join(lines)


def test_bpe_trains_in_seconds_on_pydoc():
    documents = load_documents("pydoc")
    start = time.perf_counter()
    enc = build_tokenizer("bpe", vocab_size=4096, train_text=documents)
    assert time.perf_counter() - start < 10
    assert enc.n_vocab == 4096
    assert enc.decode(enc.encode_ordinary(documents[0])) == documents[0]


def test_bpe_errors():
    with pytest.raises(ValueError, match="too small for vocab_size=5000"):
        build_tokenizer("bpe", vocab_size=5000, train_text=SMALL_TEXT)
    with pytest.raises(ValueError, match="below 257"):
        build_tokenizer("bpe", vocab_size=100, train_text=SMALL_TEXT)
    with pytest.raises(ValueError, match="needs vocab_size and train_text"):
        build_tokenizer("bpe", train_text=SMALL_TEXT)


def test_bytes_round_trips():
    enc = build_tokenizer("bytes")
    assert enc.n_vocab == 257 and enc.eot_token == 256
    assert enc.encode_ordinary("Hi") == [72, 105]
    assert enc.decode(enc.encode_ordinary(UNSEEN)) == UNSEEN


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="gpt2, bpe, bytes"):
        build_tokenizer("sentencepiece")


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_token_byte_lengths_add_up_to_the_text_bytes(name):
    enc = build_tokenizer(name, vocab_size=300, train_text=SMALL_TEXT)
    lengths = token_byte_lengths(enc)
    assert lengths.shape == (enc.n_vocab,) and lengths[enc.eot_token] == 0
    assert lengths[enc.encode_ordinary(UNSEEN)].sum() == len(UNSEEN.encode())
