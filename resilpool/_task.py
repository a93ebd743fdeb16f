"""The call ``resilpool run`` sends to a worker: the user's function on one item.

``item_call("mymod:f")`` is a wrapper of ``mymod.f`` that runs in the worker: it
calls the function, encodes the result as JSON there (in parallel, and so that a
result JSON cannot hold fails as that item's error, retried like any other), and
returns what the journal records: the worker's pid, the wall-clock start, the
elapsed time and the worker's peak resident memory.

The wrapper is a module attribute named after its target (``resilpool._task``
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
import os
import resource
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ItemResult", "dumps_result", "item_call"]

#: ``(result JSON text, pid, started (time.time()), elapsed_s, peak RSS bytes)``
ItemResult = tuple[str, int, float, float, int]


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


def _make_call(fn: Callable[[Any], Any], name: str) -> Callable[[Any], ItemResult]:
    getpid, now, getrusage, SELF = os.getpid, time.time, resource.getrusage, resource.RUSAGE_SELF
    dumps = dumps_result

    def call(item: Any) -> ItemResult:
        started = now()
        try:
            text = dumps(fn(item))
        except BaseException as exc:
            # Where and how long it ran, for the journal (attributes travel with the pickle).
            try:
                exc._resilpool_pid = getpid()  # type: ignore[attr-defined]
                exc._resilpool_elapsed = now() - started  # type: ignore[attr-defined]
            except Exception:
                pass
            raise
        # ru_maxrss: the worker's own peak, KiB on Linux (a task's subprocesses: the pool's monitor).
        return text, getpid(), started, now() - started, getrusage(SELF).ru_maxrss * 1024

    call.__module__ = __name__
    call.__name__ = call.__qualname__ = name
    call.__doc__ = fn.__doc__
    return call


def item_call(target: str, fn: Callable[[Any], Any] | None = None) -> Callable[[Any], ItemResult]:
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
