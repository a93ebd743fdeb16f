"""Event records, worker snapshots and pool statistics.

Events are small frozen dataclasses, past tense, one per meaning.  The pool's
manager thread creates them; listeners added with
:meth:`ResilientPool.add_listener` receive them on the pool's event thread, in
order, never on the thread that runs the pool, so a slow or failing listener
cannot stall or break it.  Events concern workers and failures, never every
task: the happy path emits nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = [
    "CoreRebuilt",
    "CrashLoopTripped",
    "DispatchPaused",
    "DispatchResumed",
    "Event",
    "ExitReason",
    "PoolStats",
    "TaskQuarantined",
    "TaskRetried",
    "WorkerExited",
    "WorkerInfo",
    "WorkerStarted",
]


class ExitReason(enum.Enum):
    """Why a worker left the pool."""

    SOFT_MEMORY = "soft_memory"  #: retired after its task: over soft_max_rss
    MEMORY = "memory"  #: killed mid-task: over max_rss
    MAX_TASKS = "max_tasks"  #: retired after max_tasks tasks
    LIFETIME = "lifetime"  #: retired after max_lifetime seconds
    TIMEOUT = "timeout"  #: killed: its task passed task_timeout
    STALL = "stall"  #: killed: its task used no CPU for stall_timeout
    CRASH = "crash"  #: died by itself (signal, os._exit, segfault, OOM killer)
    STARTUP = "startup"  #: died before it was ready (initializer failed, broken environment)
    SHUTDOWN = "shutdown"  #: the pool shut down
    REBUILD = "rebuild"  #: its core broke and was replaced

    @property
    def is_recycle(self) -> bool:
        """True for the reasons the supervisor acts on (limits), not crashes or shutdown."""
        return self in _RECYCLE


_RECYCLE = frozenset(
    {
        ExitReason.SOFT_MEMORY,
        ExitReason.MEMORY,
        ExitReason.MAX_TASKS,
        ExitReason.LIFETIME,
        ExitReason.TIMEOUT,
        ExitReason.STALL,
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStarted:
    """A worker finished its initializer and takes tasks."""

    pid: int
    replaces: int | None  #: pid of the worker it replaces, if any


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerExited:
    """A worker left the pool; ``task_id`` is the task it cost, if any."""

    pid: int
    exitcode: int | None
    reason: ExitReason
    task_id: int | None
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRetried:
    """A failed attempt of an idempotent task was scheduled again."""

    task_id: int
    attempt: int  #: the attempt that failed (1-based)
    delay_s: float
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskQuarantined:
    """A task killed its worker too often; it fails with PoisonTaskError."""

    task_id: int
    crashes: int
    fn_name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashLoopTripped:
    """Workers kept failing at start-up; the pool is broken."""

    deaths: int
    window_s: float
    cause: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreRebuilt:
    """The executor core broke; a new one took over the work."""

    cause: str
    carried_over: int  #: tasks moved to the new core
    failed: int  #: started tasks without retry, failed with WorkerCrashedError


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchPaused:
    """The pool stopped starting tasks (e.g. the machine is low on memory)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchResumed:
    """The pool starts tasks again."""

    reason: str


Event: TypeAlias = (
    WorkerStarted
    | WorkerExited
    | TaskRetried
    | TaskQuarantined
    | CrashLoopTripped
    | CoreRebuilt
    | DispatchPaused
    | DispatchResumed
)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """A snapshot of one worker (``ResilientPool.workers()``)."""

    pid: int
    rss: int | None  #: resident memory of its process tree, bytes (None: not sampled yet)
    cpu_percent: float | None  #: CPU use of its tree over the last sample interval
    task_id: int | None  #: the task it runs now
    running_since: float | None  #: ``time.monotonic()`` when that task started
    tasks_done: int  #: tasks it has started so far
    age_s: float  #: seconds since it was started
    ready: bool  #: its initializer has returned
    retiring: bool  #: it takes no new task and leaves after the ones it has


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats:
    """A frozen snapshot of the pool's counters (``ResilientPool.stats()``)."""

    workers: int  #: live, ready workers
    max_workers: int
    submitted: int
    pending: int  #: submitted, not resolved, not running
    running: int  #: started in a worker, not resolved
    completed: int  #: resolved with a result
    failed: int  #: resolved with an exception
    cancelled: int
    retried: int  #: attempts scheduled again
    quarantined: int
    worker_crashes: int  #: workers that died by themselves (or at start-up)
    workers_started: int  #: processes ever started
    recycled: dict[str, int] = field(default_factory=dict)  #: exits by reason (ExitReason values)
    peak_worker_rss: int = 0  #: highest process-tree RSS sampled, bytes
    rebuilds: int = 0
    broken: bool = False
