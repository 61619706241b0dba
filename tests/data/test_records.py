"""JSON Lines and Parquet corpora: one record per document, streamed; bad input refused naming the
file and the line."""

import builtins
import gzip
import json

import numpy as np
import pytest

from losslab.data import DataConfig, GPTDataModule, load_documents
from losslab.files import DataError


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
    dm = GPTDataModule(DataConfig(**options))
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


def test_damaged_gzip_and_deeply_nested_json_are_refused_in_one_line(tmp_path):
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", [{"text": f"record {i} " * 20} for i in range(500)], gz=True)
    data = whole.read_bytes()
    (tmp_path / "truncated.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "not-gzip.jsonl.gz").write_bytes(b'{"text": "plain, not compressed"}\n')
    write_jsonl(tmp_path / "nested.jsonl", ["[" * 100_000 + "]" * 100_000])
    refusals = {
        "truncated.jsonl.gz": r"is not a whole gzip file \(Compressed file ended before the end-of-stream marker",
        "not-gzip.jsonl.gz": r"is not a whole gzip file \(Not a gzipped file",
        "nested.jsonl": r"line 1 nests arrays or objects too deeply for Python's JSON reader: write one flat",
    }
    for name, message in refusals.items():
        with pytest.raises(DataError, match=f"^{tmp_path / name} {message}") as error:
            load_documents("jsonl", tmp_path / name)
        assert "\n" not in str(error.value)


def test_a_file_that_is_not_parquet_or_is_damaged_is_refused_in_one_line(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    (tmp_path / "text.parquet").write_text("plain text, given as Parquet")
    parquet.write_table(pyarrow.table({"text": [f"row {i} " * 50 for i in range(2000)]}), tmp_path / "whole.parquet")
    data = bytearray((tmp_path / "whole.parquet").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 200] = b"\xff" * 200  # inside a data page
    (tmp_path / "damaged.parquet").write_bytes(data)
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    for name in ["text.parquet", "damaged.parquet", "truncated.parquet"]:
        with pytest.raises(
            DataError, match=f"^{tmp_path / name} is not a readable Parquet file \\(.*\\): give"
        ) as error:
            load_documents("parquet", tmp_path / name)
        assert "\n" not in str(error.value)


def test_jsonl_unpaired_surrogates_are_replaced_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ['{"text": "half \\ud83d of a pair"}', '{"text": "whole \\ud83d\\ude00"}'])
    with pytest.warns(UserWarning, match=r"s.jsonl line 1 holds unpaired UTF-16 surrogates"):
        assert load_documents("jsonl", path) == ["half \ufffd of a pair", "whole 😀"]


def test_records_of_nul_or_control_characters_are_refused_first_and_warned_later(tmp_path):
    """As a text file: a file whose first record of text is binary is refused, a later binary record kept
    with a warning (once a file)."""
    binary = write_jsonl(tmp_path / "nul.jsonl", [{"text": " "}, {"text": "\0" * 100}, {"text": "fine"}])
    with pytest.raises(DataError, match=r"nul.jsonl line 2 is binary, not text \(a NUL byte at offset 0, within"):
        load_documents("jsonl", binary)
    late = write_jsonl(tmp_path / "late.jsonl", [{"text": "fine"}, *[{"text": "\x01\x02\x03 "}] * 3])
    with pytest.warns(UserWarning, match=r"late.jsonl line 2 holds binary, not text \(control characters in") as caught:
        assert load_documents("jsonl", late) == ["fine", *["\x01\x02\x03 "] * 3]
    assert len(caught) == 1
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    parquet.write_table(pyarrow.table({"text": ["\0\0\0", "fine"]}), tmp_path / "nul.parquet")
    with pytest.raises(DataError, match=r"nul.parquet row 0 is binary, not text"):
        load_documents("parquet", tmp_path / "nul.parquet")


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
    with pytest.raises(DataError, match=r"pyarrow, which is not installed: pip install pyarrow"):
        load_documents("parquet", tmp_path / "a.parquet")
