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
import codecs
import contextlib
import os
import stat
import sys
from collections.abc import Container, Iterator
from typing import IO, Any, Final, final

from ._locks import lock_exclusive

__all__ = ["FORMATS", "check_encoding_name", "guess_encoding", "InputError", "InputFile", "Item", "Malformed", "Sink", "detect_format", "file_id", "is_stream_input", "line_digest", "open_input", "open_output", "spool"]

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

    __slots__ = ("count", "digest", "encoding", "format", "path", "size")

    def __init__(self, *, path: str, format: str, size: int, digest: str, count: int, encoding: str = "utf-8") -> None:
        self.path = path  #: absolute
        self.format = format
        self.encoding = encoding
        self.size = size
        self.digest = digest  #: "sha256:<hex>" of the whole file
        self.count = count  #: number of items

    def identity(self) -> dict[str, str]:
        return {"input_path": self.path, "input_format": self.format, "input_size": str(self.size), "input_digest": self.digest, "item_count": str(self.count)}

    def items(self, skip: Container[int] = ()) -> Iterator[Item]:
        """The items in order; those whose index is in ``skip`` are not decoded (nor yielded)."""
        if self.format == "csv":
            return _csv_items(self.path, skip, self.encoding)
        if self.format == "json":
            return _array_items(self.path, skip, self.encoding)
        if _is_utf8(self.encoding):
            return _line_items(self.path, skip, as_json=self.format == "jsonl")
        return _text_line_items(self.path, skip, self.encoding, as_json=self.format == "jsonl")


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


def is_stream_input(path: str) -> bool:
    """``-`` (standard input or output), or a path that is a pipe, FIFO, socket or character device."""
    if path == "-":
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


def spool(path: str, dest: str) -> str:
    """Copy the stream ``path`` (``-``: standard input) to its end into a new file beside ``dest``.

    Returns the new file (``dest`` with a ``.tmp-PID`` suffix): the caller renames or
    removes it.  A stream can be read once; its spooled copy can be counted, digested,
    read again, and kept beside a journal so that a rerun can resume.
    """
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            if path == "-":
                _copy(sys.stdin.buffer, out)
            else:
                with open(path, "rb") as src:
                    _copy(src, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from exc
    return tmp


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


def open_input(path: str, fmt: str | None = None, *, encoding: str = "utf-8", name: str | None = None) -> InputFile:
    """Identify and count the items of ``path``; InputError (one line) if it cannot be read.

    ``name`` is the path the user gave, when ``path`` is its spooled copy (for the
    format's extension and the messages).
    """
    abspath = os.path.abspath(path)
    shown = name or path
    try:
        if os.path.isdir(abspath):
            raise InputError(f"cannot read input {path}: it is a directory")
        if fmt is None and name is not None:
            fmt = detect_format(name)
        fmt = detect_format(abspath, fmt)
        with open(abspath, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        _check_encoding(abspath, shown, encoding)
        if fmt == "csv":
            count = _csv_count(abspath, encoding)
        elif fmt == "json":
            count = len(_load_array(abspath, encoding))
        elif _is_utf8(encoding):
            with open(abspath, "rb") as f:
                count = sum(1 for line in f if not line.isspace())
        else:
            with open(abspath, encoding=encoding, errors="replace", newline=None) as t:
                count = sum(1 for line in t if not line.isspace())
    except OSError as exc:
        raise InputError(f"cannot read input {shown}: {exc.strerror or exc}") from exc
    return InputFile(path=abspath, format=fmt, size=size, digest=digest, count=count, encoding=encoding)


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
                yield Item(index, line_no, Malformed(type(exc).__name__, _json_error(line_no, exc), text), dumps(text))
                continue
            yield Item(index, line_no, value, text.strip())


def _text_line_items(path: str, skip: Container[int], encoding: str, *, as_json: bool) -> Iterator[Item]:
    """Lines of a file in an encoding other than UTF-8 (UTF-16 lines cannot be split as bytes)."""
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    index = -1
    with open(path, encoding=encoding, errors="replace", newline=None) as f:
        for line_no, text in enumerate(f, 1):
            if text.isspace():
                continue
            index += 1
            if index in skip:
                continue
            if line_no == 1 and text.startswith("\ufeff"):
                text = text[1:]
            text = text.rstrip("\r\n")
            if not as_json:
                yield Item(index, line_no, text, dumps(text))
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                yield Item(index, line_no, Malformed(type(exc).__name__, _json_error(line_no, exc), text), dumps(text))
                continue
            yield Item(index, line_no, value, dumps(value))


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")


def check_encoding_name(encoding: str) -> str:
    """``encoding`` if Python knows it; InputError otherwise."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InputError(f"unknown --encoding {encoding!r}: use a Python codec name such as utf-8, latin-1, cp1252 or utf-16") from None
    return encoding


def _check_encoding(path: str, shown: str, encoding: str) -> None:
    """InputError with a hint naming the likely encoding when the first line does not decode."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head:
        return
    first = head.split(b"\n", 1)[0] if _ascii_compatible(encoding) else head
    try:
        first.decode(encoding)
    except UnicodeDecodeError as exc:
        if not _ascii_compatible(encoding) and exc.start >= len(head) - 4:
            return  # cut mid-character by our read
        guess = guess_encoding(head)
        raise InputError(
            f"cannot read input {shown} as {encoding}: line 1 does not decode ({exc.reason} at byte {exc.start});"
            f" it looks like {guess}: pass --encoding {guess}"
        ) from None


def _ascii_compatible(encoding: str) -> bool:
    return b"\n".decode(encoding, "replace") == "\n" and "a\n".encode(encoding) == b"a\n"


def guess_encoding(head: bytes) -> str:
    """The likely encoding of text starting with ``head`` (a byte order mark, NULs, else latin-1)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if head[1:200:2].count(0) > len(head[1:200:2]) // 2:
        return "utf-16-le"
    if head[0:200:2].count(0) > len(head[0:200:2]) // 2:
        return "utf-16-be"
    if any(0x80 <= b < 0xA0 for b in head):
        return "cp1252"
    return "latin-1"


def _json_error(line_no: int, exc: ValueError) -> str:
    """``line 57 is not valid JSON: Expecting value (column 3)``: one line number, the file's."""
    msg = getattr(exc, "msg", None)
    col = getattr(exc, "colno", None)
    if msg is None:
        return f"line {line_no} is not valid JSON: {exc}"
    return f"line {line_no} is not valid JSON: {msg} (column {col})"


def _csv_items(path: str, skip: Container[int], encoding: str = "utf-8") -> Iterator[Item]:
    import csv

    with open(path, encoding=_sig(encoding), errors="surrogateescape", newline="") as f:
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


def _sig(encoding: str) -> str:
    return "utf-8-sig" if _is_utf8(encoding) else encoding


def _csv_count(path: str, encoding: str = "utf-8") -> int:
    import csv

    count = 0
    with open(path, encoding=_sig(encoding), errors="surrogateescape", newline="") as f:
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


def _load_array(path: str, encoding: str = "utf-8") -> list[Any]:
    try:
        with open(path, encoding=_sig(encoding)) as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read input {path}: not a valid JSON array: {exc}") from exc
    if not isinstance(value, list):
        raise InputError(f"cannot read input {path}: a .json input must be one JSON array or one value per line")
    return value


def _array_items(path: str, skip: Container[int], encoding: str = "utf-8") -> Iterator[Item]:
    for index, value in enumerate(_load_array(path, encoding)):
        if index not in skip:
            yield Item(index, None, value, json.dumps(value, ensure_ascii=False))


def open_output(path: str, *, stream_fd: int = 1) -> tuple[int, bool]:
    """Open ``path`` to write (created if missing, never truncated here) and lock it.

    ``"-"`` is standard output (``stream_fd``).  Returns ``(fd, regular)``: a regular
    file is locked (:func:`~resilpool.cli._locks.lock_exclusive`: InUseError naming the
    holder); a pipe, terminal or other stream is neither locked, cut nor fsynced.
    """
    if path == "-":
        return os.dup(stream_fd), False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return fd, False
        lock_exclusive(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, True


def file_id(fd: int) -> str:
    """``"dev:inode"`` of an open file: which file it is, whatever its name."""
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def line_digest(line: bytes) -> str:
    return "sha256:" + hashlib.sha256(line).hexdigest()


@final
class Sink:
    """An append-only output that knows how many bytes it holds and its last line.

    ``sync()`` flushes and fsyncs and returns the byte offset that is now durable:
    the journal records it with the items whose lines end before it, and the
    digest of the line that ends there (:attr:`last_line`).  A stream (``keep=None``:
    a pipe, standard output) is only flushed.
    """

    def __init__(self, fd: int, path: str, *, keep: int | None = 0) -> None:
        """Write to ``fd`` (owned from now on) after its first ``keep`` bytes (the rest is cut off)."""
        self.path = path
        self.stream = keep is None
        try:
            if keep is not None:
                os.ftruncate(fd, keep)
                os.lseek(fd, keep, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._file: IO[bytes] = io.open(fd, "wb", buffering=1 << 16, closefd=True)
        self.offset = keep or 0
        self._synced = self.offset
        self.last_line = b""  #: the last line written (each write is one whole line)

    def write(self, data: bytes) -> None:
        """Write whole lines (one or more, each ending with its newline)."""
        self._file.write(data)
        self.offset += len(data)
        self.last_line = data[data.rfind(b"\n", 0, -1) + 1 :]  # all of it when it is one line

    def flush(self) -> None:
        self._file.flush()

    def sync(self) -> int:
        self._file.flush()
        if self._synced != self.offset and not self.stream:
            os.fsync(self._file.fileno())
        self._synced = self.offset
        return self.offset

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.sync()
            finally:
                self._file.close()
