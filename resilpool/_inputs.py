"""Readers of ``resilpool run`` inputs and the writer of its output files.

Inputs (the format from ``--format`` or the file's extension):

- ``jsonl`` (``.jsonl``, ``.ndjson``, ``.json`` holding one value per line): each
  non-blank line is one JSON value;
- ``json`` (``.json`` whose first character is ``[``): the elements of one array;
- ``csv`` (``.csv``): each row after the header, as a ``dict`` of strings;
- ``txt`` (``.txt``, ``.text``, ``.lines``): each non-blank line, as a ``str``
  without its line ending.

An item's *index* is its 0-based position among the items (blank lines do not
count), its *line* the 1-based line of the file where it starts.  A line that is
not valid JSON or UTF-8, or a CSV row with the wrong number of fields, is still
an item: a malformed one, which fails without running.

An input is identified by its size, its SHA-256 and its format; the journal
refuses to resume a run from a different input.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Container, Iterator
from typing import IO, Any, Final, final

__all__ = ["FORMATS", "InputError", "InputFile", "Item", "Malformed", "Sink", "detect_format", "open_input"]

FORMATS: Final = ("jsonl", "json", "csv", "txt")
_EXTENSIONS: Final = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".txt": "txt",
    ".text": "txt",
    ".lines": "txt",
}


class InputError(Exception):
    """The input cannot be used at all (missing, unreadable, unknown format): a one-line message."""


@final
class Malformed:
    """An item that could not be decoded; it fails as ``InputError`` (type ``error_type``)."""

    __slots__ = ("error_type", "message", "raw")

    def __init__(self, error_type: str, message: str, raw: str) -> None:
        self.error_type = error_type
        self.message = message
        self.raw = raw


@final
class Item:
    """One item of the input (a plain slotted class: one is made per item, on the hot path)."""

    __slots__ = ("index", "input_json", "line", "value")

    def __init__(self, index: int, line: int | None, value: Any, input_json: str) -> None:
        self.index = index
        self.line = line  #: 1-based line of the input where it starts (None in a JSON array)
        self.value = value  #: the argument, or a :class:`Malformed`
        self.input_json = input_json  #: the item as JSON text, for the output line


@final
class InputFile:
    """An input file, identified and counted (no item is kept in memory)."""

    __slots__ = ("count", "digest", "format", "path", "size")

    def __init__(self, *, path: str, format: str, size: int, digest: str, count: int) -> None:
        self.path = path  #: absolute
        self.format = format
        self.size = size
        self.digest = digest  #: "sha256:<hex>" of the whole file
        self.count = count  #: number of items

    def identity(self) -> dict[str, str]:
        return {"input_path": self.path, "input_format": self.format, "input_size": str(self.size), "input_digest": self.digest, "item_count": str(self.count)}

    def items(self, skip: Container[int] = ()) -> Iterator[Item]:
        """The items in order; those whose index is in ``skip`` are not decoded (nor yielded)."""
        if self.format == "csv":
            return _csv_items(self.path, skip)
        if self.format == "json":
            return _array_items(self.path, skip)
        return _line_items(self.path, skip, as_json=self.format == "jsonl")


def detect_format(path: str, explicit: str | None = None) -> str:
    """The input format: ``explicit`` or the one the extension names (a ``.json`` of lines is ``jsonl``)."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise InputError(f"unknown --format {explicit!r}: use one of {', '.join(FORMATS)}")
        fmt = explicit
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _EXTENSIONS:
            raise InputError(
                f"cannot tell the format of {path!r} from its extension: pass --format ({', '.join(FORMATS)})"
            )
        fmt = _EXTENSIONS[ext]
    if fmt == "json" and not _starts_with_bracket(path):
        fmt = "jsonl"
    return fmt


def _starts_with_bracket(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as exc:
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from exc
    return head.startswith(b"[")


def open_input(path: str, fmt: str | None = None) -> InputFile:
    """Identify and count the items of ``path``; InputError (one line) if it cannot be read."""
    abspath = os.path.abspath(path)
    try:
        if os.path.isdir(abspath):
            raise InputError(f"cannot read input {path}: it is a directory")
        fmt = detect_format(abspath, fmt)
        with open(abspath, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        if fmt == "csv":
            count = _csv_count(abspath)
        elif fmt == "json":
            count = len(_load_array(abspath))
        else:
            with open(abspath, "rb") as f:
                count = sum(1 for line in f if not line.isspace())
    except OSError as exc:
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from exc
    return InputFile(path=abspath, format=fmt, size=size, digest=digest, count=count)


def _line_items(path: str, skip: Container[int], *, as_json: bool) -> Iterator[Item]:
    loads = json.loads
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    index = -1
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.isspace():
                continue
            index += 1
            if index in skip:
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                shown = raw.decode("utf-8", "replace").rstrip("\r\n")
                yield Item(index, line_no, Malformed("UnicodeDecodeError", f"line {line_no} is not valid UTF-8: {exc}", shown), dumps(shown))
                continue
            if line_no == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not as_json:
                text = text.rstrip("\r\n")
                yield Item(index, line_no, text, dumps(text))
                continue
            try:
                value = loads(text)
            except ValueError as exc:
                text = text.rstrip("\r\n")
                yield Item(index, line_no, Malformed(type(exc).__name__, f"line {line_no} is not valid JSON: {exc}", text), dumps(text))
                continue
            yield Item(index, line_no, value, text.strip())


def _csv_items(path: str, skip: Container[int]) -> Iterator[Item]:
    import csv

    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error:
            header = []
        index = -1
        while True:
            line_no = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                index += 1
                if index not in skip:
                    yield Item(index, line_no, Malformed("csv.Error", f"line {line_no}: {exc}", ""), '""')
                continue
            if not row:
                continue
            index += 1
            if index in skip:
                continue
            raw_line = ",".join(row)
            if len(row) != len(header):
                shown = raw_line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                yield Item(
                    index,
                    line_no,
                    Malformed("csv.Error", f"line {line_no}: the row has {len(row)} fields, the header {len(header)}", shown),
                    json.dumps(shown, ensure_ascii=False),
                )
                continue
            try:
                raw_line.encode("utf-8")
            except UnicodeEncodeError:
                shown = raw_line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                yield Item(index, line_no, Malformed("UnicodeDecodeError", f"line {line_no} is not valid UTF-8", shown), json.dumps(shown, ensure_ascii=False))
                continue
            value = dict(zip(header, row))
            yield Item(index, line_no, value, json.dumps(value, ensure_ascii=False))


def _csv_count(path: str) -> int:
    import csv

    count = 0
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        first = True
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return count
            except csv.Error:
                row = ["<malformed>"]
            if first:
                first = False  # the header
            elif row:
                count += 1


def _load_array(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read input {path}: not a valid JSON array: {exc}") from exc
    if not isinstance(value, list):
        raise InputError(f"cannot read input {path}: a .json input must be one JSON array or one value per line")
    return value


def _array_items(path: str, skip: Container[int]) -> Iterator[Item]:
    for index, value in enumerate(_load_array(path)):
        if index not in skip:
            yield Item(index, None, value, json.dumps(value, ensure_ascii=False))


@final
class Sink:
    """An append-only output file that knows how many bytes it holds.

    ``sync()`` flushes and fsyncs and returns the byte offset that is now durable:
    the journal records it with the items whose lines end before it.
    """

    def __init__(self, path: str, *, keep: int = 0) -> None:
        """Open ``path`` for appending after its first ``keep`` bytes (the rest is cut off)."""
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            os.ftruncate(fd, keep)
            os.lseek(fd, keep, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._file: IO[bytes] = io.open(fd, "wb", buffering=1 << 16, closefd=True)
        self.offset = keep
        self._synced = keep

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.offset += len(data)

    def flush(self) -> None:
        self._file.flush()

    def sync(self) -> int:
        self._file.flush()
        if self._synced != self.offset:
            os.fsync(self._file.fileno())
            self._synced = self.offset
        return self.offset

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()
