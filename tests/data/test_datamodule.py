import os
import urllib.error
import urllib.request
from dataclasses import FrozenInstanceError, asdict

import numpy as np
import pytest
import tiktoken
import torch
from helpers import make_datamodule

from losslab.data import DataConfig, GPTDataModule, load_documents, token_cache
from losslab.data.batching import DocumentRows
from losslab.data.documents import paragraphs, split_documents
from losslab.data.token_cache import encode_documents, read_token_split, token_dtype, token_files
from losslab.files import DataError
from losslab.targets import count_targets


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def lines_without_blank_ones(n_lines: int) -> str:
    """``n_lines`` lines of about 60 characters, none of them blank."""
    return "".join(f"{i:03d} the quick brown fox jumps over the lazy dog, {i % 7} times\n" for i in range(n_lines))


# What a checkpoint (datamodule_hyper_parameters) and hparams.yaml hold of the data module, in this order.
DATA_HPARAMS = [
    "corpus",
    "path",
    "tokenizer",
    "vocab_size",
    "bpe_train_bytes",
    "ranks_path",
    "context_length",
    "batch_size",
    "accumulate",
    "mode",
    "val_fraction",
    "max_document_chars",
    "text_field",
    "val_batches",
    "num_workers",
    "cache_dir",
    "seed",
    "ignore_index",
]


def test_the_data_module_is_built_from_its_config_whose_fields_are_its_hyperparameters():
    config = DataConfig(corpus="text", path="notes.txt", tokenizer="bytes", vocab_size=None, batch_size=4)
    dm = GPTDataModule(config)
    assert dm.config is config
    assert list(dm.hparams) == DATA_HPARAMS
    assert dict(dm.hparams) == asdict(config)
    with pytest.raises(FrozenInstanceError):
        config.batch_size = 8


@pytest.mark.parametrize(
    "options,message",
    [
        ({"batch_size": 0}, "batch_size=0: the batch size must be an int >= 1 row (e.g. data.batch_size=16)"),
        ({"batch_size": 8.0}, "batch_size=8.0: the batch size must be an int >= 1 row"),
        ({"corpus": "wiki"}, "corpus=wiki: the corpus must be one of pydoc, shakespeare, text, jsonl, parquet"),
        ({"corpus": "jsonl"}, "path=null: data=jsonl reads your own files: give data.path=<a file, a folder of jsonl"),
        ({"mode": "stacked"}, "mode=stacked: the mode must be one of packed, padded (e.g. data.mode=padded)"),
        ({"val_fraction": float("nan")}, "val_fraction=nan: the validation share must be in (0, 1)"),
        ({"val_batches": 0}, "val_batches=0: the validation batches must be an int >= 1, or null for the whole split"),
        ({"num_workers": -1}, "num_workers=-1: the loader's workers must be an int >= 0"),
        ({"text_field": ""}, "text_field=: the records' text field must be a non-empty name"),
        (
            {"cache_dir": None},
            "cache_dir=null: the cache must be a folder's path (e.g. paths.cache_dir=.cache/losslab)",
        ),
        ({"tokenizer": "sentencepiece"}, "tokenizer=sentencepiece: the tokenizer must be one of gpt2, bpe, bytes"),
        ({"vocab_size": 256}, "vocab_size=256: tokenizer=bpe needs an int >= 257 (256 bytes and <|endoftext|>"),
        ({"tokenizer": "gpt2", "ranks_path": "nope"}, "ranks_path=nope: no such file (or not a regular file)"),
        ({"accumulate": 0}, "accumulate=0 must be at least 1 micro-batch per step"),
    ],
)
def test_data_config_refuses_a_bad_value_naming_it_and_the_fix(options, message):
    with pytest.raises(ValueError) as error:
        DataConfig(**options)
    assert str(error.value).startswith(message), str(error.value)


def test_data_config_takes_what_only_one_tokenizer_or_corpus_reads():
    DataConfig(tokenizer="bytes", vocab_size=4096)  # bpe's size, which the others ignore
    DataConfig(tokenizer="gpt2", vocab_size=None)
    DataConfig(corpus="text", path="not/there.txt")  # looked for when the corpus is read


def test_pydoc_is_one_document_per_topic():
    documents = load_documents("pydoc")
    assert len(documents) == 79
    assert any(doc.startswith('The "if" statement') for doc in documents)
    assert load_documents("pydoc", max_document_chars=100) == documents  # topics are never cut


def test_shakespeare_from_a_local_copy(shakespeare_path, tmp_path):
    documents = load_documents("shakespeare", shakespeare_path)
    assert documents[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert len(documents) > 7000
    assert documents == load_documents("shakespeare", shakespeare_path, max_document_chars=10**9)  # no speech cut
    dm = make_datamodule(tmp_path, corpus="shakespeare", path=str(shakespeare_path), tokenizer="bytes")
    n_tokens = len(dm.datasets["train"].tokens) + len(dm.datasets["val"].tokens)
    assert n_tokens == sum(len(doc.encode()) for doc in documents) + len(documents)  # a byte each, and an <|endoftext|>


def test_shakespeare_download_failure_suggests_a_local_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="data.path="):
        load_documents("shakespeare", cache_dir=tmp_path)


def test_text_corpus_from_a_file_a_folder_and_a_glob(tmp_path):
    a = write(tmp_path / "corpus" / "a.txt", "one\n\n\ntwo\nlines\n  \nthree")
    write(tmp_path / "corpus" / "sub" / "b.txt", "four")
    write(tmp_path / "corpus" / "notes.md", "not text")
    assert load_documents("text", a) == ["one", "two\nlines", "three"]
    assert load_documents("text", tmp_path / "corpus") == ["one", "two\nlines", "three", "four"]
    assert load_documents("text", str(tmp_path / "corpus" / "**" / "b.*")) == ["four"]


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents("text", tmp_path / "missing.txt")
    with pytest.raises(DataError, match="matches no files"):
        load_documents("text", str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match=r"holds no \*.txt files"):
        load_documents("text", tmp_path)
    with pytest.raises(DataError, match="holds no text"):
        load_documents("text", write(tmp_path / "blank.txt", "\n  \n\n"))
    with pytest.raises(DataError, match="needs data.path"):
        load_documents("text")
    (tmp_path / "fifos").mkdir()
    os.mkfifo(tmp_path / "fifos" / "a.txt")  # reading one would wait for a writer
    with pytest.raises(DataError, match=r"a.txt is not a regular file \(a FIFO, socket or device\)"):
        load_documents("text", tmp_path / "fifos" / "a.txt")
    with pytest.raises(DataError, match=r"holds no \*.txt files"):  # in a folder, only regular files count
        load_documents("text", tmp_path / "fifos")
    with pytest.raises(ValueError, match="pydoc, shakespeare, text, jsonl, parquet"):
        load_documents("wikipedia")


def test_text_without_blank_lines_is_cut_into_documents_and_trains(tmp_path):
    notes = write(tmp_path / "notes.txt", lines_without_blank_ones(300))
    documents = load_documents("text", notes)
    assert len(documents) > 1 and all(len(doc) <= 4096 for doc in documents)
    assert "\n".join(documents).strip() == notes.read_text().strip()  # cut at line ends only
    dm = make_datamodule(tmp_path, corpus="text", path=str(notes), tokenizer="bytes")
    eot = dm.tokenizer.eot_token
    assert {split: int((dataset.tokens == eot).sum()) for split, dataset in dm.datasets.items()} == {
        "train": len(documents) - 1,
        "val": 1,
    }
    assert next(iter(dm.train_dataloader()))[0]["input_ids"].shape == (4, 32)
    assert next(iter(dm.val_dataloader()))["input_ids"].shape == (4, 32)
    smaller = make_datamodule(tmp_path, corpus="text", path=str(notes), tokenizer="bytes", max_document_chars=1000)
    n_documents = sum(int((dataset.tokens == eot).sum()) for dataset in smaller.datasets.values())
    assert n_documents == len(load_documents("text", notes, max_document_chars=1000)) > len(documents)


def test_paragraphs_longer_than_the_maximum_are_cut_at_line_ends():
    assert paragraphs("one\ntwo\n\nthree", max_chars=7) == ["one\ntwo", "three"]  # at most the maximum: whole
    assert paragraphs("one\ntwo\nsix", max_chars=7) == ["one\ntwo", "six"]  # each piece takes the lines that fit
    assert paragraphs("a\nb\nc\nd\ne", max_chars=3) == ["a\nb", "c\nd", "e"]
    assert paragraphs("the long line\nok", max_chars=9) == ["the long", "line\nok"]  # a long line: at whitespace
    assert paragraphs("lines cut\nhere", max_chars=5) == ["lines", "cut", "here"]  # whitespace right at the maximum
    assert paragraphs("abcdefghijkl", max_chars=5) == ["abcde", "fghij", "kl"]  # no whitespace: at the maximum
    assert paragraphs("a\n\nb\nb\n   ", max_chars=2) == ["a", "b", "b"]  # no piece of whitespace only
    with pytest.raises(ValueError, match="max_document_chars=0 must be at least 1"):
        paragraphs("text", max_chars=0)


def test_non_utf8_bytes_are_replaced_with_a_warning(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n\nok".encode("latin-1"))
    with pytest.warns(UserWarning, match="latin1.txt is not valid UTF-8"):
        assert load_documents("text", latin1) == ["caf\ufffd", "ok"]


def test_binary_files_are_refused_and_a_stray_nul_is_kept_with_a_warning(tmp_path):
    (tmp_path / "zeros.txt").write_bytes(bytes(100_000))  # a file never written, say
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 40)
    for name, offset in [("zeros.txt", 0), ("image.txt", 8)]:
        with pytest.raises(DataError, match=rf"{name} is binary, not text \(a NUL byte at offset {offset}, within its"):
            load_documents("text", tmp_path / name)
    # no NUL, but control characters: more than 30% of the first 8,000 bytes
    (tmp_path / "controls.txt").write_bytes(b"\x01\x02 text\x1b" * 20_000)
    with pytest.raises(
        DataError, match=r"controls.txt is binary, not text \(control characters in 3,000 of its first 8,000"
    ):
        load_documents("text", tmp_path / "controls.txt")
    (tmp_path / "colours.txt").write_text("\x1b[1mbold\x1b[0m and plain text\n" * 500)  # ANSI escapes: text
    assert load_documents("text", tmp_path / "colours.txt")
    text = "a paragraph of plain text\n\n" * 400  # 10,800 bytes, then "one " and a NUL
    (tmp_path / "stray.txt").write_text(text + "one \0 here")
    with pytest.warns(UserWarning, match=r"stray.txt holds NUL bytes \(the first at offset 10804\)"):
        assert load_documents("text", tmp_path / "stray.txt")[-1] == "one \0 here"


def test_split_is_deterministic_spread_and_disjoint():
    documents = [f"document {i}" for i in range(100)]
    splits = split_documents(documents, 0.1)
    assert splits == split_documents(documents, 0.1)
    assert splits["val"] == [f"document {i}" for i in range(9, 100, 10)]
    assert sorted(splits["train"] + splits["val"]) == sorted(documents)


def test_ten_or_more_documents_split_as_every_tenth_goes_to_val():
    documents = [f"document {i}" for i in range(100)]
    for n in range(10, 100):
        assert split_documents(documents[:n], 0.1)["val"] == documents[9:n:10]
    assert split_documents(documents[:12], 0.25)["val"] == ["document 3", "document 7", "document 11"]


def test_fewer_than_ten_documents_give_val_the_last():
    documents = [f"document {i}" for i in range(9)]
    for n in range(2, 10):
        assert split_documents(documents[:n], 0.1) == {"train": documents[: n - 1], "val": [documents[n - 1]]}
    assert split_documents(documents[:5], 0.5)["val"] == ["document 1", "document 3"]  # crossings: only they go to val
    with pytest.raises(ValueError, match="1 document.*blank lines.*data.max_document_chars"):
        split_documents(["one"], 0.1)


def test_too_small_corpus(tmp_path):
    corpus = write(tmp_path / "small.txt", "\n\n".join(["short"] * 20))
    with pytest.raises(DataError, match=r"val split of corpus 'text' has \d+ tokens.*model.context_length"):
        make_datamodule(tmp_path, corpus="text", path=str(corpus), tokenizer="bytes", context_length=64)
    with pytest.raises(
        DataError, match=r"train split of corpus 'pydoc' has \d+ tokens, fewer than context_length \+ 1 = 100000001"
    ):
        make_datamodule(tmp_path, tokenizer="bytes", context_length=10**8)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_a_step_larger_than_an_epoch_is_refused_not_cut_to_the_epoch(tmp_path, mode):
    # every step would have been the whole epoch: data.batch_size=100000000 trained as ~14,000
    message = r"data.batch_size=\d+ x step.accumulate=\d is more rows per step than an epoch of corpus 'pydoc' holds"
    with pytest.raises(DataError, match=message):
        make_datamodule(tmp_path, tokenizer="bytes", mode=mode, batch_size=10**8)
    epoch = len(make_datamodule(tmp_path, tokenizer="bytes", mode=mode).train_sampler())
    make_datamodule(tmp_path, tokenizer="bytes", mode=mode, batch_size=epoch // 2, accumulate=2)
    with pytest.raises(DataError, match=rf"use data.batch_size x step.accumulate <= {epoch}, or more data"):
        make_datamodule(tmp_path, tokenizer="bytes", mode=mode, batch_size=epoch // 2 + 1, accumulate=2)


def test_token_cache_is_reused_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    tokens = np.array(make_datamodule(tmp_path).datasets["train"].tokens)
    (bin_file,) = (tmp_path / "cache" / "tokens").glob("pydoc-train-*.bin")

    def no_tokenizing(*args):
        raise AssertionError("tokenized again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(token_cache, "write_token_splits", no_tokenizing)
        np.testing.assert_array_equal(make_datamodule(tmp_path).datasets["train"].tokens, tokens)

    with open(bin_file, "r+b") as file:
        file.write(b"\xff\xff")
    with pytest.warns(UserWarning, match="rebuilding"):
        np.testing.assert_array_equal(make_datamodule(tmp_path).datasets["train"].tokens, tokens)


def test_token_dtype(tmp_path):
    assert token_dtype(257) == token_dtype(50257) == token_dtype(65536) == np.uint16
    assert token_dtype(65537) == token_dtype(100277) == np.uint32
    ranks = {bytes([b]): b for b in range(256)}
    big = tiktoken.Encoding("big", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 70000})
    dtype = token_dtype(big.n_vocab)
    with token_files(tmp_path, "big", dtype) as files:
        files.write(*encode_documents(big, ["hi", "you"], dtype))
    split = read_token_split(tmp_path, "big")
    assert split.tokens.dtype == np.uint32
    assert split.tokens.tolist() == [104, 105, 70000, 121, 111, 117, 70000]
    assert split.offsets.tolist() == [0, 3, 7]


def test_packed_batches(tmp_path):
    dm = make_datamodule(tmp_path)
    assert dm.vocab_size == 512 and dm.token_bytes.shape == (512,) and dm.token_bytes[dm.tokenizer.eot_token] == 0
    [batch] = next(iter(dm.train_dataloader()))  # one micro-batch per step
    assert set(batch) == {"input_ids", "targets"}
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 32)
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    assert count_targets(batch["targets"]) == 4 * 32


def test_packed_training_order_follows_the_seed(tmp_path):
    def first_batch(seed):
        return next(iter(make_datamodule(tmp_path, seed=seed).train_dataloader()))[0]["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_packed_validation_covers_the_split_once(tmp_path):
    dm = make_datamodule(tmp_path)
    tokens = torch.from_numpy(dm.datasets["val"].tokens.astype(np.int64))
    targets = torch.cat([batch["targets"].flatten() for batch in dm.val_dataloader()])
    assert len(tokens) - 1 - 32 < len(targets) <= len(tokens) - 1
    assert torch.equal(targets, tokens[1 : len(targets) + 1])
    capped = make_datamodule(tmp_path, val_batches=2).val_dataloader()
    assert len(capped) == 2


def test_padded_batches(tmp_path):
    dm = make_datamodule(tmp_path, mode="padded")
    eot = dm.tokenizer.eot_token
    for batch in [*next(iter(dm.train_dataloader())), *dm.val_dataloader()]:
        input_ids, targets, mask = batch["input_ids"], batch["targets"], batch["attention_mask"]
        assert input_ids.shape == targets.shape == mask.shape and input_ids.shape[1] <= 32
        lengths = mask.sum(1)
        assert torch.equal(mask, (torch.arange(input_ids.shape[1]) < lengths[:, None]).long())
        assert (input_ids[mask == 0] == eot).all() and (targets[mask == 0] == -100).all()
        for row, target, length in zip(input_ids, targets, lengths):
            assert torch.equal(target[: length - 1], row[1:length])
            assert (target[length - 1 :] == -100).all()
            assert eot not in row[: length - 1]  # an end-of-text only ever closes a row: no row spans documents
        assert count_targets(batch["targets"]) == int((lengths - 1).sum())


def test_accumulation_batches_are_the_micro_batches_of_one_step(tmp_path):
    single = make_datamodule(tmp_path, mode="padded").train_dataloader()
    accumulated = make_datamodule(tmp_path, mode="padded", accumulate=3).train_dataloader()
    steps, rows = iter(accumulated), iter(single)
    for _ in range(2):
        step = next(steps)
        assert len(step) == 3
        for micro in step:  # each padded to its own longest row
            assert torch.equal(micro["input_ids"], next(rows)[0]["input_ids"])
    with pytest.raises(ValueError, match="accumulate=0 must be at least 1"):
        DataConfig(accumulate=0)


def test_long_documents_become_rows_that_share_one_token():
    rows = DocumentRows(np.arange(12), np.array([0, 10, 11, 12]), context_length=4).rows
    assert rows == [(0, 4), (3, 7), (6, 10)]  # the one-token documents have nothing to predict
