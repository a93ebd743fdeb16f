"""Task functions of the chaos suite: importable by workers under every start method.

Every task is a :class:`Work` object.  Its side effects are counted outside the pool,
in one append-only log per run (``O_APPEND``, one ``write`` per line, so lines stay
whole when a worker is killed mid-run):

- ``S <key> <pid>``: an attempt *started*.  Written while the task is unpickled in the
  worker (``Work.__reduce__`` makes unpickling call :func:`_arrive`), i.e. right after
  the worker's start acknowledgement and before any other part of the task runs.
- ``E <key> <pid>``: the side effect of a non-idempotent task happened (written at the
  end of the work, just before it returns).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

_LEAK: list[bytes] = []

#: Kinds whose task should succeed (when no fault stops it).
SUCCEEDING = frozenset({"pure", "spin", "sleep", "leak", "subproc", "daemon", "setsid"})
#: Kinds whose task always fails, and how.
FAILING = frozenset({"timeout", "poison", "raise"})


def expected_value(key: int) -> int:
    return (key * 2654435761) % 2**32


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _arrive(log: str, key: int, kind: str, effect: bool, param: float) -> Work:
    _append(log, f"S {key} {os.getpid()}\n")
    return Work(log, key, kind, effect, param)


def _spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def _daemon(seconds: float, *, new_session: bool) -> None:
    """Leave a ``sleep`` behind that neither this process nor its group waits for."""
    sh = subprocess.Popen(
        ["sh", "-c", f"sleep {seconds} </dev/null >/dev/null 2>&1 &"],
        start_new_session=new_session,
        stdin=subprocess.DEVNULL,
    )
    sh.wait(timeout=30)


class Work:
    """One task: ``kind`` says what it does, ``effect`` makes it non-idempotent."""

    __slots__ = ("effect", "key", "kind", "log", "param")

    def __init__(self, log: str, key: int, kind: str, effect: bool, param: float) -> None:
        self.log = log
        self.key = key
        self.kind = kind
        self.effect = effect
        self.param = param

    def __reduce__(self) -> Any:
        return (_arrive, (self.log, self.key, self.kind, self.effect, self.param))

    def __repr__(self) -> str:
        return f"Work({self.key}, {self.kind}{', effect' if self.effect else ''})"

    def __call__(self) -> int:
        kind = self.kind
        if kind == "spin" or kind == "timeout":
            _spin(self.param)
        elif kind == "sleep":
            time.sleep(self.param)
        elif kind == "leak":
            _LEAK.append(b"\1" * int(self.param * 2**20))  # resident at once
        elif kind == "subproc":
            subprocess.run(["sleep", str(self.param)], check=True)
        elif kind == "daemon":  # double fork: the shell exits, its `sleep` is orphaned
            _daemon(self.param, new_session=False)
        elif kind == "setsid":  # setsid, then double fork: out of the worker's group and session
            _daemon(self.param, new_session=True)
        elif kind == "poison":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "raise":
            raise ValueError(f"task {self.key} raises")
        if self.effect:
            _append(self.log, f"E {self.key} {os.getpid()}\n")
        return expected_value(self.key)


def work_label(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The injector's label of a submission: the task's key (a map chunk: the tuple of keys)."""
    if isinstance(fn, Work):
        return fn.key
    if len(args) >= 2 and isinstance(args[1], list):  # call_chunk(fn, chunk[, star]): a map chunk
        return tuple(_item_key(item) for item in args[1])
    return None


def _item_key(item: Any) -> Any:
    if isinstance(item, Work):
        return item.key
    if isinstance(item, tuple) and item and isinstance(item[0], Work):
        return item[0].key
    return None


def call(work: Work) -> int:
    """For ``pool.map(call, works)``."""
    return work()
