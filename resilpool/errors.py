"""The one exception hierarchy of resilpool.

Each error subclasses the standard-library type with the same meaning, so code
written for :class:`concurrent.futures.ProcessPoolExecutor` keeps catching it::

    ResilpoolError
    ├─ WorkerCrashedError (+BrokenProcessPool)   pid, exitcode, task_id, fn_name
    ├─ TaskTimeoutError (+TimeoutError)          pid, timeout, elapsed
    │  └─ TaskStalledError                       cpu_seconds
    ├─ MemoryLimitError                          pid, rss, limit
    ├─ PoisonTaskError                           crashes, fn_name, args_repr
    ├─ CrashLoopError (+BrokenProcessPool)       deaths, window
    └─ SerializationError (+pickle.PicklingError) part

    RemoteTraceback (+concurrent.futures.process._RemoteTraceback)
        the worker's traceback text, set as ``__cause__`` of an error raised in a worker

Attributes are keyword arguments and stay on the instance; every error survives
a pickle round trip (``__reduce__`` carries the attributes, notes and message),
so an error can travel between processes and through a journal.  Earlier
attempts of a retried task are recorded as PEP 678 notes.
"""

from __future__ import annotations

import pickle
import signal
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from typing import Any

__all__ = [
    "CrashLoopError",
    "MemoryLimitError",
    "PoisonTaskError",
    "RemoteTraceback",
    "ResilpoolError",
    "SerializationError",
    "TaskStalledError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "describe_exit",
]


def describe_exit(exitcode: int | None) -> str:
    """Say in words how a process ended: ``killed by SIGKILL``, ``exited with code 3``."""
    if exitcode is None:
        return "vanished (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


def _restore(cls: type[ResilpoolError], args: tuple[Any, ...], state: dict[str, Any]) -> ResilpoolError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class ResilpoolError(Exception):
    """Base of every error resilpool raises about a task or the pool."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.__dict__.update(fields)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (type(self), self.args, dict(self.__dict__)))


class WorkerCrashedError(ResilpoolError, BrokenProcessPool):
    """The worker process running the task died (crash, signal, OOM kill).

    Attributes:
        pid: the worker's process id.
        exitcode: its exit code; negative signal number when killed by a signal.
        task_id: the pool's id of the task it was running.
        fn_name: qualified name of the task's function.
    """

    pid: int | None
    exitcode: int | None
    task_id: int | None
    fn_name: str | None

    def __init__(
        self,
        message: str | None = None,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        task_id: int | None = None,
        fn_name: str | None = None,
    ) -> None:
        if message is None:
            message = f"worker {pid} {describe_exit(exitcode)} while running task {task_id} (fn={fn_name})"
        super().__init__(message, pid=pid, exitcode=exitcode, task_id=task_id, fn_name=fn_name)


class TaskTimeoutError(ResilpoolError, TimeoutError):
    """The task ran longer than its ``task_timeout``; its worker was killed.

    Attributes:
        pid: the worker that ran it.
        timeout: the limit in seconds.
        elapsed: how long it had run when it was killed, in seconds.
        task_id: the pool's id of the task.
    """

    pid: int | None
    timeout: float | None
    elapsed: float | None
    task_id: int | None

    def __init__(
        self,
        message: str | None = None,
        *,
        pid: int | None = None,
        timeout: float | None = None,
        elapsed: float | None = None,
        task_id: int | None = None,
        **fields: Any,
    ) -> None:
        if message is None:
            message = (
                f"task {task_id} ran {elapsed or 0.0:.2f}s, over its task_timeout of {timeout}s;"
                f" worker {pid} was killed"
            )
        super().__init__(message, pid=pid, timeout=timeout, elapsed=elapsed, task_id=task_id, **fields)


class TaskStalledError(TaskTimeoutError):
    """The task's worker used (almost) no CPU for ``stall_timeout`` seconds: hung, killed.

    Attributes:
        cpu_seconds: CPU time the worker tree used over that window.
    """

    cpu_seconds: float | None

    def __init__(
        self,
        message: str | None = None,
        *,
        pid: int | None = None,
        timeout: float | None = None,
        elapsed: float | None = None,
        task_id: int | None = None,
        cpu_seconds: float | None = None,
    ) -> None:
        if message is None:
            message = (
                f"task {task_id} stalled: worker {pid} used {cpu_seconds or 0.0:.3f}s of CPU in the last"
                f" {timeout}s (stall_timeout) after running {elapsed or 0.0:.2f}s; it was killed"
            )
        super().__init__(
            message, pid=pid, timeout=timeout, elapsed=elapsed, task_id=task_id, cpu_seconds=cpu_seconds
        )


class MemoryLimitError(ResilpoolError):
    """The worker's process tree passed ``max_rss`` and was killed mid-task.

    Attributes:
        pid: the worker's process id.
        rss: the measured resident memory of its process tree, in bytes.
        limit: the ``max_rss`` limit, in bytes.
        task_id: the pool's id of the task it was running.
    """

    pid: int | None
    rss: int | None
    limit: int | None
    task_id: int | None

    def __init__(
        self,
        message: str | None = None,
        *,
        pid: int | None = None,
        rss: int | None = None,
        limit: int | None = None,
        task_id: int | None = None,
    ) -> None:
        if message is None:
            message = (
                f"worker {pid} used {_mib(rss)} of memory, over max_rss {_mib(limit)},"
                f" while running task {task_id}; it was killed"
            )
        super().__init__(message, pid=pid, rss=rss, limit=limit, task_id=task_id)


class PoisonTaskError(ResilpoolError):
    """The task killed its worker too many times and was quarantined.

    Attributes:
        crashes: how many worker deaths were blamed on it.
        fn_name: qualified name of its function.
        args_repr: a short repr of its arguments, to find the bad input.
        task_id: the pool's id of the task.
    """

    crashes: int | None
    fn_name: str | None
    args_repr: str | None
    task_id: int | None

    def __init__(
        self,
        message: str | None = None,
        *,
        crashes: int | None = None,
        fn_name: str | None = None,
        args_repr: str | None = None,
        task_id: int | None = None,
    ) -> None:
        if message is None:
            message = (
                f"task {task_id} {fn_name}{args_repr} killed its worker {crashes} times;"
                " quarantined (not run again)"
            )
        super().__init__(message, crashes=crashes, fn_name=fn_name, args_repr=args_repr, task_id=task_id)


class CrashLoopError(ResilpoolError, BrokenProcessPool):
    """Workers kept dying at start-up; the pool stopped respawning and is broken.

    The last start-up failure (for instance the initializer's exception, with
    its traceback) is the ``__cause__``.

    Attributes:
        deaths: start-up failures counted within the window.
        window: the breaker's window, in seconds.
    """

    deaths: int | None
    window: float | None

    def __init__(
        self, message: str | None = None, *, deaths: int | None = None, window: float | None = None
    ) -> None:
        if message is None:
            message = (
                f"crash loop: {deaths} workers failed at start-up within {window}s;"
                " the pool stopped starting workers and is broken"
            )
        super().__init__(message, deaths=deaths, window=window)


class SerializationError(ResilpoolError, pickle.PicklingError):
    """Part of a task (function, an argument, or its result) could not be pickled or unpickled.

    Attributes:
        part: which part: ``"function"``, ``"argument 0"``, ``"keyword argument 'x'"``, ``"result"``.
        task_id: the pool's id of the task.
    """

    part: str | None
    task_id: int | None

    def __init__(self, message: str, *, part: str | None = None, task_id: int | None = None) -> None:
        super().__init__(message, part=part, task_id=task_id)


class RemoteTraceback(_RemoteTraceback):
    """The traceback of an exception raised in a worker, as text; set as the error's ``__cause__``.

    A subclass of the stdlib's ``concurrent.futures.process._RemoteTraceback``, so code
    (and tests) written for :class:`~concurrent.futures.ProcessPoolExecutor` that look
    for that class find it. ``str()`` is the traceback text; so is the ``tb`` attribute.
    """

    def __init__(self, tb: str) -> None:
        Exception.__init__(self, tb)  # the stdlib's __init__ (typed as taking a TracebackType) sets only tb
        self.tb = tb

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.tb,))


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"
