"""The call ``resilpool run`` sends to a worker: the user's function on a chunk of items.

``item_call("mymod:f")`` is a wrapper of ``mymod.f`` that runs in the worker.  One
task carries a *chunk*: a list of ``(index, value, input JSON)``.  For each item in
turn the wrapper calls the function, encodes the result as JSON there (in parallel,
and so that a result JSON cannot hold fails as that item's error), builds the
item's output line, and returns, per chunk, the worker's pid and peak resident
memory, the chunk's wall-clock start, the lines of the items done (joined) and per
item its elapsed time, and the error records of the items that failed.

**Transit file** (what keeps a kill -9 from rerunning finished items): before it
starts the next item, the wrapper appends each finished item's line (its output
line, or ``{"index": i, "error": {...}}``) to ``TRANSIT-PID-TOKEN``, ``TRANSIT``
being the path the runner passes with the chunk (``TOKEN``: random, once per
process, so that a reused pid never shares a file).  The file is mapped shared
(``mmap``): an append is a copy into the page cache, no system call, and what a
process wrote there stays in the file however the process dies.  The line's body
is copied first and its newline last, so a reader (``resilpool.cli._run``) takes
the complete lines before the first NUL byte (JSON lines hold none).  So at any
instant every item a worker has finished is either in the output or in a transit
file: if ``resilpool run`` is killed, the rerun recovers those lines, and only the
item each worker was running at the kill runs again.  No fsync: a kill -9 of the
runner loses nothing the kernel holds.

With ``capture`` (chunks, no retry policy), an exception of the function is that
item's error record and the chunk goes on; without it (one item per task, when the
pool retries), it propagates so that the pool retries the task.

The wrapper is a module attribute named after its target (``resilpool.cli._task``
attribute ``"mymod:f"``; dots become ``/``, since pickle splits names on dots), so
it pickles by reference, as cheaply as a plain function, once per task.  A worker
that unpickles that reference finds no such attribute at first: the module's
``__getattr__`` imports the target and makes the wrapper then.  The pool's
messages name the task's function ``mymod:f`` (``pkg/mod:f`` for ``pkg.mod:f``).

This module imports nothing heavy, so a worker does not import sqlite3 or rich.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import mmap
import os
import resource
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ChunkItem", "ChunkResult", "dumps_result", "error_record", "item_call"]

#: An item as sent: ``(index, value, the item's input as JSON text)``.
ChunkItem = tuple[int, Any, str]
#: Per chunk: ``(pid, peak RSS bytes, started (time.time()), the output lines of the items
#: done, joined, seconds per item in the chunk's order, {position in the chunk: error record}
#: of the items failed)``.  Item k started ``started + sum(elapsed[:k])``.
ChunkResult = tuple[int, int, float, bytes, list[float], dict[int, dict[str, Any]]]
#: The wrapper's signature: ``call(chunk, transit path or None, capture errors)``.
ChunkCall = Callable[[list[ChunkItem], "str | None", bool], ChunkResult]


def error_record(exc: BaseException, tb: str | None = None) -> dict[str, Any]:
    """What the errors file says of ``exc``: type, module, message, notes (and the traceback)."""
    notes = [str(n) for n in getattr(exc, "__notes__", None) or ()]
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    record: dict[str, Any] = {"type": type(exc).__qualname__, "module": type(exc).__module__, "message": message, "notes": notes}
    if tb is not None:
        record["traceback"] = tb.strip()
    return record


_TRANSIT_BYTES = 1 << 20  #: a transit file's first size (sparse); it doubles when full


class _Transit:
    """This worker's transit file (owned by the worker's task thread: one task at a time)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.map: mmap.mmap | None = None
        self.pos = 0
        self.token = os.urandom(4).hex()

    def open(self, path: str) -> None:
        """Append to ``PATH-PID-TOKEN`` from now on (the runner moves to a new path now and then)."""
        if path == self.path:
            return
        self.close()
        fd = os.open(f"{path}-{os.getpid()}-{self.token}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, _TRANSIT_BYTES)
            self.map = mmap.mmap(fd, _TRANSIT_BYTES)  # shared: the writes are the file's
        finally:
            os.close(fd)  # the map keeps the file
        self.path, self.pos = path, 0

    def append(self, line: bytes) -> None:
        """Append one line (ending with its newline): the body first, the newline last."""
        m = self.map
        assert m is not None
        end = self.pos + len(line)
        if end > len(m):
            m.resize(max(2 * len(m), end + _TRANSIT_BYTES))  # grows the file too
        m[self.pos : end - 1] = line[:-1]
        m[end - 1] = 10
        self.pos = end

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        self.map, self.path = None, None


_transit = _Transit()


def _to_json(value: Any) -> Any:
    """JSON for the usual types of scientific results (numpy scalars and arrays, dataclasses, sets)."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"the result is not JSON serializable: {type(value).__qualname__} {value!r:.80}")


#: ``value`` as one line of JSON; TypeError if it has no JSON form.
dumps_result: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False, default=_to_json).encode


def _import_target(target: str) -> Callable[[Any], Any]:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _make_call(fn: Callable[[Any], Any], name: str) -> ChunkCall:
    getpid, now, getrusage, SELF = os.getpid, time.time, resource.getrusage, resource.RUSAGE_SELF
    dumps = dumps_result

    def call(chunk: list[ChunkItem], transit: str | None, capture: bool) -> ChunkResult:
        if transit is not None:
            _transit.open(transit)
        append = _transit.append if transit is not None else None
        lines: list[bytes] = []
        times: list[float] = []
        failed: dict[int, dict[str, Any]] = {}
        started = t = now()
        for pos, (idx, value, input_json) in enumerate(chunk):
            try:
                text = dumps(fn(value))
            except Exception as exc:
                elapsed = now() - t
                if not capture:
                    # Where and how long it ran, for the journal (attributes travel with the pickle).
                    try:
                        exc._resilpool_pid = getpid()  # type: ignore[attr-defined]
                        exc._resilpool_elapsed = elapsed  # type: ignore[attr-defined]
                    except Exception:
                        pass
                    raise
                import traceback  # only on this error path

                record = failed[pos] = error_record(exc, "".join(traceback.format_exception(exc)))
                if append is not None:
                    append((dumps({"index": idx, "error": record, "elapsed": elapsed}) + "\n").encode())
                times.append(elapsed)
                t += elapsed
                continue
            except BaseException as exc:
                try:
                    exc._resilpool_pid = getpid()  # type: ignore[attr-defined]
                    exc._resilpool_elapsed = now() - t  # type: ignore[attr-defined]
                except Exception:
                    pass
                raise
            line = f'{{"index": {idx}, "input": {input_json}, "result": {text}}}\n'.encode()
            if append is not None:
                append(line)  # before the next item starts
            lines.append(line)
            end = now()
            times.append(end - t)
            t = end
        # ru_maxrss: the worker's own peak, KiB on Linux (a task's subprocesses: the pool's monitor).
        return getpid(), getrusage(SELF).ru_maxrss * 1024, started, b"".join(lines), times, failed

    call.__module__ = __name__
    call.__name__ = call.__qualname__ = name
    call.__doc__ = fn.__doc__
    return call


def item_call(target: str, fn: Callable[[Any], Any] | None = None) -> ChunkCall:
    """The wrapper of ``target`` (``"module:qualname"``, importable), made once per process.

    ``fn`` is the target itself when the caller has imported it already.
    """
    name = target.replace(".", "/")
    call = globals().get(name)
    if call is None:
        call = _make_call(fn if fn is not None else _import_target(target), name)
        globals()[name] = call
    return call


def __getattr__(name: str) -> Any:
    # A worker unpickling the reference to a wrapper lands here once: make it.
    if ":" in name:
        return item_call(name.replace("/", "."))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
