"""JSON Lines and Parquet corpora: one record per document, streamed; bad input refused naming the
file and the line."""

import builtins
import gzip
import json

import numpy as np
import pytest

from losslab.data import GPTDataModule, load_documents


def write_jsonl(path, records: list, gz: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records)
    path.write_bytes(gzip.compress(lines.encode()) if gz else lines.encode())
    return path


def test_jsonl_gives_a_document_per_record(tmp_path):
    records = [{"text": "first\n\nrecord", "id": 1}, {"text": "  "}, {"text": None}, {"text": "third"}]
    path = write_jsonl(tmp_path / "a.jsonl", records[:2] + [""] + records[2:])  # a blank line is skipped
    assert load_documents("jsonl", path) == ["first\n\nrecord", "third"]  # whole, never cut; no text, no document
    assert load_documents("jsonl", path, max_document_chars=3) == ["first\n\nrecord", "third"]


def test_jsonl_from_a_folder_of_plain_and_gzipped_files_and_a_glob(tmp_path):
    write_jsonl(tmp_path / "data" / "b.jsonl.gz", [{"content": "two"}], gz=True)
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"content": "one"}])
    (tmp_path / "data" / "notes" / "notes.txt").parent.mkdir()
    (tmp_path / "data" / "notes" / "notes.txt").write_text("not a record")
    assert load_documents("jsonl", tmp_path / "data", text_field="content") == ["one", "two"]
    assert load_documents("jsonl", str(tmp_path / "data" / "*.gz"), text_field="content") == ["two"]
    with pytest.raises(ValueError, match=r"holds no \*.jsonl or \*.jsonl.gz files"):
        load_documents("jsonl", tmp_path / "data" / "notes")


def test_jsonl_trains_through_the_data_module(tmp_path):
    texts = [f"record {i}: " + "words " * (i % 7) for i in range(40)]
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text} for text in texts])
    options = dict(corpus="jsonl", path=str(path), tokenizer="bytes", context_length=8, cache_dir=tmp_path / "cache")
    dm = GPTDataModule(**options)
    dm.setup()
    train, val = (dm.datasets[split].tokens for split in ("train", "val"))
    eot = dm.tokenizer.eot_token
    assert int((val == eot).sum()) == 4 and int((train == eot).sum()) == 36  # every tenth record
    assert bytes(np.asarray(val[: val.tolist().index(eot)], dtype=np.uint8)) == texts[9].encode()
    assert next(iter(dm.train_dataloader()))[0]["input_ids"].shape == (32, 8)


def test_jsonl_refusals_name_the_file_and_the_line(tmp_path):
    def refusal(*lines, text_field="text") -> str:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, *lines])
        with pytest.raises(ValueError) as error:
            load_documents("jsonl", path, text_field=text_field)
        return str(error.value).replace(str(tmp_path), "<tmp>")

    assert refusal({"content": "x", "id": 2}) == (
        "<tmp>/bad.jsonl line 2 has no field 'text' (its fields: content, id): "
        "set data.text_field=<the field that holds the text>"
    )
    assert refusal('{"text": "unfinished') == (
        "<tmp>/bad.jsonl line 2 is not JSON (Unterminated string starting at: line 1 column 10 (char 9)): "
        "write one JSON object per line"
    )
    assert (
        refusal('["a", "list"]') == "<tmp>/bad.jsonl line 2 is an array, not a JSON object: write one object per line"
    )
    assert refusal({"text": 3}) == (
        "<tmp>/bad.jsonl line 2: field 'text' holds a number, not a string: "
        "set data.text_field=<the field that holds the text>"
    )


def test_jsonl_unpaired_surrogates_are_replaced_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ['{"text": "half \\ud83d of a pair"}', '{"text": "whole \\ud83d\\ude00"}'])
    with pytest.warns(UserWarning, match=r"s.jsonl line 1 holds unpaired UTF-16 surrogates"):
        assert load_documents("jsonl", path) == ["half \ufffd of a pair", "whole 😀"]


def test_parquet_gives_a_document_per_row(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    table = pyarrow.table({"id": [1, 2, 3, 4], "body": ["one", None, " ", "four\n\nstill four"]})
    parquet.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    parquet.write_table(table.slice(0, 1), tmp_path / "b.parquet")
    assert load_documents("parquet", tmp_path, text_field="body") == ["one", "four\n\nstill four", "one"]
    with pytest.raises(
        ValueError, match=r"a.parquet has no column 'text' \(its columns: id, body\): set data.text_field="
    ):
        load_documents("parquet", tmp_path)
    with pytest.raises(ValueError, match=r"a.parquet: column 'id' holds int64, not strings"):
        load_documents("parquet", tmp_path, text_field="id")


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", without_pyarrow)
    with pytest.raises(ImportError, match=r"pyarrow, which is not installed: pip install pyarrow"):
        load_documents("parquet", tmp_path / "a.parquet")
