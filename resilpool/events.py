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
from typing import Final, TypeAlias

__all__ = [
    "CoreRebuilt",
    "CrashLoopTripped",
    "DURATION_BOUNDS_S",
    "DispatchPaused",
    "DispatchResumed",
    "DurationHistogram",
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
    ABORT = "abort"  #: killed: its task was aborted (ResilientPool.abort, shutdown(kill_running=True))
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


#: The upper bounds, seconds, of the buckets of every task-duration histogram: from tiny
#: tasks to hour-long ones (the last bucket, +Inf, is implied). Fixed, so that histograms
#: of two cores, or two pools, add up bucket by bucket.
DURATION_BOUNDS_S: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class DurationHistogram:
    """Task durations (seconds from submission to resolution), in Prometheus's form.

    ``cumulative[i]`` counts the tasks that took at most ``bounds_s[i]`` seconds;
    ``cumulative[-1]``, one more entry than there are bounds, counts them all (the +Inf
    bucket, :attr:`count`). ``sum_s`` is their total duration.
    """

    bounds_s: tuple[float, ...] = DURATION_BOUNDS_S
    cumulative: tuple[int, ...] = (0,) * (len(DURATION_BOUNDS_S) + 1)
    sum_s: float = 0.0

    @property
    def count(self) -> int:
        """Every task counted."""
        return self.cumulative[-1]

    def __add__(self, other: DurationHistogram) -> DurationHistogram:
        if other.bounds_s != self.bounds_s:
            raise ValueError("DurationHistogram: only histograms with the same bounds_s add up")
        return DurationHistogram(
            bounds_s=self.bounds_s,
            cumulative=tuple(a + b for a, b in zip(self.cumulative, other.cumulative, strict=True)),
            sum_s=self.sum_s + other.sum_s,
        )


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
    #: tasks failed, by the qualified name of their exception's type (``"ValueError"``,
    #: ``"resilpool.errors.WorkerCrashedError"``); the values add up to ``failed``
    errors: dict[str, int] = field(default_factory=dict)
    #: attempts scheduled again, by the qualified name of their error's type; the values
    #: add up to ``retried``
    retried_errors: dict[str, int] = field(default_factory=dict)
    #: seconds from submission to resolution of every task resolved, under ``"succeeded"``
    #: (``completed`` tasks) and ``"failed"`` (``failed`` ones); cancelled tasks are not timed
    durations: dict[str, DurationHistogram] = field(default_factory=dict)
