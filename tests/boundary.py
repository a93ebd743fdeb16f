"""Task helpers for tests/test_serialization.py: exceptions and results that fight pickling.

Importable by workers under every start method (like workload.py).
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from typing import Any

class Tracked:
    """When unpickled (in the worker), creates ``path`` once it is collected there."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (_arrive, (self.path,))


def _arrive(path: str) -> Tracked:
    t = Tracked(path)
    weakref.finalize(t, _touch, path)
    return t


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def take(obj: Any) -> None:
    return None


def give_tracked(path: str) -> Tracked:
    return _arrive(path)


class TwoArgsError(Exception):
    """Pickles fine; unpickling calls ``__init__`` with one argument and fails."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code


def raise_two_args_error() -> None:
    raise TwoArgsError(7, "needs two")


class DeepError(Exception):
    """Carries a structure too deep for the pickler (RecursionError while pickling)."""


def raise_deep_error() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    err = DeepError("too deep to pickle")
    err.payload = deep  # type: ignore[attr-defined]
    raise err


def recurse(n: int = 0) -> int:
    """Real deep recursion: RecursionError with a traceback of ~1000 frames (joblib's thread bomb)."""
    return recurse(n + 1) + 1


def _fail_in(pid: int) -> FailsInParentError:
    if os.getpid() == pid:
        raise RuntimeError("this exception cannot be rebuilt in the parent")
    return FailsInParentError(pid)


class FailsInParentError(Exception):
    """Unpickles in the worker, raises when unpickled in the parent (pid given)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"raised for parent {pid}")
        self.pid = pid

    def __reduce__(self) -> Any:
        return (_fail_in, (self.pid,))


def raise_fails_in_parent(parent_pid: int) -> None:
    raise FailsInParentError(parent_pid)


def raise_not_importable() -> None:
    """An exception whose class the parent cannot import, and which does not pickle."""
    cls = type("Phantom", (Exception,), {"__module__": "no_such_module_anywhere"})
    err = cls("from nowhere")
    err.lock = sys  # a module: cannot be pickled
    raise err


class _ReduceRaises:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> Any:
        raise self.exc


def result_raising_keyboard_interrupt() -> Any:
    return _ReduceRaises(KeyboardInterrupt("from __reduce__"))


def result_raising_system_exit() -> Any:
    return _ReduceRaises(SystemExit(5))


# --- the worker as a child subreaper (tests/test_reaper.py) -------------------------------


def _zombie_children() -> set[int]:
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        out.add(pid)
            except OSError:
                continue
    return out


def leave_exited_orphan() -> int:
    """Double-fork a process that exits at once; return when it is our (adopted) zombie."""
    import subprocess
    import time

    subprocess.run(["sh", "-c", "true &"], check=True)
    deadline = time.monotonic() + 20
    while not _zombie_children() and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(_zombie_children())


def zombie_count() -> int:
    return len(_zombie_children())


_KEPT: list[Any] = []


def start_kept_process(code: int) -> None:
    """Start a multiprocessing child that exits with ``code``; keep it (not joined) for a later task."""
    import multiprocessing
    import time

    p = multiprocessing.get_context("spawn").Process(target=os._exit, args=(code,))
    p.start()
    _KEPT.append(p)
    deadline = time.monotonic() + 20
    while p.pid not in _zombie_children() and time.monotonic() < deadline:
        time.sleep(0.01)


def join_kept_process() -> int | None:
    p = _KEPT.pop()
    p.join(20)
    return p.exitcode


def fork_daemons_forever(ready: str, seconds: str) -> None:
    """Start setsid'd double-forked ``sleep SECONDS`` in a loop (touching ``ready`` after the first) until killed."""
    while True:
        _setsid_sleep(seconds, check=False)
        _touch(ready)
        time.sleep(0.001)


def init_leaving_a_daemon(seconds: str, how: str) -> None:
    """An initializer that starts a setsid'd double-forked ``sleep SECONDS``, then makes its
    worker leave: ``raise`` (a failed initializer) or ``break`` (closes the result pipe, so
    the worker's next write fails, as after its parent died)."""
    from resilpool._core.worker import result_fd

    _setsid_sleep(seconds, check=True)
    if how == "raise":
        raise RuntimeError("initializer failed after starting a daemon")
    os.close(result_fd())


def daemon_and_stopped_child(seconds: str) -> None:
    """Start a setsid'd double-forked ``sleep SECONDS`` and a plain ``sleep SECONDS`` child
    (in our worker's process group), SIGSTOP that child, then wait."""
    import signal
    import subprocess

    _setsid_sleep(seconds, check=True)
    child = subprocess.Popen(["sleep", seconds])
    os.kill(child.pid, signal.SIGSTOP)
    time.sleep(120)


def _setsid_sleep(seconds: str, *, check: bool) -> None:
    """Leave a ``sleep SECONDS`` out of our session and process group, re-parented away from us (double fork)."""
    import subprocess

    subprocess.run(["sh", "-c", f"sleep {seconds} </dev/null >/dev/null 2>&1 &"], start_new_session=True, check=check)
