"""The task state machine: every task table and transition, no I/O, clock injected.

One :class:`TaskBook` per core. It knows where each unresolved task is and moves
it on what a transport reports; it never touches a pipe, a process or a Dask
future. Both transports drive it: the local core (``executor.py``: pipes, slots,
sentinels) and the Dask core (``dask_core.py``: client, scheduler plugin).

Places (each unresolved task is in exactly one)::

    submit() ──> queued (FIFO; retries and tasks taken back go to the front)
                 │  fresh (local only: retries that must go to a worker that ran nothing yet)
                 │  timers (retries waiting for their backoff; ``task.due``, ``task.last_error``)
                 v
    take(holder) ──> held by a holder, in the order taken (local: a worker pid and its
                 │   FIFO of sent tasks; Dask: one attempt key holding one task)
                 v
    answered(holder, id) ──> "in hand" for one step of the owner thread, then exactly one of
                 succeeded(task, value) | attempt_failed(task, err, ...) -> retry / quarantine / fail
                 or, while its result is unpickled off the owner thread (local: decode.py),
                 decoding(task) ──> "decoding" ──> decoded(task) ──> in hand again, as above

    lost(holder, started=...): the holder is gone; its started task (if any) comes back in
    hand for ``attempt_failed``, the unstarted ones go back to the front of the queue, in order.
    take_back(holder, ids): unstarted tasks leave a live holder, back to the front of the queue.
    (An unstarted task that must not run any more, aborted or after shutdown(cancel_futures=True),
    is cancelled instead: its future is cancelled, or fails with CancelledError if it was running.)

Who calls what (the owner thread of the core only: the local manager thread, the Dask
core's event-loop thread; nothing here is thread-safe, and callers' threads never touch
it): ``submit`` when it takes the submitted tasks over; ``take`` when it dispatches;
``answered``/``succeeded``/``attempt_failed`` when a result arrives; ``lost`` on a
worker's death or departure; ``fire_timers`` every loop (``next_due`` bounds the wait);
``drain``, ``abort``, ``set_paused`` on commands; ``startup_failed`` when a worker fails
before it is ready (the crash-loop breaker lives here; tripping it fails every task no
holder has); ``salvage``/``adopt`` on a rebuild; ``snapshot`` is the one method other
threads may call (it reads ints only, never iterates a table the owner mutates).

Invariants (:meth:`TaskBook.check_invariants`, O(tasks), called by the property test
after every step and by the chaos suite when a pool is idle):

- every unresolved task is in exactly one place: queued, fresh, timers, one holder, decoding;
- no task is "in hand" between two steps;
- no task in a place has a resolved future (a user's cancel of a queued first attempt
  aside: ``take`` drops it), and no future was resolved twice;
- ``submitted == completed + failed + cancelled + unresolved``;
- every completed task is in one bucket of the succeeded-duration histogram, every failed
  one in one bucket of the failed-duration histogram and under one error type, every
  retried attempt under one error type (the counters of metrics and ``stats()``).

Futures: ``take`` calls ``set_running_or_notify_cancel()`` on a first attempt before
it is handed to a holder; each future is resolved exactly once, here.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import pickle
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import _base as _futures_base
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from .. import errors
from ..events import (
    DURATION_BOUNDS_S,
    CrashLoopTripped,
    DispatchPaused,
    DispatchResumed,
    DurationHistogram,
    Event,
    TaskQuarantined,
    TaskRetried,
)
from ..retry import RetryPolicy
from ..supervisor.breaker import CrashLoopBreaker
from . import worker as worker_module

__all__ = [
    "BookCounts",
    "CoreCounts",
    "CoreGone",
    "DurationEstimate",
    "InvariantViolation",
    "ProtocolViolation",
    "Task",
    "TaskBook",
    "WorkerCounters",
    "copy_error",
    "error_type_name",
    "resolve",
    "summary",
]

log = logging.getLogger("resilpool")

H = TypeVar("H", bound=Hashable)

MAX_DEPTH: Final = 256  # tasks queued to one worker at most (tiny tasks)
DEEP_BELOW_S: Final = 0.005  # queue more than one task per worker only when tasks are this short
# ... and enough of them to cover this much work: one GIL switch interval, so a worker
# does not run dry while a busy submitting thread keeps the owner thread from running.
PIPELINE_S: Final = 0.005


class CoreGone(Exception):
    """Internal: this core stopped accepting work (broken, being replaced)."""


class InvariantViolation(RuntimeError):
    """:meth:`TaskBook.check_invariants` found the tables inconsistent: a bug in resilpool."""


class ProtocolViolation(Exception):
    """A transport reported something impossible for a holder (a result for a task it does
    not hold). The transport kills that holder's worker; nothing else is affected."""


# --- the task record ------------------------------------------------------------


class Task:
    """One submitted call and everything known about its attempts. Owned by the core's owner thread."""

    __slots__ = (
        "aborted",
        "args",
        "attempt",
        "body",
        "crashes",
        "due",
        "first_start",
        "fn",
        "future",
        "id",
        "kwargs",
        "last_error",
        "last_worker",
        "needs_fresh",
        "notes",
        "retry",
        "retry_state",
        "seq",
        "submitted_at",
        "timeout",
    )

    def __init__(
        self,
        task_id: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        body: bytes,
        future: Future[Any],
        retry: RetryPolicy | None,
        timeout: float | None,
    ) -> None:
        self.id = task_id
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.body = body
        self.future = future
        self.retry = retry
        self.timeout = timeout
        self.attempt = 1
        self.crashes = 0
        self.needs_fresh = False
        self.notes: list[str] | None = None
        self.retry_state: Any = None
        self.first_start: float | None = None
        self.due: float | None = None  # when a retry waiting for its backoff may run
        self.last_error: BaseException | None = None  # the failed attempt a waiting retry follows
        self.last_worker: tuple[int | None, float] | None = None  # (pid, elapsed) if a rebuild interrupted it
        self.seq = 0  # transport's use: local, the worker's frame number of the current attempt
        self.submitted_at = 0.0  # the book's clock when a book first took it over (TaskBook.submit)
        self.aborted: str | None = None  # abort(): why; a failed attempt is then never retried

    @property
    def fn_name(self) -> str:
        fn = self.fn
        if fn is worker_module.call_chunk and self.args:
            fn = self.args[0]
        return getattr(fn, "__qualname__", None) or type(fn).__qualname__

    def args_repr(self, limit: int = 120) -> str:
        """A short repr of the arguments, to find a bad input."""
        parts = [_short_repr(a) for a in self.args]
        parts += [f"{k}={_short_repr(v)}" for k, v in self.kwargs.items()]
        text = "(" + ", ".join(parts) + ")"
        return text if len(text) <= limit else text[: limit - 4] + "...)"

    def __repr__(self) -> str:
        return f"<Task {self.id} fn={self.fn_name} attempt={self.attempt}>"


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


# --- helpers shared by the transports ---------------------------------------------

_futures_log = logging.getLogger("concurrent.futures")


def resolve(future: Future[Any], value: Any, exc: BaseException | None) -> bool:
    """Resolve a future, then run its done-callbacks; False if it was resolved already.

    The stdlib runs done-callbacks catching ``Exception`` only: one raising ``SystemExit``
    would unwind the thread resolving it (a core's owner thread) and break every
    running task. Here the callbacks are taken off the future (under its lock, so none
    is added meanwhile) and run after it is resolved, each one's exception,
    ``BaseException`` included, logged as the stdlib logs it ("exception calling
    callback for ...").

    This runs once per task on a core's owner thread, so it does what
    ``Future.set_result``/``set_exception`` do (the same fields, CPython 3.8 to 3.13) under
    one acquisition of the future's lock instead of nesting the stdlib's own. It takes
    the condition's lock itself and notifies only when a thread waits: the stdlib's
    ``Condition.__enter__``/``__exit__``/``notify_all``/``notify`` are Python functions,
    about 0.3 us per task (``Condition.wait`` adds its waiter under that same lock, so
    none can be missed).
    """
    f: Any = future
    cond = f._condition
    with cond._lock:
        if f._state in _RESOLVED_STATES:
            return False
        callbacks = f._done_callbacks
        f._done_callbacks = []
        f._state = _FINISHED
        if exc is None:
            f._result = value
            for waiter in f._waiters:
                waiter.add_result(future)
        else:
            f._exception = exc
            for waiter in f._waiters:
                waiter.add_exception(future)
        if cond._waiters:
            cond.notify_all()
    for callback in callbacks:
        try:
            callback(future)
        except BaseException:
            _futures_log.exception("exception calling callback for %r", future)
    return True


def _set_running(future: Future[Any]) -> bool:
    """``future.set_running_or_notify_cancel()``, with the common case (pending) under one
    acquisition of its lock and no further calls: this runs once per task on the owner thread."""
    f: Any = future
    with f._condition._lock:  # the condition's own lock, without its Python-level __enter__
        if f._state == _PENDING:
            f._state = _RUNNING
            return True
    return future.set_running_or_notify_cancel()  # cancelled (or a misuse): the stdlib's own words


# Future states, as concurrent.futures._base names them (the strings are its values).
_PENDING: Final = _futures_base.PENDING
_RUNNING: Final = _futures_base.RUNNING
_FINISHED: Final = _futures_base.FINISHED
_RESOLVED_STATES: Final = frozenset({_futures_base.CANCELLED, _futures_base.CANCELLED_AND_NOTIFIED, _FINISHED})


def outcome(kind: str) -> dict[str, str]:
    """``extra=`` for an ERROR record that reports a designed outcome of a fault (a
    quarantine, a tripped breaker, a protocol error, a rebuild), not a bug: the test
    guard of ``resilpool.testing`` lets chaos tests that inject faults have these."""
    return {"resilpool_outcome": kind}


def rebuilt_error(task: Task) -> errors.WorkerCrashedError:
    """The error of a task that was running when its core broke (a new core adopts it)."""
    where = task.last_worker[0] if task.last_worker else None
    on = f" on worker {where}" if where is not None else ""
    return errors.WorkerCrashedError(
        f"task {task.id} (fn={task.fn_name}) was running{on} when the pool's core broke and was rebuilt",
        pid=where,
        task_id=task.id,
        fn_name=task.fn_name,
    )


def copy_error(err: BaseException) -> BaseException:
    """A fresh instance per future, so notes added to one do not show on another."""
    try:
        new: BaseException = pickle.loads(pickle.dumps(err))
    except Exception:
        return err
    new.__cause__ = err.__cause__
    return new


def error_type_name(cls: type) -> str:
    """The qualified name of an exception type, as metrics label failures:
    ``"ValueError"`` for a builtin, ``"resilpool.errors.WorkerCrashedError"`` otherwise."""
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", None) or cls.__name__
    return name if module in (None, "builtins") else f"{module}.{name}"


def _bump(counts: dict[type, int], cls: type) -> dict[type, int]:
    """``counts`` with one more for ``cls``: incremented in place, or for a type not in it
    a new dict, so that a reader on another thread never sees one grow (TaskBook.snapshot)."""
    n = counts.get(cls)
    if n is None:
        return {**counts, cls: 1}
    counts[cls] = n + 1
    return counts


def _named(by_type: dict[type, int]) -> tuple[tuple[str, int], ...]:
    """Counts by exception type as sorted ``(error_type_name, count)`` pairs; two types of
    one name (a class defined again) add up."""
    out: dict[str, int] = {}
    for cls, n in by_type.items():
        name = error_type_name(cls)
        out[name] = out.get(name, 0) + n
    return tuple(sorted(out.items()))


def _add_named(a: tuple[tuple[str, int], ...], b: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    out = dict(a)
    for k, v in b:
        out[k] = out.get(k, 0) + v
    return tuple(sorted(out.items()))


def _histogram(counts: list[int], sum_s: float) -> DurationHistogram:
    """A book's per-bucket counts as a (cumulative) :class:`DurationHistogram`."""
    return DurationHistogram(cumulative=tuple(itertools.accumulate(counts)), sum_s=sum_s)


def summary(err: BaseException) -> str:
    """One line for a failed attempt: notes, logs and TaskRetried events."""
    if isinstance(err, errors.ResilpoolError):
        return f"{type(err).__name__}: {err}"
    return f"raised {type(err).__name__}: {err}"


def add_notes(err: BaseException, task: Task, last: str | None) -> None:
    """PEP 678 notes on ``err``: one per earlier attempt of ``task`` (and ``last``)."""
    for n in (*(task.notes or ()), *((last,) if last is not None else ())):
        err.add_note(n)


class DurationEstimate:
    """EWMA of task durations and the pipelining depth it allows (shared by both transports)."""

    __slots__ = ("ewma_s",)

    def __init__(self) -> None:
        self.ewma_s: float | None = None

    def observe(self, elapsed_s: float) -> None:
        ewma = self.ewma_s
        self.ewma_s = elapsed_s if ewma is None else ewma + 0.1 * (elapsed_s - ewma)

    def depth(self) -> int:
        """Tasks worth queueing to one worker: 1, or enough tiny ones to cover PIPELINE_S."""
        ewma = self.ewma_s
        if ewma is None or ewma >= DEEP_BELOW_S:
            return 1
        return min(MAX_DEPTH, 1 + int(PIPELINE_S / max(ewma, 1e-6)))


@dataclass(frozen=True, slots=True, kw_only=True)
class BookCounts:
    """A frozen snapshot of a TaskBook's counters (any thread may take one)."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    retried: int = 0
    quarantined: int = 0
    unresolved: int = 0
    queued: int = 0  # queued + fresh + timers
    held: int = 0  # held by a holder (sent to a worker / in flight on Dask)
    errors: tuple[tuple[str, int], ...] = ()  # failed tasks by error_type_name, sorted, nonzero only
    retried_errors: tuple[tuple[str, int], ...] = ()  # retried attempts by the error_type_name of their failure
    succeeded_s: DurationHistogram = DurationHistogram()  # completed tasks: submission to resolution
    failed_s: DurationHistogram = DurationHistogram()  # failed tasks: submission to resolution

    def __add__(self, other: BookCounts) -> BookCounts:
        return BookCounts(
            submitted=self.submitted + other.submitted,
            completed=self.completed + other.completed,
            failed=self.failed + other.failed,
            cancelled=self.cancelled + other.cancelled,
            retried=self.retried + other.retried,
            quarantined=self.quarantined + other.quarantined,
            unresolved=self.unresolved + other.unresolved,
            queued=self.queued + other.queued,
            held=self.held + other.held,
            errors=_add_named(self.errors, other.errors),
            retried_errors=_add_named(self.retried_errors, other.retried_errors),
            succeeded_s=self.succeeded_s + other.succeeded_s,
            failed_s=self.failed_s + other.failed_s,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreCounts:
    """A core's counters, frozen: its book's task counts and its workers' (``stats()`` adds them up)."""

    tasks: BookCounts = BookCounts()
    workers_started: int = 0
    worker_crashes: int = 0
    recycled: tuple[tuple[str, int], ...] = ()  #: (ExitReason value, workers), nonzero only

    def __add__(self, other: CoreCounts) -> CoreCounts:
        recycled = dict(self.recycled)
        for k, v in other.recycled:
            recycled[k] = recycled.get(k, 0) + v
        return CoreCounts(
            tasks=self.tasks + other.tasks,
            workers_started=self.workers_started + other.workers_started,
            worker_crashes=self.worker_crashes + other.worker_crashes,
            recycled=tuple(sorted(recycled.items())),
        )


class WorkerCounters:
    """Worker counters of one transport: ints and a dict whose keys never change after
    ``__init__`` (every ExitReason), so a reader on another thread never sees it resize."""

    __slots__ = ("crashes", "recycled", "started")

    def __init__(self) -> None:
        from ..events import ExitReason

        self.started = 0
        self.crashes = 0
        self.recycled: dict[str, int] = dict.fromkeys((r.value for r in ExitReason), 0)

    def snapshot(self, book: TaskBook[Any]) -> CoreCounts:
        return CoreCounts(
            tasks=book.snapshot(),
            workers_started=self.started,
            worker_crashes=self.crashes,
            recycled=tuple((k, v) for k, v in self.recycled.items() if v),
        )


# --- the book ---------------------------------------------------------------------


class TaskBook(Generic[H]):
    """Every task table of one core and every transition; see the module docstring.

    Args:
        quarantine_after: deaths blamed on a task before it fails with PoisonTaskError.
        max_startup_failures, startup_window_s: the crash-loop breaker.
        emit: where events go (the pool's event thread).
        clock: ``time.monotonic`` or a test's fake clock.
        route_fresh: keep a retry after an unblamed death for a worker that ran nothing
            yet (:meth:`take` with ``fresh_holder``); False where the transport cannot
            choose the worker (Dask), so it just goes to the front of the queue.
    """

    def __init__(
        self,
        *,
        quarantine_after: int,
        max_startup_failures: int,
        startup_window_s: float,
        emit: Callable[[Event], None],
        clock: Callable[[], float] = time.monotonic,
        route_fresh: bool = True,
    ) -> None:
        self._quarantine_after = quarantine_after
        self._emit = emit
        self._clock = clock
        self._route_fresh = route_fresh
        self._breaker = CrashLoopBreaker(max_startup_failures, startup_window_s)
        # Owner thread only.
        self.tasks: dict[int, Task] = {}  # every unresolved task
        self._queued: deque[Task] = deque()
        self._fresh: deque[Task] = deque()
        self._timers: list[tuple[float, int, Task]] = []
        self._timer_seq = itertools.count()
        self._held: dict[H, deque[Task]] = {}
        self._in_hand: dict[int, Task] = {}
        self._decoding: dict[int, Task] = {}  # answered; result being unpickled off the owner thread
        self._n_held = 0
        self.paused: str | None = None
        self.draining = False
        self._cancel_on_drain = False  # shutdown(cancel_futures=True): no retry runs any more
        self.broken: BaseException | None = None  # CrashLoopError once the breaker trips
        self.last_startup_error: BaseException | None = None
        self.durations = DurationEstimate()
        self.max_task_id = 0  # the highest task id this book has seen (frames naming a higher one are junk)
        # Counters: ints written by the owner thread, read by any (never a dict that grows).
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._retried = 0
        self._quarantined = 0
        self._resolved_twice: list[int] = []
        # Per resolved task, for metrics: one increment in a list of fixed length (the bucket
        # of its duration, bisect_left over DURATION_BOUNDS_S: ``le`` semantics) and a float
        # sum; one increment in ``_errors`` per failure (in ``_retry_errors`` per retry).
        # Both are keyed by type (``snapshot`` makes the names) and copied, never grown in
        # place, when a new type comes (``_bump``): another thread's ``snapshot`` copies a
        # dict whose keys never change.
        self._ok_counts = [0] * (len(DURATION_BOUNDS_S) + 1)
        self._ok_sum_s = 0.0
        self._failed_counts = [0] * (len(DURATION_BOUNDS_S) + 1)
        self._failed_sum_s = 0.0
        self._errors: dict[type, int] = {}
        self._retry_errors: dict[type, int] = {}  # retried attempts by error type; the same discipline

    # --- queries ------------------------------------------------------------------

    def __len__(self) -> int:
        """Unresolved tasks."""
        return len(self.tasks)

    def has_queued(self) -> bool:
        """Is a task waiting for a holder (queued or fresh)?"""
        return bool(self._queued or self._fresh)

    def has_fresh(self) -> bool:
        return bool(self._fresh)

    def queued_count(self) -> int:
        """Tasks waiting for a holder (queued or fresh)."""
        return len(self._queued) + len(self._fresh)

    @property
    def held_count(self) -> int:
        """Tasks held by some holder, or answered with their result still being unpickled:
        the running ones."""
        return self._n_held + len(self._decoding)

    def held(self, holder: H) -> deque[Task]:
        """The tasks ``holder`` holds, in the order taken (read only: do not mutate)."""
        return self._held.get(holder) or deque()

    def holders(self) -> list[H]:
        return list(self._held)

    def next_due(self) -> float | None:
        """When the earliest retry waiting for its backoff is due (clock time), if any."""
        return self._timers[0][0] if self._timers else None

    def snapshot(self) -> BookCounts:
        """The counters now. Safe from any thread: reads ints and lengths, and copies (in C,
        under the GIL) lists of fixed length and a dict whose keys never change."""
        n_tasks = len(self.tasks)
        held = self.held_count  # a result being unpickled: still running
        return BookCounts(
            submitted=self._submitted,
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
            retried=self._retried,
            quarantined=self._quarantined,
            unresolved=n_tasks,
            queued=max(0, n_tasks - held),
            held=held,
            errors=_named(dict(self._errors)),
            retried_errors=_named(dict(self._retry_errors)),
            succeeded_s=_histogram(list(self._ok_counts), self._ok_sum_s),
            failed_s=_histogram(list(self._failed_counts), self._failed_sum_s),
        )

    # --- transitions ----------------------------------------------------------------

    def submit(self, tasks: Iterable[Task]) -> None:
        """Take over newly submitted tasks: to the back of the queue; their durations count from now."""
        table = self.tasks
        queued = self._queued
        n = 0
        top = self.max_task_id
        now = self._clock()
        for t in tasks:
            t.submitted_at = now
            table[t.id] = t
            queued.append(t)
            n += 1
            if t.id > top:
                top = t.id
        self._submitted += n
        self.max_task_id = top

    def take(self, holder: H, *, fresh_holder: bool = False) -> Task | None:
        """The next task for ``holder`` (None: none to take), now held by it.

        A first attempt's future is set running here; one its owner cancelled is
        dropped (counted as cancelled) and the next is taken. With ``fresh_holder``
        (a worker that ran nothing yet) a task that asked for one comes first.
        """
        if self.paused is not None or self.broken is not None:
            return None
        while True:
            if fresh_holder and self._fresh:
                task = self._fresh.popleft()
            elif self._queued:
                task = self._queued.popleft()
            else:
                return None
            if task.attempt == 1 and task.first_start is None:
                if not _set_running(task.future):
                    del self.tasks[task.id]
                    self._cancelled += 1
                    continue
            if task.first_start is None:
                task.first_start = self._clock()
            q = self._held.get(holder)
            if q is None:
                q = self._held[holder] = deque()
            q.append(task)
            self._n_held += 1
            return task

    def release_fresh(self) -> None:
        """No worker that ran nothing is to be had: the fresh tasks go to the front of the queue."""
        fresh = self._fresh
        while fresh:
            t = fresh.pop()
            t.needs_fresh = False
            self._queued.appendleft(t)

    def answered(self, holder: H, task_id: int, *, in_order: bool = True) -> Task:
        """``holder`` answered ``task_id``: the task leaves it, in hand until settled.

        With ``in_order`` (a local worker runs its tasks in the order sent) the task must
        be the first one held.

        Raises:
            ProtocolViolation: ``holder`` does not hold that task (at that position).
        """
        q = self._held.get(holder)
        if not q:
            raise ProtocolViolation(f"an answer for task {task_id}, but the worker holds no task")
        if in_order or q[0].id == task_id:
            task = q[0]
            if task.id != task_id:
                raise ProtocolViolation(f"an answer for task {task_id}, but the worker runs task {task.id} first")
            q.popleft()
        else:
            task = next((t for t in q if t.id == task_id), None)  # type: ignore[assignment]
            if task is None:
                raise ProtocolViolation(f"an answer for task {task_id}, which the worker does not hold")
            q.remove(task)
        if not q:
            del self._held[holder]
        self._n_held -= 1
        self._in_hand[task.id] = task
        return task

    def decoding(self, task: Task) -> None:
        """A task in hand waits for its result to be unpickled elsewhere: it leaves the hand."""
        self._settle(task)
        self._decoding[task.id] = task

    def decoded(self, task: Task) -> bool:
        """Its result is unpickled: back in hand, for ``succeeded`` or ``attempt_failed``.

        False if the task is no longer decoding (:meth:`abandon_decoding` failed it).
        """
        if self._decoding.pop(task.id, None) is None:
            return False
        self._in_hand[task.id] = task
        return True

    def abandon_decoding(self, err: Callable[[Task], BaseException]) -> int:
        """Fail every task whose result is still being unpickled with ``err(task)``, never
        retried (a shutdown that gives up waiting); returns how many."""
        tasks = list(self._decoding.values())
        self._decoding.clear()
        for t in tasks:
            e = err(t)
            add_notes(e, t, None)
            self._fail(t, e)
        return len(tasks)

    def answered_ok(self, holder: H, task_id: int, elapsed_s: float, value: Any) -> None:
        """``answered`` (in order), ``durations.observe`` and ``succeeded`` in one step: a
        local worker's result decoded at once, the hot path (one call per task, not three).

        Raises:
            ProtocolViolation: as :meth:`answered`.
        """
        q = self._held.get(holder)
        if not q or q[0].id != task_id:
            self.answered(holder, task_id)  # raises, with the words for the case
        task = q.popleft()  # type: ignore[union-attr]
        if not q:
            del self._held[holder]
        self._n_held -= 1
        d = self.durations
        ewma = d.ewma_s
        d.ewma_s = elapsed_s if ewma is None else ewma + 0.1 * (elapsed_s - ewma)
        self._complete(task, value)

    def succeeded(self, task: Task, value: Any) -> None:
        """Resolve a task in hand with its result."""
        if self._in_hand.pop(task.id, None) is None:
            raise InvariantViolation(f"task {task.id} settled, but it was not in hand")
        self._complete(task, value)

    def _complete(self, task: Task, value: Any) -> None:
        # _settle and _resolve, inlined: this runs once per task on the owner thread.
        task_id = task.id
        self._completed += 1
        elapsed = self._clock() - task.submitted_at
        self._ok_counts[bisect_left(DURATION_BOUNDS_S, elapsed)] += 1
        self._ok_sum_s += elapsed
        self.tasks.pop(task_id, None)
        future = task.future
        if not resolve(future, value, None) and not future.cancelled():
            self._resolved_twice.append(task_id)

    def attempt_failed(self, task: Task, err: BaseException, *, pid: int | None, elapsed: float, died: bool, blamed: bool) -> None:
        """A task in hand failed an attempt: retry it (after its backoff), quarantine it, or fail it.

        Args:
            died: the worker died running it (crash, kill); with ``blamed`` the death
                counts toward quarantine.
        """
        self._settle(task)
        if blamed:
            task.crashes += 1
        what = summary(err)
        note = f"attempt {task.attempt} pid {pid}: {what} after {elapsed:.2f}s"
        if died and task.crashes >= self._quarantine_after and task.aborted is None:
            poison = errors.PoisonTaskError(crashes=task.crashes, fn_name=task.fn_name, args_repr=task.args_repr(), task_id=task.id)
            poison.__cause__ = err
            add_notes(poison, task, note)
            self._quarantined += 1
            log.error("%s", poison, extra=outcome("quarantine"))
            self._emit(TaskQuarantined(task_id=task.id, crashes=task.crashes, fn_name=task.fn_name))
            self._fail(task, poison)
            return
        if task.retry is not None and self.broken is None and task.aborted is None and not self._cancel_on_drain:
            if task.retry_state is None:
                task.retry_state = task.retry.new_state(task.first_start)
            delay = task.retry.next_delay(task.retry_state, err, now=self._clock())
            if delay is not None:
                self._schedule_retry(task, err, note, delay, needs_fresh=died and not blamed)
                return
        add_notes(err, task, None)
        self._fail(task, err)

    def _schedule_retry(self, task: Task, err: BaseException, note: str, delay: float, *, needs_fresh: bool) -> None:
        if task.notes is None:
            task.notes = []
        task.notes.append(note)
        task.attempt += 1
        if needs_fresh:
            task.needs_fresh = True  # maybe the old worker's fault: try a fresh one
        self._retried += 1
        self._retry_errors = _bump(self._retry_errors, type(err))
        what = summary(err)
        log.info("task %d (fn=%s) attempt %d failed (%s); retrying in %.2fs", task.id, task.fn_name, task.attempt - 1, what, delay)
        self._emit(TaskRetried(task_id=task.id, attempt=task.attempt - 1, delay_s=delay, error=what))
        task.last_error = err
        if delay > 0:
            task.due = self._clock() + delay
            heapq.heappush(self._timers, (task.due, next(self._timer_seq), task))
        else:
            task.due = None
            self._requeue_front(task)

    def _requeue_front(self, task: Task) -> None:
        (self._fresh if task.needs_fresh and self._route_fresh else self._queued).appendleft(task)

    def lost(self, holder: H, *, started: bool) -> Task | None:
        """``holder`` is gone (its worker died or left).

        With ``started``, its first task had started: it is returned in hand, for the
        caller's :meth:`attempt_failed`. The tasks behind it never started: they go back
        to the front of the queue, in order (never failed by the death).
        """
        got = self.lost_started(holder, 1 if started else 0)
        return got[0] if got else None

    def lost_started(self, holder: H, started: int) -> list[Task]:
        """``holder`` is gone, and its first ``started`` tasks had started.

        Normally ``started`` is 0 or 1 (a worker answers each task before the next), but
        when a worker's answers were lost (a corrupt result channel) several may have run:
        each is returned in hand, for :meth:`attempt_failed`, and none is queued again, so
        a task without ``retry`` still runs at most once. The rest go back to the queue.
        """
        q = self._held.pop(holder, None)
        if not q:
            return []
        self._n_held -= len(q)
        out: list[Task] = []
        for _ in range(min(started, len(q))):
            t = q.popleft()
            self._in_hand[t.id] = t
            out.append(t)
        for t in reversed(q):
            self._return_unstarted(t)
        return out

    def take_back(self, holder: H, task_ids: Iterable[int]) -> list[Task]:
        """Unstarted tasks leave a live ``holder``, back to the front of the queue, in order.

        The caller guarantees the holder will never start them (local: the worker's slot
        says so, settled with the worker stopped). Returns the tasks taken back.
        """
        q = self._held.get(holder)
        if not q:
            return []
        ids = set(task_ids)
        back = [t for t in q if t.id in ids]
        if not back:
            return []
        keep = deque(t for t in q if t.id not in ids)
        if keep:
            self._held[holder] = keep
        else:
            del self._held[holder]
        self._n_held -= len(back)
        for t in reversed(back):
            self._return_unstarted(t)
        return back

    def _return_unstarted(self, t: Task) -> None:
        """A task that did not start on its holder: to the front of the queue, unless it
        must not run any more (aborted, or shutdown(cancel_futures=True))."""
        if t.aborted is not None:
            self._in_hand[t.id] = t
            self._drop_unstarted(t, f"not run: aborted ({t.aborted})")
        elif self._cancel_on_drain:
            self._in_hand[t.id] = t
            self._drop_unstarted(t, "not run: shutdown(cancel_futures=True)")
        else:
            self._requeue_front(t)

    def fire_timers(self) -> int:
        """Retries whose backoff is over go to the front of the queue; returns how many."""
        timers = self._timers
        if not timers:
            return 0
        now = self._clock()
        due: list[Task] = []
        while timers and timers[0][0] <= now:
            due.append(heapq.heappop(timers)[2])
        for t in reversed(due):
            t.due = None
            self._requeue_front(t)
        return len(due)

    def set_paused(self, reason: str | None) -> None:
        """Start no new task (``take`` returns None) until called with None."""
        if reason is not None and self.paused is None:
            self.paused = reason
            log.warning("resilpool starts no new task: %s", reason)
            self._emit(DispatchPaused(reason=reason))
        elif reason is None and self.paused is not None:
            was, self.paused = self.paused, None
            log.warning("resilpool starts tasks again (was: %s)", was)
            self._emit(DispatchResumed(reason=was))

    def drain(self, *, cancel_futures: bool, keep_queued: int = 0) -> None:
        """Shut down: finish what is submitted; with ``cancel_futures`` run nothing new.

        With ``cancel_futures``, queued first attempts are cancelled, and retries that have
        not started (waiting for their backoff, or queued) fail with the error of their
        last attempt plus a note; a task that fails later is not retried. The first
        ``keep_queued`` queued first attempts stay queued and run: the transport's share for
        workers still starting, as the stdlib's call queue keeps the calls already in it.
        """
        self.draining = True
        if not cancel_futures:
            return
        self._cancel_on_drain = True
        kept = {t.id for t in itertools.islice((t for t in self._queued if t.attempt == 1 and t.first_start is None), keep_queued)}
        note = "retry not run: shutdown(cancel_futures=True)"
        for t in self._unplaced_all(keep=lambda t: t.id in kept):
            self._drop_unstarted(t, note)

    def abort(self, task_ids: Iterable[int], reason: str) -> dict[H, list[Task]]:
        """Abort tasks: the queued ones are cancelled now; the held ones are marked.

        A queued first attempt is cancelled (its future says so); a queued retry, which
        had started before, fails with the error of its last attempt and a note. A task
        held by a holder is marked ``aborted`` and returned under its holder: the
        transport takes back the unstarted ones (:meth:`take_back` and :meth:`lost`
        then cancel them instead of queueing them) and kills the worker of a started
        one (its failure is never retried).
        """
        ids = set(task_ids)
        note = f"not run: aborted ({reason})"
        for t in self._unplaced_all(keep=lambda t: t.id not in ids):
            t.aborted = reason
            self._drop_unstarted(t, note)
        out: dict[H, list[Task]] = {}
        for holder, q in self._held.items():
            for t in q:
                if t.id in ids:
                    t.aborted = reason
                    out.setdefault(holder, []).append(t)
        return out

    def _unplaced_all(self, keep: Callable[[Task], bool] = lambda t: False) -> list[Task]:
        """Remove from queued, fresh and timers every task ``keep`` refuses; return them."""
        out: list[Task] = []
        for name in ("_queued", "_fresh"):
            q: deque[Task] = getattr(self, name)
            if not q:
                continue
            kept: deque[Task] = deque()
            for t in q:
                (kept if keep(t) else out).append(t)
            setattr(self, name, kept)
        if self._timers:
            timers = [e for e in self._timers if keep(e[2])]
            out.extend(e[2] for e in sorted(self._timers) if not keep(e[2]))
            heapq.heapify(timers)
            self._timers = timers
        for t in out:
            t.due = None
        return out

    def _drop_unstarted(self, t: Task, note: str) -> None:
        """A task out of every place that never started this attempt: cancel it or fail it."""
        self._in_hand[t.id] = t
        self._settle(t)
        if t.future.cancel():
            del self.tasks[t.id]
            self._cancelled += 1
            return
        e = copy_error(t.last_error) if t.last_error is not None else CancelledError(f"task {t.id}: {note}")
        e.add_note(note)
        add_notes(e, t, None)
        self._fail(t, e)

    def startup_failed(self, cause: BaseException) -> bool:
        """A worker failed before it was ready; True if this trips the crash-loop breaker.

        Tripping breaks the book for good: ``broken`` is the CrashLoopError, every task no
        holder has fails with a copy of it, and ``take`` returns None from then on.
        """
        self.last_startup_error = cause
        if self.broken is None and self._breaker.record_failure(self._clock()):
            err = errors.CrashLoopError(deaths=self._breaker.recent_failures, window=self._breaker.window_s)
            err.__cause__ = cause
            self.broken = err
            log.error("%s; last failure: %s", err, cause, extra=outcome("crash_loop"))
            self._emit(CrashLoopTripped(deaths=self._breaker.recent_failures, window_s=self._breaker.window_s, cause=f"{type(cause).__name__}: {cause}"))
            self.fail_unassigned(err)
            return True
        return False

    def fail_unassigned(self, err: BaseException) -> None:
        """Fail every task no holder has (queued, fresh, timers) with a copy of ``err``,
        with notes about earlier attempts."""
        for t in self._unplaced_all():
            e = copy_error(err)
            add_notes(e, t, None)
            self._in_hand[t.id] = t
            self._settle(t)
            self._fail(t, e)

    def salvage(self, interrupted: Iterable[Task]) -> tuple[list[Task], list[Task]]:
        """Empty the book for a rebuild: ``(unstarted, interrupted)`` unresolved tasks.

        ``interrupted``: the tasks in hand the transport found started (from
        :meth:`lost`); every other held or placed task never started. A task in the table
        and nowhere else was mid-step when the core broke: it counts as interrupted.
        """
        interrupted = [t for t in interrupted]
        unstarted: list[Task] = []
        for q in self._held.values():
            unstarted.extend(q)
        unstarted.extend(self._fresh)
        unstarted.extend(self._queued)
        unstarted.extend(t for _, _, t in sorted(self._timers))
        done = {t.id for t in (*unstarted, *interrupted)}
        interrupted.extend(t for t in self.tasks.values() if t.id not in done)
        self.tasks.clear()
        self._held.clear()
        self._n_held = 0
        self._fresh.clear()
        self._queued.clear()
        self._timers.clear()
        self._in_hand.clear()
        self._decoding.clear()  # answered, but never settled here: interrupted (above)
        return [t for t in unstarted if not t.future.done()], [t for t in interrupted if not t.future.done()]

    def adopt(self, unstarted: Iterable[Task], interrupted: Iterable[tuple[Task, BaseException]]) -> None:
        """Take over a broken core's tasks (see :meth:`salvage`).

        An unstarted task keeps what is left of its backoff; an interrupted one failed an
        attempt with the paired error (a death not blamed on it): retried or failed.
        """
        now = self._clock()
        unstarted, interrupted = list(unstarted), list(interrupted)
        self.max_task_id = max([self.max_task_id, *(t.id for t in unstarted), *(t.id for t, _ in interrupted)])
        for t in unstarted:
            self.tasks[t.id] = t
            self._submitted += 1
            if t.due is not None and t.due > now:
                heapq.heappush(self._timers, (t.due, next(self._timer_seq), t))
            else:
                t.due = None
                (self._fresh if t.needs_fresh and self._route_fresh else self._queued).append(t)
        for t, err in interrupted:
            self.tasks[t.id] = t
            self._submitted += 1
            self._in_hand[t.id] = t
            pid, elapsed = t.last_worker or (None, 0.0)
            self.attempt_failed(t, err, pid=pid, elapsed=elapsed, died=True, blamed=False)

    # --- resolution -------------------------------------------------------------------

    def _settle(self, task: Task) -> None:
        if self._in_hand.pop(task.id, None) is None:
            raise InvariantViolation(f"task {task.id} settled, but it was not in hand")

    def _fail(self, task: Task, err: BaseException) -> None:
        self._failed += 1
        self._errors = _bump(self._errors, type(err))
        elapsed = self._clock() - task.submitted_at
        self._failed_counts[bisect_left(DURATION_BOUNDS_S, elapsed)] += 1
        self._failed_sum_s += elapsed
        self._resolve(task, None, err)

    def _resolve(self, task: Task, value: Any, exc: BaseException | None) -> None:
        self.tasks.pop(task.id, None)
        if not resolve(task.future, value, exc) and not task.future.cancelled():
            self._resolved_twice.append(task.id)

    # --- invariants ---------------------------------------------------------------------

    def places(self) -> Iterator[tuple[str, Task]]:
        """Every placed task with the name of its place (for checks and debugging)."""
        for t in self._queued:
            yield "queued", t
        for t in self._fresh:
            yield "fresh", t
        for _, _, t in self._timers:
            yield "timers", t
        for holder, q in self._held.items():
            for t in q:
                yield f"holder {holder!r}", t
        for t in self._decoding.values():
            yield "decoding", t

    def check_invariants(self, *, idle: bool = False) -> None:
        """Verify the tables in O(tasks); raise :class:`InvariantViolation` listing every problem.

        Call between two steps of the owner thread (or with it gone), never from inside
        one. With ``idle`` (the caller knows nothing submitted is unresolved), also
        require that no task is left anywhere.
        """
        problems: list[str] = []
        if idle and self.tasks:
            problems.append(f"{len(self.tasks)} tasks unresolved in an idle pool: {sorted(self.tasks)[:10]}")
        if self._in_hand:
            problems.append(f"tasks still in hand between steps: {sorted(self._in_hand)}")
        seen: dict[int, str] = {}
        for place, t in self.places():
            if t.id in seen:
                problems.append(f"task {t.id} is in two places: {seen[t.id]} and {place}")
                continue
            seen[t.id] = place
            if self.tasks.get(t.id) is not t:
                problems.append(f"task {t.id} is in {place} but not in the task table")
            if t.future.done() and not (place in ("queued", "fresh") and t.attempt == 1 and t.future.cancelled()):
                problems.append(f"task {t.id} is in {place} but its future is resolved")
        for tid in self.tasks:
            if tid not in seen:
                problems.append(f"task {tid} is unresolved but in no place")
        if sum(len(q) for q in self._held.values()) != self._n_held:
            problems.append(f"held count {self._n_held} != tasks held {sum(len(q) for q in self._held.values())}")
        if any(not q for q in self._held.values()):
            problems.append("an empty holder entry is kept")
        resolved = self._completed + self._failed + self._cancelled
        if self._submitted != resolved + len(self.tasks):
            problems.append(
                f"counts do not add up: submitted {self._submitted} != completed {self._completed}"
                f" + failed {self._failed} + cancelled {self._cancelled} + unresolved {len(self.tasks)}"
            )
        if sum(self._retry_errors.values()) != self._retried:
            problems.append(f"retried {self._retried}, but the error types of retried attempts count {sum(self._retry_errors.values())}")
        if sum(self._ok_counts) != self._completed:
            problems.append(f"succeeded-duration histogram counts {sum(self._ok_counts)} tasks, completed {self._completed}")
        if not sum(self._failed_counts) == sum(self._errors.values()) == self._failed:
            problems.append(
                f"failed {self._failed}, but the failed-duration histogram counts {sum(self._failed_counts)}"
                f" and the error types {sum(self._errors.values())}"
            )
        if self._resolved_twice:
            problems.append(f"futures resolved twice: tasks {self._resolved_twice[:10]}")
        if problems:
            raise InvariantViolation("; ".join(problems))
