"""Task functions whose results or errors block while the *parent* unpickles them.

The gates are ``threading.Event``s in this module, looked up by key in the process that
unpickles (the parent): a test creates them with :func:`gate`, sees the unpickling
start (``entered``) and ends it (``release``). In a worker the module is imported too,
and an exception is unpickled there once (to check it round-trips): the gates only block
in the process that made them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from typing import Any

_GATES: dict[str, tuple[int, threading.Event, threading.Event]] = {}


def gate(key: str) -> tuple[threading.Event, threading.Event]:
    """``(entered, release)`` for ``key``: set when unpickling starts; set it to let it end."""
    _, entered, release = _GATES.setdefault(key, (os.getpid(), threading.Event(), threading.Event()))
    return entered, release


def _wait_at_gate(key: str) -> None:
    """Block at the gate in the process that made it (the test's); pass anywhere else
    (a worker that checks that an exception unpickles, a forked worker's copy of the table)."""
    g = _GATES.get(key)
    if g is None or g[0] != os.getpid():
        return
    _, entered, release = g
    entered.set()
    release.wait(60.0)  # bounded: a test that forgets to release still ends


class BlockedResult:
    """A result whose unpickling in the parent blocks at gate ``key``."""

    def __init__(self, key: str, value: Any) -> None:
        self.key = key
        self.value = value

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _wait_at_gate(state["key"])
        self.key = state["key"]
        self.value = state["value"]


def blocked_result(key: str, value: Any) -> BlockedResult:
    return BlockedResult(key, value)


@contextlib.contextmanager
def result_blocked_in_unpickling(pool: Executor, key: str, value: Any, timeout: float) -> Iterator[Future[Any]]:
    """Submit a task whose result blocks while the parent unpickles it; yield its future
    once the unpickling has started (and is blocked); release it on leaving."""
    entered, release = gate(key)
    try:
        fut = pool.submit(blocked_result, key, value)
        if not entered.wait(timeout):
            raise AssertionError(f"the result of {key!r} was not unpickled within {timeout}s")
        yield fut
    finally:
        release.set()


class BlockedError(Exception):
    """An exception whose unpickling in the parent blocks at gate ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __reduce__(self) -> Any:
        return (_rebuild_blocked_error, (self.key,))


def _rebuild_blocked_error(key: str) -> BlockedError:
    _wait_at_gate(key)
    return BlockedError(key)


def fail_once_blocked(key: str, marker: str) -> int:
    """Raise a :class:`BlockedError` on the first call (``marker`` not there yet), return the pid after."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise BlockedError(key)
    return os.getpid()
