"""Task functions for the core's own tests (tests/test_core.py): importable by workers."""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path
from typing import Any


def _result_fd() -> int:
    """The worker's result pipe, found in the frame of its serving loop (tests only)."""
    f = sys._getframe()
    while f is not None and f.f_code.co_name != "_serve":
        f = f.f_back  # type: ignore[assignment]
    if f is None:
        raise RuntimeError("not running in a resilpool worker")
    return int(f.f_locals["out_fd"])


def write_junk(n: int = 64, seed: int = 7) -> None:
    """Write ``n`` bytes of junk on the worker's result pipe, then wait to be killed."""
    import random

    os.write(_result_fd(), random.Random(seed).randbytes(n))
    time.sleep(60)


def answer_for(other_task_id: int) -> None:
    """Send a well-formed result frame for another task id (a protocol violation), then wait."""
    body = b"\x80\x05K*."  # pickle of 42
    os.write(_result_fd(), struct.pack("<QBqd", len(body), 17, other_task_id, 0.0) + body)
    time.sleep(60)


class SystemExitOnUnpickle:
    """Pickles fine; raises SystemExit when unpickled (in the parent, as a result)."""

    def __reduce__(self) -> Any:
        return (_raise_system_exit, ())


def _raise_system_exit() -> None:
    raise SystemExit(3)


def make_system_exit_on_unpickle(_: Any = None) -> SystemExitOnUnpickle:
    return SystemExitOnUnpickle()


def record(path: str, value: Any = None) -> Any:
    """Append a line to ``path``: a run counted outside the pool."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return value


def start_and_wait(started: str, release: str, timeout: float = 30.0) -> int:
    """Create ``started``, then block until ``release`` exists; return this worker's pid."""
    Path(started).touch()
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(release)
        time.sleep(0.002)
    return os.getpid()


def hang(path: str, seconds: float = 3600.0) -> None:
    """An initializer that never finishes (within any test's patience)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
