"""Task functions for the tests: importable by workers under every start method."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

_LEAK: list[bytearray] = []


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int = 0) -> int:
    return x + y


def identity(x: Any) -> Any:
    return x


def pid_of(_: Any = None) -> int:
    return os.getpid()


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def exit_now(code: int = 3) -> None:
    os._exit(code)


def raise_value_error(msg: str = "boom") -> None:
    raise ValueError(msg)


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Block until ``path`` exists: lets a test hold a task running without sleeping in the test."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return path


def touch_and_wait(started: str, release: str, timeout: float = 30.0) -> int:
    Path(started).touch()
    wait_for_file(release, timeout)
    return os.getpid()


def count_run(path: str, value: Any = None) -> Any:
    """Append a line to ``path`` (a side effect counted outside the pool), return ``value``."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return value


def crash_first_time(marker: str, value: Any = None) -> Any:
    """SIGKILL its own worker the first time it runs (no marker file yet), succeed afterwards."""
    with open(marker + ".runs", "a") as f:
        f.write("x")
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def leak(mb: int) -> int:
    """Keep ``mb`` MiB alive in the worker (a leaky task); return the worker's pid."""
    _LEAK.append(bytearray(mb * 2**20))
    return os.getpid()


def hog(mb: int, hold: float = 30.0) -> None:
    """Allocate and touch ``mb`` MiB, then hold it."""
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(hold)


def block_on_lock(_: Any = None) -> None:
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()  # deadlock: no CPU, forever


def stop_self(_: Any = None) -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def subprocess_hog(mb: int, hold: float = 30.0) -> None:
    """Start a child process that holds ``mb`` MiB; wait for it."""
    import subprocess
    import sys

    code = f"b = bytearray({mb} * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep({hold})"
    subprocess.run([sys.executable, "-c", code], check=False)


def return_lock(_: Any = None) -> Any:
    return threading.Lock()


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable refuses to be pickled")


def fail_init(msg: str = "initializer exploded") -> None:
    raise RuntimeError(msg)


def set_global(value: Any) -> None:
    global _INIT_VALUE
    _INIT_VALUE = value


_INIT_VALUE: Any = None


def get_global(_: Any = None) -> Any:
    return _INIT_VALUE


# --- retry, quarantine, breaker and rebuild tests (tests/test_retry.py) ----------------


def _count(path: str) -> int:
    """Append this worker's pid to ``path``; return how many runs it records now."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        return len(f.read().splitlines())


def count_and_raise(path: str, exc_name: str = "ValueError") -> None:
    """Count a run in ``path``, then raise the builtin ``exc_name`` saying which run it was."""
    import builtins

    n = _count(path)
    raise getattr(builtins, exc_name)(f"run {n} failed")


def count_and_kill(path: str) -> None:
    """Count a run in ``path``, then SIGKILL its own worker (a poison task)."""
    _count(path)
    os.kill(os.getpid(), signal.SIGKILL)


def count_and_wait(path: str, release: str, timeout: float = 30.0) -> int:
    """Count a run in ``path`` (its existence says the task started), block until ``release`` exists."""
    _count(path)
    wait_for_file(release, timeout)
    return os.getpid()


def hang_first_time(marker: str, value: Any = None) -> Any:
    """Hang (no result, killed by a task_timeout) the first time; return ``value`` afterwards."""
    with open(marker + ".runs", "a") as f:
        f.write("x")
    if not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(60)
    return value


def crash_first_time_own_retry(marker: str, *, retry: Any) -> Any:
    """Like crash_first_time, for a function whose own parameter is called ``retry``."""
    return crash_first_time(marker, ("own retry", retry))
