"""Records: the text that a JSON Lines record or a Parquet row holds, and how a file that does not
hold such records is refused, in one line naming the file (and line) and the fix.

:class:`~losslab.data.corpora.JsonLines` and :class:`~losslab.data.corpora.ParquetFiles` read their
files through these.
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from losslab.files import DataError

LONE_SURROGATES = re.compile("[\ud800-\udfff]")  # what a JSON string may hold that UTF-8 cannot
JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
}


def gzip_lines(raw: BinaryIO, file: Path) -> Iterator[bytes]:
    """The lines of the gzip-compressed ``file``, read from ``raw``; a stream that is truncated or
    damaged (which gzip reports as EOFError, OSError or zlib.error) ends in a DataError naming it."""
    try:
        with gzip.open(raw) as lines:
            yield from lines
    except (EOFError, OSError, zlib.error) as error:
        raise DataError(
            f"{file} is not a whole gzip file ({error}): compress it again, or check it with gzip -t {file}"
        ) from None


@contextmanager
def parquet_errors(file: Path) -> Iterator[None]:
    """A file that pyarrow cannot read as Parquet (it is not one, or it is truncated or damaged:
    ArrowInvalid, or OSError for a damaged page) ends in a DataError naming the file."""
    import pyarrow

    try:
        yield
    except (pyarrow.ArrowException, OSError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataError(
            f"{file} is not a readable Parquet file ({reason}): give Parquet files in data.path, or write this one again"
        ) from None


def as_documents(text: str | None, where: str) -> list[str]:
    """``[text]`` when it holds more than whitespace, else ``[]``; lone surrogates (which a JSON
    string may hold and UTF-8 cannot) replaced by U+FFFD, with a warning naming ``where``."""
    if text is None or not text.strip():
        return []
    if LONE_SURROGATES.search(text):
        warnings.warn(
            f"{where} holds unpaired UTF-16 surrogates (\\ud800-\\udfff), which are not text: replaced by U+FFFD",
            stacklevel=2,
        )
        text = LONE_SURROGATES.sub("\ufffd", text)
    return [text]


def record_text(line: bytes, field: str, file: Path, number: int) -> str | None:
    """The ``field`` of the JSON object on ``line``, line ``number`` of ``file``: a string, or None for null."""
    try:
        record = json.loads(line)
    except ValueError as error:  # not JSON, or not UTF-8
        raise DataError(f"{file} line {number} is not JSON ({error}): write one JSON object per line") from None
    except RecursionError:
        raise DataError(
            f"{file} line {number} nests arrays or objects too deeply for Python's JSON reader: "
            "write one flat JSON object per line"
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{file} line {number} is {JSON_KINDS.get(type(record), 'null')}, not a JSON object: "
            "write one object per line"
        )
    if field not in record:
        raise DataError(
            f"{file} line {number} has no field {field!r} (its fields: {', '.join(record) or 'none'}): "
            "set data.text_field=<the field that holds the text>"
        )
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise DataError(
            f"{file} line {number}: field {field!r} holds {JSON_KINDS[type(text)]}, not a string: "
            "set data.text_field=<the field that holds the text>"
        )
    return text


def import_parquet() -> Any:
    """``pyarrow.parquet``, or an error that says how to install it."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise DataError(
            "data=parquet reads Parquet with pyarrow, which is not installed: pip install pyarrow "
            '(or pip install -e ".[parquet]")'
        ) from None
    return pyarrow.parquet


def check_text_column(schema: Any, field: str, file: Path) -> None:
    """Raise when the Arrow ``schema`` of ``file`` has no string column ``field``."""
    import pyarrow

    if field not in schema.names:
        raise DataError(
            f"{file} has no column {field!r} (its columns: {', '.join(schema.names)}): "
            "set data.text_field=<the column that holds the text>"
        )
    kind = schema.field(field).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise DataError(
            f"{file}: column {field!r} holds {kind}, not strings: set data.text_field=<the column that holds the text>"
        )
