"""The executor core: one manager thread, a task table, and the worker processes it feeds.

Data flow::

    caller threads           manager thread (owns every table below)           worker processes
    --------------           ----------------------------------------           ----------------
    submit() ----pickle----> submit queue ─┐
    shutdown(), supervisor   commands ─────┤ wakeup pipe
    (retire/kill/pause) ─────────────────-─┘
                                           v
                             select() on: wakeup, result pipes, sentinels, writable task pipes,
                                          timer heap (retry backoff, shutdown deadline)
                                           │
                             pending deque ──dispatch──> per-worker outbox ──task pipe──> run in order
                             (FIFO; retries at front)     outstanding FIFO  <─result pipe── one frame each
                                           │                                  slot (shared memory):
                             futures resolved here <──────────────────────── [task, start, started]
                             events ──> event bus thread ──> log + listeners

Ownership (who may touch what):

- The manager thread alone reads and writes ``_tasks``, ``_pending``, ``_fresh``,
  ``_timers``, ``_workers`` and every ``_Worker``, resolves futures (so done
  callbacks run on it) and starts, kills and reaps processes.
- Other threads only append to ``_submitted``/``_commands`` and wake the manager;
  they read the immutable ``_views`` tuple the manager republishes when workers
  change, and the slots (shared memory, written by workers).
- ``_lock`` guards the ``_accepting`` flag and the submit queue hand-over, so no
  task can be queued to a core after it stopped accepting or broke.

Invariants (asserted in tests):

- Each unresolved task is in exactly one place: ``_pending``/``_fresh``, the
  timer heap, or one worker's ``outstanding`` FIFO.
- A worker's results arrive in the order its tasks were sent; at most one of its
  outstanding tasks is started and unanswered (slot ``started - answered`` is 0 or 1).
- A task that never started is never failed by a worker's death: it is requeued.
- Each future is resolved exactly once, by the manager thread.

Seams for the supervisor (any thread): :meth:`Core.worker_views`,
:meth:`Core.read_slot`, :meth:`Core.retire_worker`, :meth:`Core.kill_worker`,
:meth:`Core.pause_dispatch`/:meth:`Core.resume_dispatch`; for a rebuild,
:meth:`Core.salvage` hands the unresolved tasks to a new core's :meth:`Core.adopt`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import multiprocessing
import multiprocessing.context
import os
import pickle
import selectors
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Final

from .. import errors
from ..events import (
    CrashLoopTripped,
    Event,
    ExitReason,
    TaskQuarantined,
    TaskRetried,
    WorkerExited,
    WorkerStarted,
)
from ..retry import RetryPolicy
from ..supervisor.breaker import CrashLoopBreaker, blame
from . import protocol as P
from . import worker as worker_module

__all__ = ["Core", "CoreGone", "Task", "WorkerView"]

log = logging.getLogger("resilpool")

_READ_SIZE: Final = 1 << 18
_MAX_DEPTH: Final = 256  # tasks queued to one worker at most (tiny tasks)
_DEEP_BELOW_S: Final = 0.005  # queue more than one task per worker only when tasks are this short
# ... and enough of them to cover this much work: one GIL switch interval, so a worker
# does not run dry while a busy submitting thread keeps the manager from running.
_PIPELINE_S: Final = 0.005
_STOP_GRACE_S: Final = 5.0  # after the last task, how long retiring workers get before SIGKILL
_JOIN_S: Final = 2.0


class CoreGone(Exception):
    """Internal: this core stopped accepting work (broken, being replaced)."""


# --- the task record ------------------------------------------------------------


class Task:
    """One submitted call and everything known about its attempts. Owned by the manager thread."""

    __slots__ = (
        "args",
        "attempt",
        "body",
        "crashes",
        "fn",
        "future",
        "id",
        "kwargs",
        "needs_fresh",
        "notes",
        "retry",
        "retry_state",
        "first_start",
        "timeout",
        "due",
        "last_error",
        "last_worker",
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
        self.last_worker: tuple[int, float] | None = None  # (pid, elapsed) if a rebuild interrupted it

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


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


# --- workers -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerView:
    """What other threads may know of a worker: published by the manager on every change."""

    pid: int
    slot: int
    spawned_at: float  # time.monotonic()
    ready: bool
    retiring: bool


class _Worker:
    """Parent-side state of one worker process. Owned by the manager thread."""

    __slots__ = (
        "answered",
        "init_error",
        "kill",
        "outbox",
        "outstanding",
        "pid",
        "process",
        "reader",
        "ready",
        "replaces",
        "result_conn",
        "result_fd",
        "reading",
        "retiring",
        "sent",
        "sentinel",
        "slot",
        "spawned_at",
        "task_conn",
        "task_fd",
        "writing",
    )

    def __init__(self, process: Any, slot: int, task_conn: Any, result_conn: Any, replaces: int | None) -> None:
        self.process = process
        self.pid: int = process.pid
        self.slot = slot
        self.task_conn = task_conn
        self.result_conn = result_conn
        self.task_fd: int = task_conn.fileno()
        self.result_fd: int = result_conn.fileno()
        self.sentinel: int = process.sentinel
        self.replaces = replaces
        self.spawned_at = time.monotonic()
        self.reader = P.FrameReader()
        self.outbox = bytearray()
        self.outstanding: deque[Task] = deque()
        self.sent = 0  # tasks sent, ever
        self.answered = 0  # results received, ever
        self.ready = False
        self.retiring: ExitReason | None = None
        self.kill: tuple[ExitReason, Callable[[Task, float], BaseException]] | None = None
        self.init_error: BaseException | None = None
        self.reading = True
        self.writing = False


# --- commands from other threads ------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _RetireWorker:
    pid: int
    reason: ExitReason


@dataclass(frozen=True, slots=True, kw_only=True)
class _KillWorker:
    pid: int
    task_id: int | None  # kill only if it still runs this task
    reason: ExitReason
    make_error: Callable[[Task, float], BaseException]


@dataclass(frozen=True, slots=True, kw_only=True)
class _SetPaused:
    reason: str | None  # None: resume


@dataclass(frozen=True, slots=True, kw_only=True)
class _Shutdown:
    cancel_futures: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class _Adopt:
    unstarted: list[Task]
    interrupted: list[Task]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Break:
    """Test hook: make the manager thread fail as if from an internal bug."""


class CoreBrokenForTest(RuntimeError):
    """Raised inside the manager thread by :meth:`Core.inject_break`."""


# --- the core ---------------------------------------------------------------------


class Core:
    """Worker processes fed by one manager thread. See the module docstring."""

    def __init__(
        self,
        *,
        max_workers: int,
        mp_context: multiprocessing.context.BaseContext,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        max_tasks_per_worker: int | None,
        soft_max_rss: int | None = None,
        max_startup_failures: int,
        startup_window_s: float,
        quarantine_after: int,
        emit: Callable[[Event], None],
        on_broken: Callable[[Core, BaseException], None] | None = None,
        name: str = "resilpool",
    ) -> None:
        self.max_workers = max_workers
        self._ctx = mp_context
        self._start_method = mp_context.get_start_method()
        self._initializer = initializer
        self._initargs = initargs
        self._max_tasks = max_tasks_per_worker
        self._soft_rss = soft_max_rss
        self._quarantine_after = quarantine_after
        self._emit = emit
        self._on_broken = on_broken

        # Shared with callers (see module docstring).
        self._lock = threading.Lock()
        self._accepting = True
        self._submitted: deque[Task] = deque()
        self._commands: deque[Any] = deque()
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._views: tuple[WorkerView, ...] = ()
        self._views_dirty = True
        self.task_timeouts: dict[int, float] = {}  # per-task overrides, read by the monitor
        n_slots = 2 * max_workers + 2
        self._slots: Any = mp_context.RawArray("q", n_slots * P.SLOT_FIELDS)
        self._free_slots = list(range(n_slots - 1, -1, -1))
        # The parent never writes to the lifeline; workers see EOF when it dies.
        self._lifeline_r, self._lifeline_w = mp_context.Pipe(duplex=False)

        # Manager-thread state.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._tasks: dict[int, Task] = {}
        self._pending: deque[Task] = deque()
        self._fresh: deque[Task] = deque()  # retries that must go to a worker that ran nothing yet
        self._timers: list[tuple[float, int, Task]] = []
        self._timer_seq = itertools.count()
        self._workers: dict[int, _Worker] = {}
        self._vacated: deque[int] = deque()
        self._ewma_s: float | None = None
        self._paused: str | None = None
        self._draining = False
        self._stopping_since: float | None = None
        self._broken: BaseException | None = None  # CrashLoopError once the breaker trips
        self._breaker = CrashLoopBreaker(max_startup_failures, startup_window_s)
        self._last_startup_error: BaseException | None = None
        self._running_count = 0
        self._respawn_at: float | None = None

        # Counters: written by the manager thread only.
        self.stats = Counter[str]()
        self.recycled = Counter[str]()

        self._thread = threading.Thread(target=self._run, name=f"{name}-manager", daemon=True)
        self._thread.start()

    # --- called from any thread ----------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a task; raises CoreGone if this core no longer accepts work."""
        with self._lock:
            if not self._accepting:
                raise CoreGone
            self._submitted.append(task)
        if not self._wake_pending:
            self._wake()

    def submit_many(self, tasks: Iterable[Task]) -> None:
        """Queue several tasks with one wake-up."""
        with self._lock:
            if not self._accepting:
                raise CoreGone
            self._submitted.extend(tasks)
        self._wake()

    @property
    def broken(self) -> BaseException | None:
        """The CrashLoopError that broke this core, if its breaker tripped."""
        return self._broken

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def worker_views(self) -> tuple[WorkerView, ...]:
        """The live workers, as last published by the manager thread."""
        return self._views

    def read_slot(self, slot: int) -> tuple[int, float | None, int]:
        """``(task id or 0, started at (monotonic) or None, tasks started)`` for a worker slot."""
        base = slot * P.SLOT_FIELDS
        s = self._slots
        for _ in range(8):
            task = s[base + P.SLOT_TASK]
            start_ns = s[base + P.SLOT_START_NS]
            started = s[base + P.SLOT_STARTED]
            if s[base + P.SLOT_TASK] == task:  # not torn by a task switch in between
                break
        return task, (start_ns / 1e9 if task else None), started

    def retire_worker(self, pid: int, reason: ExitReason) -> None:
        """Retire a worker after the tasks already sent to it; a replacement starts now."""
        self._command(_RetireWorker(pid=pid, reason=reason))

    def kill_worker(
        self,
        pid: int,
        reason: ExitReason,
        make_error: Callable[[Task, float], BaseException],
        task_id: int | None = None,
    ) -> None:
        """SIGKILL a worker's process group now; its running task fails with ``make_error(task, elapsed)``.

        With ``task_id``, the kill happens only if the worker is still running that task
        (checked with the group stopped, so the answer cannot change under us).
        """
        self._command(_KillWorker(pid=pid, task_id=task_id, reason=reason, make_error=make_error))

    def pause_dispatch(self, reason: str) -> None:
        """Start no new task until :meth:`resume_dispatch`."""
        self._command(_SetPaused(reason=reason))

    def resume_dispatch(self) -> None:
        self._command(_SetPaused(reason=None))

    def inject_break(self) -> None:
        """Test hook: break the core from inside, as an internal bug would."""
        self._command(_Break())

    def adopt(self, unstarted: list[Task], interrupted: list[Task]) -> None:
        """Take over tasks from a broken core: ``interrupted`` ones had started there."""
        for t in (*unstarted, *interrupted):
            if t.timeout is not None:
                self.task_timeouts[t.id] = t.timeout
        self._command(_Adopt(unstarted=unstarted, interrupted=interrupted))

    def shutdown(self, *, cancel_futures: bool) -> None:
        """Stop accepting work; finish what was submitted (or cancel what has not started)."""
        with self._lock:
            self._accepting = False
        self._command(_Shutdown(cancel_futures=cancel_futures))

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the manager thread to finish; True if it has."""
        if threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def unresolved(self) -> int:
        """Tasks submitted to this core and not yet resolved (approximate from other threads)."""
        return len(self._tasks) + len(self._submitted)

    def counts(self) -> tuple[int, int]:
        """``(pending, running)``, approximate when read from another thread."""
        running = self._running_count
        return max(0, self.unresolved() - running), running

    def _command(self, cmd: Any) -> None:
        self._commands.append(cmd)
        self._wake()

    def _wake(self) -> None:
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # full (a wake-up is pending anyway) or closed (the manager is gone)

    # --- manager thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # an internal bug: hand the work to a new core
            log.error("resilpool core failed; rebuilding", exc_info=True)
            self._fail_over(exc)
        finally:
            self._close()

    def _loop(self) -> None:
        select = self._selector.select
        while True:
            self._ensure_capacity()
            self._publish_views()
            timeout = self._next_timeout()
            dead: list[_Worker] = []
            for key, mask in select(timeout):
                kind, w = key.data
                if kind == "r":
                    self._on_readable(w)
                elif kind == "s":
                    dead.append(w)
                elif kind == "w":
                    self._flush(w)
                else:
                    self._drain_wakeups()
            self._wake_pending = False  # before draining: a later submit wakes us again
            self._take_submitted()
            while self._commands:
                self._execute(self._commands.popleft())
            for w in dead:
                self._on_worker_exit(w)
            self._fire_timers()
            self._dispatch()
            if self._draining and self._maybe_finish():
                return

    def _drain_wakeups(self) -> None:
        # One read: the pipe holds a byte per wake-up since the last drain; were there more
        # than 64 KiB of them, select() reports it readable again. (A second read that
        # only says EAGAIN costs a syscall per round trip.)
        try:
            os.read(self._wake_r, 65536)
        except BlockingIOError:
            pass

    def _take_submitted(self) -> None:
        submitted = self._submitted
        if not submitted:
            return
        tasks = self._tasks
        pending = self._pending
        while submitted:
            t = submitted.popleft()
            tasks[t.id] = t
            pending.append(t)

    def _next_timeout(self) -> float | None:
        deadlines = []
        if self._timers:
            deadlines.append(self._timers[0][0])
        if self._stopping_since is not None:
            deadlines.append(self._stopping_since + _STOP_GRACE_S)
        if self._respawn_at is not None:
            if self._respawn_at <= time.monotonic():
                self._views_dirty = True  # makes the next _ensure_capacity look again
            deadlines.append(self._respawn_at)
        if not deadlines:
            return None
        # Clamped: select() refuses timeouts of about 25 days and more.
        return min(86400.0, max(0.0, min(deadlines) - time.monotonic()))

    def _publish_views(self) -> None:
        if not self._views_dirty:
            return
        self._views_dirty = False
        views = tuple(
            WorkerView(pid=w.pid, slot=w.slot, spawned_at=w.spawned_at, ready=w.ready, retiring=w.retiring is not None)
            for w in self._workers.values()
        )
        if views != self._views:
            self._views = views

    # --- workers: start, feed, read, reap -------------------------------------------

    def _active_workers(self) -> int:
        return sum(1 for w in self._workers.values() if w.retiring is None and w.kill is None)

    def _ensure_capacity(self) -> None:
        if self._broken is not None or self._stopping_since is not None or not self._views_dirty:
            return  # worker changes always set _views_dirty: nothing changed, nothing to start
        while self._active_workers() < self.max_workers:
            if not self._free_slots or not self._spawn():
                # Try again shortly (a retiring worker frees its slot; a failed start is counted
                # by the breaker, which bounds how often this can happen).
                self._respawn_at = time.monotonic() + 0.05
                return
        self._respawn_at = None

    def _spawn(self) -> bool:
        slot = self._free_slots.pop()
        base = slot * P.SLOT_FIELDS
        for i in range(P.SLOT_FIELDS):
            self._slots[base + i] = 0
        task_r, task_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        close_fds: tuple[int, ...] = ()
        if self._start_method == "fork":  # a forked child inherits the parent's ends: drop them
            close_fds = (self._lifeline_w.fileno(), task_w.fileno(), result_r.fileno())
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_module.main,
            args=(task_r, result_w, self._lifeline_r, self._slots, slot, self._initializer, self._initargs, close_fds, self._soft_rss),
            name="resilpool-worker",
        )
        try:
            process.start()
        except Exception as exc:
            for c in (task_r, task_w, result_r, result_w):
                c.close()
            self._free_slots.append(slot)
            log.error("resilpool could not start a worker process", exc_info=True)
            self._startup_failed(exc)
            return False
        finally:
            task_r.close()
            result_w.close()
        self.stats["workers_started"] += 1
        replaces = self._vacated.popleft() if self._vacated else None
        w = _Worker(process, slot, task_w, result_r, replaces)
        os.set_blocking(w.task_fd, False)
        os.set_blocking(w.result_fd, False)
        self._workers[w.pid] = w
        self._selector.register(w.result_fd, selectors.EVENT_READ, ("r", w))
        self._selector.register(w.sentinel, selectors.EVENT_READ, ("s", w))
        self._views_dirty = True
        return True

    def _depth(self) -> int:
        ewma = self._ewma_s
        if ewma is None or ewma >= _DEEP_BELOW_S:
            return 1
        return min(_MAX_DEPTH, 1 + int(_PIPELINE_S / max(ewma, 1e-6)))

    def _dispatch(self) -> None:
        if self._broken is not None:
            self._fail_unassigned(self._broken)
            return
        if self._paused is not None or not (self._pending or self._fresh):
            return
        fresh = self._fresh
        if fresh:
            for w in self._workers.values():
                if not fresh:
                    break
                if w.sent == 0 and w.retiring is None and w.kill is None:
                    self._send(w, fresh.popleft())
                    if self._max_tasks is not None and w.sent >= self._max_tasks:
                        self._retire(w, ExitReason.MAX_TASKS)
            while fresh:  # no fresh worker to be had: take any rather than wait forever
                t = fresh.pop()
                t.needs_fresh = False
                self._pending.appendleft(t)
        pending = self._pending
        depth = self._depth()
        max_tasks = self._max_tasks
        open_workers = [w for w in self._workers.values() if w.retiring is None and w.kill is None]
        while pending and open_workers:
            still_open = []
            for w in open_workers:
                if not pending:
                    break
                if len(w.outstanding) >= depth:
                    continue
                task = pending.popleft()
                if task.attempt == 1 and task.first_start is None:
                    if not task.future.set_running_or_notify_cancel():
                        self._forget(task)
                        self.stats["cancelled"] += 1
                        still_open.append(w)
                        continue
                    task.first_start = time.monotonic()
                self._send(w, task)
                if max_tasks is not None and w.sent >= max_tasks:
                    self._retire(w, ExitReason.MAX_TASKS)
                    continue
                still_open.append(w)
            open_workers = still_open
        for w in self._workers.values():
            if w.outbox and not w.writing:
                self._flush(w)

    def _send(self, w: _Worker, task: Task) -> None:
        if task.first_start is None:
            task.first_start = time.monotonic()
        w.outbox += P.HEADER.pack(len(task.body), P.Kind.RUN, task.id, 0.0)
        w.outbox += task.body
        w.outstanding.append(task)
        w.sent += 1
        self._running_count += 1

    def _flush(self, w: _Worker) -> None:
        outbox = w.outbox
        while outbox:
            try:
                n = os.write(w.task_fd, outbox)
            except BlockingIOError:
                break
            except OSError:  # the worker is gone; its sentinel will say how
                outbox.clear()
                break
            del outbox[:n]
        want = bool(outbox)
        if want != w.writing:
            if want:
                self._selector.register(w.task_fd, selectors.EVENT_WRITE, ("w", w))
            else:
                self._selector.unregister(w.task_fd)
            w.writing = want

    def _retire(self, w: _Worker, reason: ExitReason) -> None:
        if w.retiring is not None or w.kill is not None:
            return
        w.retiring = reason
        self._views_dirty = True
        if reason is not ExitReason.SHUTDOWN:
            self._vacated.append(w.pid)  # the replacement starts now, before it leaves
        if reason is not ExitReason.SHUTDOWN and reason is not ExitReason.MAX_TASKS:
            # Leave after the running task: the tasks queued behind it come back unstarted.
            self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_STOP] = P.STOP_RETIRE
        w.outbox += P.encode(P.Retire())
        self._flush(w)

    def _on_readable(self, w: _Worker) -> None:
        try:
            data = os.read(w.result_fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the worker is exiting; its sentinel tells how
            self._selector.unregister(w.result_fd)
            w.reading = False
            return
        self._feed(w, data)

    def _feed(self, w: _Worker, data: bytes) -> None:
        try:
            frames = w.reader.feed_frames(data)
        except P.ProtocolError as exc:
            log.error("worker %d sent a corrupt frame (%s); killing it", w.pid, exc)
            self._kill_now(w, ExitReason.CRASH, None)
            return
        loads = pickle.loads
        SUCCEEDED, FAILED = P.Kind.SUCCEEDED, P.Kind.FAILED
        for kind, task_id, elapsed, body in frames:
            if kind == SUCCEEDED or kind == FAILED:
                task = w.outstanding.popleft()
                # Invariant: results arrive in the order the tasks were sent.
                assert task.id == task_id, (task.id, task_id)
                w.answered += 1
                self._running_count -= 1
                ewma = self._ewma_s
                self._ewma_s = elapsed if ewma is None else ewma + 0.1 * (elapsed - ewma)
                if kind == SUCCEEDED:
                    try:
                        value = loads(body)
                    except Exception as exc:
                        err = errors.SerializationError(
                            f"the result of task {task.id} (fn={task.fn_name}) could not be unpickled in the parent:"
                            f" {type(exc).__name__}: {exc}",
                            part="result",
                            task_id=task.id,
                        )
                        err.__cause__ = exc
                        self._attempt_failed(task, err, w.pid, elapsed, died=False, blamed=False)
                    else:
                        self._tasks.pop(task_id, None)
                        if task.timeout is not None:
                            self.task_timeouts.pop(task_id, None)
                        self.stats["completed"] += 1
                        _resolve(task.future, value, None)
                else:
                    self._attempt_failed(task, P.rebuild_error(body), w.pid, elapsed, died=False, blamed=False)
            elif kind == P.Kind.READY:
                w.ready = True
                self._views_dirty = True
                self._emit(WorkerStarted(pid=w.pid, replaces=w.replaces))
            elif kind == P.Kind.INIT_FAILED:
                w.init_error = P.rebuild_error(body)

    def _on_worker_exit(self, w: _Worker) -> None:
        sel = self._selector
        sel.unregister(w.sentinel)
        if w.writing:
            sel.unregister(w.task_fd)
            w.writing = False
        # Everything it wrote before dying is in the pipe: read it all before judging.
        while True:
            try:
                data = os.read(w.result_fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                break
            if not data:
                break
            self._feed(w, data)
        if w.reading:
            sel.unregister(w.result_fd)
            w.reading = False
        w.process.join(_JOIN_S)
        exitcode = w.process.exitcode
        _kill_group(w.pid, reaped=True)  # no grandchild outlives its worker
        started = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_STARTED]
        now = time.monotonic()
        crashed: Task | None = None
        if started > w.answered and w.outstanding:
            crashed = w.outstanding.popleft()
            self._running_count -= 1
        # Tasks queued behind it never started: back to the front of the queue, in order.
        leftover = list(w.outstanding)
        w.outstanding.clear()
        self._running_count -= len(leftover)
        for t in reversed(leftover):
            (self._fresh if t.needs_fresh else self._pending).appendleft(t)

        self_retired = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_STOP] == P.STOP_SOFT_MEMORY
        if w.kill is not None:
            reason = w.kill[0]
        elif w.retiring is not None and exitcode == 0 and crashed is None:
            reason = w.retiring
        elif self_retired and exitcode == 0 and crashed is None:
            reason = ExitReason.SOFT_MEMORY
        elif not w.ready:
            reason = ExitReason.STARTUP
        else:
            reason = ExitReason.CRASH
        detail = f"worker {w.pid} {errors.describe_exit(exitcode)}"
        if crashed is not None:
            detail += f" while running task {crashed.id} (fn={crashed.fn_name})"
        del self._workers[w.pid]
        self._views_dirty = True
        self._free_slots.append(w.slot)
        for c in (w.task_conn, w.result_conn):
            c.close()
        if reason in (ExitReason.CRASH, ExitReason.STARTUP):
            self.stats["worker_crashes"] += 1
        self.recycled[reason.value] += 1
        if reason is not ExitReason.SHUTDOWN:
            if w.retiring is None and w.kill is None:  # else its replacement started already
                self._vacated.append(w.pid)
            lvl = logging.INFO if reason.is_recycle else logging.WARNING
            log.log(lvl, "%s (%s)", detail, reason.value)
        self._emit(WorkerExited(pid=w.pid, exitcode=exitcode, reason=reason, task_id=crashed.id if crashed else None, detail=detail))
        if reason is not ExitReason.STARTUP:
            self._ensure_capacity()  # the replacement starts now, fresh for a retry that needs one

        if crashed is not None:
            start_ns = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_START_NS]
            elapsed = max(0.0, now - start_ns / 1e9) if start_ns else 0.0
            if w.kill is not None:
                err = w.kill[1](crashed, elapsed)
                blamed = reason is ExitReason.MEMORY and blame(started - 1)
            else:
                err = errors.WorkerCrashedError(pid=w.pid, exitcode=exitcode, task_id=crashed.id, fn_name=crashed.fn_name)
                blamed = blame(started - 1)
            self._attempt_failed(crashed, err, w.pid, elapsed, died=True, blamed=blamed)
        if reason is ExitReason.STARTUP and not self._draining:
            cause = w.init_error or errors.WorkerCrashedError(
                f"worker {w.pid} {errors.describe_exit(exitcode)} before it was ready", pid=w.pid, exitcode=exitcode
            )
            if w.init_error is not None:
                log.error("worker %d: initializer failed: %s", w.pid, w.init_error, exc_info=w.init_error)
            self._startup_failed(cause)

    def _startup_failed(self, cause: BaseException) -> None:
        self._last_startup_error = cause
        if self._broken is None and self._breaker.record_failure(time.monotonic()):
            err = errors.CrashLoopError(deaths=self._breaker.recent_failures, window=self._breaker.window_s)
            err.__cause__ = cause
            self._broken = err
            log.error("%s; last failure: %s", err, cause)
            self._emit(CrashLoopTripped(deaths=self._breaker.recent_failures, window_s=self._breaker.window_s, cause=f"{type(cause).__name__}: {cause}"))
            with self._lock:
                self._accepting = False
            self._fail_unassigned(err)

    def _fail_unassigned(self, err: BaseException) -> None:
        """After the breaker tripped: fail every task no live worker holds."""
        for queue in (self._pending, self._fresh):
            while queue:
                t = queue.popleft()
                self._fail(t, _copy_error(err))
        while self._timers:
            _, _, t = heapq.heappop(self._timers)
            e = _copy_error(err)
            self._add_notes(e, t, None)  # its earlier attempts
            self._fail(t, e)
        self._take_submitted()
        while self._pending:
            self._fail(self._pending.popleft(), _copy_error(err))

    # --- a failed attempt: retry, quarantine or fail ---------------------------------

    def _attempt_failed(self, task: Task, err: BaseException, pid: int | None, elapsed: float, *, died: bool, blamed: bool) -> None:
        if blamed:
            task.crashes += 1
        what = _summary(err)
        note = f"attempt {task.attempt} pid {pid}: {what} after {elapsed:.2f}s"
        if died and task.crashes >= self._quarantine_after:
            poison = errors.PoisonTaskError(crashes=task.crashes, fn_name=task.fn_name, args_repr=task.args_repr(), task_id=task.id)
            poison.__cause__ = err
            self._add_notes(poison, task, note)
            self.stats["quarantined"] += 1
            log.error("%s", poison)
            self._emit(TaskQuarantined(task_id=task.id, crashes=task.crashes, fn_name=task.fn_name))
            self._fail(task, poison)
            return
        if task.retry is not None and self._broken is None:
            if task.retry_state is None:
                task.retry_state = task.retry.new_state(task.first_start)
            delay = task.retry.next_delay(task.retry_state, err)
            if delay is not None:
                if task.notes is None:
                    task.notes = []
                task.notes.append(note)
                task.attempt += 1
                if died and not blamed:
                    task.needs_fresh = True  # maybe the old worker's fault: try a fresh one
                self.stats["retried"] += 1
                log.info("task %d (fn=%s) attempt %d failed (%s); retrying in %.2fs", task.id, task.fn_name, task.attempt - 1, what, delay)
                self._emit(TaskRetried(task_id=task.id, attempt=task.attempt - 1, delay_s=delay, error=what))
                if delay > 0:
                    task.due = time.monotonic() + delay
                    task.last_error = err
                    heapq.heappush(self._timers, (task.due, next(self._timer_seq), task))
                else:
                    (self._fresh if task.needs_fresh else self._pending).appendleft(task)
                return
        self._add_notes(err, task, None)
        self._fail(task, err)

    @staticmethod
    def _add_notes(err: BaseException, task: Task, last: str | None) -> None:
        notes = list(task.notes or ())
        if last is not None:
            notes.append(last)
        for n in notes:
            err.add_note(n)

    def _fail(self, task: Task, err: BaseException) -> None:
        self._forget(task)
        self.stats["failed"] += 1
        _resolve(task.future, None, err)

    def _forget(self, task: Task) -> None:
        self._tasks.pop(task.id, None)
        if task.timeout is not None:
            self.task_timeouts.pop(task.id, None)

    def _fire_timers(self) -> None:
        timers = self._timers
        if not timers:
            return
        now = time.monotonic()
        due: list[Task] = []
        while timers and timers[0][0] <= now:
            due.append(heapq.heappop(timers)[2])
        for t in reversed(due):
            (self._fresh if t.needs_fresh else self._pending).appendleft(t)

    # --- commands ----------------------------------------------------------------

    def _execute(self, cmd: Any) -> None:
        cls = type(cmd)
        if cls is _RetireWorker:
            w = self._workers.get(cmd.pid)
            if w is not None:
                self._retire(w, cmd.reason)
        elif cls is _KillWorker:
            w = self._workers.get(cmd.pid)
            if w is not None and w.kill is None:
                self._kill_now(w, cmd.reason, cmd.make_error, cmd.task_id)
        elif cls is _SetPaused:
            self._set_paused(cmd.reason)
        elif cls is _Shutdown:
            self._begin_drain(cmd.cancel_futures)
        elif cls is _Adopt:
            now = time.monotonic()
            for t in cmd.unstarted:
                self._tasks[t.id] = t
                if t.due is not None and t.due > now:  # keep what is left of its backoff
                    heapq.heappush(self._timers, (t.due, next(self._timer_seq), t))
                else:
                    (self._fresh if t.needs_fresh else self._pending).append(t)
            for t in cmd.interrupted:
                self._tasks[t.id] = t
                pid, elapsed = t.last_worker or (None, 0.0)
                err = errors.WorkerCrashedError(
                    f"task {t.id} (fn={t.fn_name}) was running on worker {pid} when the pool's core broke"
                    " and was rebuilt",
                    pid=pid,
                    task_id=t.id,
                    fn_name=t.fn_name,
                )
                self._attempt_failed(t, err, pid, elapsed, died=True, blamed=False)
        elif cls is _Break:
            raise CoreBrokenForTest("core broken on purpose by the test hook")

    def _set_paused(self, reason: str | None) -> None:
        from ..events import DispatchPaused, DispatchResumed

        if reason is not None and self._paused is None:
            self._paused = reason
            log.warning("resilpool starts no new task: %s", reason)
            self._emit(DispatchPaused(reason=reason))
        elif reason is None and self._paused is not None:
            was = self._paused
            self._paused = None
            log.warning("resilpool starts tasks again (was: %s)", was)
            self._emit(DispatchResumed(reason=was))

    def _kill_now(self, w: _Worker, reason: ExitReason, make_error: Callable[[Task, float], BaseException] | None, task_id: int | None = None) -> None:
        if task_id is not None:
            # Stop the group first so the slot cannot move on while we look at it.
            _signal_group(w.pid, signal.SIGSTOP)
            _wait_stopped(w.pid)
            running = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_TASK]
            if running != task_id:
                _signal_group(w.pid, signal.SIGCONT)
                return
        if make_error is None:
            make_error = _crash_error_factory(w.pid)
        w.kill = (reason, make_error)
        self._views_dirty = True
        if w.retiring is None:
            self._vacated.append(w.pid)
        _kill_group(w.pid)

    def _begin_drain(self, cancel_futures: bool) -> None:
        self._draining = True
        if cancel_futures:
            # Retries waiting for their backoff have not started: give up on them now, with
            # the error of the attempt that failed (their futures run, so cannot be cancelled).
            while self._timers:
                _, _, t = heapq.heappop(self._timers)
                e = t.last_error or errors.ResilpoolError(f"task {t.id} was waiting to be retried")
                e.add_note("retry not run: shutdown(cancel_futures=True)")
                self._add_notes(e, t, None)
                self._fail(t, e)
            keep: deque[Task] = deque()
            for t in self._pending:
                if t.first_start is None and t.future.cancel():
                    self._forget(t)
                    self.stats["cancelled"] += 1
                else:
                    keep.append(t)
            self._pending = keep

    def _maybe_finish(self) -> bool:
        if self._tasks and self._broken is None:
            return False
        if self._tasks:  # broken: tasks still on live workers finish; nothing else will come
            if any(w.outstanding for w in self._workers.values()):
                return False
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
            for w in list(self._workers.values()):
                if w.retiring is None:
                    self._retire(w, ExitReason.SHUTDOWN)
                # A worker already leaving (soft_memory, max_tasks...) keeps its reason.
        if not self._workers:
            return True
        if time.monotonic() - self._stopping_since > _STOP_GRACE_S:
            for w in self._workers.values():
                log.warning("worker %d did not exit within %.0fs of shutdown; killing it", w.pid, _STOP_GRACE_S)
                _kill_group(w.pid)
            self._stopping_since = time.monotonic()
        return False

    # --- break and salvage ----------------------------------------------------------

    def _fail_over(self, exc: BaseException) -> None:
        with self._lock:
            self._accepting = False
        if self._on_broken is not None:
            try:
                self._on_broken(self, exc)
                return
            except BaseException:
                log.error("resilpool could not rebuild its core", exc_info=True)
        # No rebuild: the pool is broken for good; fail everything so no future hangs.
        err = errors.WorkerCrashedError(f"the pool's core failed and could not be rebuilt: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        self._broken = err
        unstarted, interrupted = self.salvage()
        for t in (*unstarted, *interrupted):
            _resolve(t.future, None, _copy_error(err))

    def salvage(self) -> tuple[list[Task], list[Task]]:
        """After the manager thread failed: kill the workers, sort out the unresolved tasks.

        Returns ``(unstarted, interrupted)``: tasks that never started anywhere, and
        tasks that had started in a worker of this core. Runs on the failed manager thread.
        """
        with self._lock:
            self._accepting = False
            submitted = list(self._submitted)
            self._submitted.clear()
        unstarted: list[Task] = []
        interrupted: list[Task] = []
        for w in list(self._workers.values()):
            _kill_group(w.pid)
        for w in list(self._workers.values()):
            w.process.join(_JOIN_S)
            try:
                while data := os.read(w.result_fd, _READ_SIZE):
                    self._feed(w, data)
            except (BlockingIOError, OSError, AssertionError):
                pass
            started = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_STARTED]
            running = None
            if started > w.answered and w.outstanding:
                running = w.outstanding.popleft()
                start_ns = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_START_NS]
                running.last_worker = (w.pid, max(0.0, time.monotonic() - start_ns / 1e9) if start_ns else 0.0)
                interrupted.append(running)
            self.recycled[ExitReason.REBUILD.value] += 1
            self._emit(
                WorkerExited(
                    pid=w.pid,
                    exitcode=w.process.exitcode,
                    reason=ExitReason.REBUILD,
                    task_id=running.id if running else None,
                    detail=f"worker {w.pid} killed: the pool's core broke and was rebuilt",
                )
            )
            unstarted.extend(w.outstanding)
            w.outstanding.clear()
            for c in (w.task_conn, w.result_conn):
                c.close()
        self._workers.clear()
        unstarted.extend(self._fresh)
        unstarted.extend(self._pending)
        unstarted.extend(t for _, _, t in sorted(self._timers))
        self._fresh.clear()
        self._pending.clear()
        self._timers.clear()
        unstarted.extend(submitted)
        done = {t.id for t in (*unstarted, *interrupted)}
        # Anything else in the table was mid-update when the core broke: count it as interrupted.
        interrupted.extend(t for t in self._tasks.values() if t.id not in done and not t.future.done())
        self._tasks.clear()
        return [t for t in unstarted if not t.future.done()], [t for t in interrupted if not t.future.done()]

    def _close(self) -> None:
        for w in list(self._workers.values()):
            _kill_group(w.pid)
            w.process.join(_JOIN_S)
        self._views = ()
        try:
            self._selector.close()
        except Exception:
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._lifeline_w.close()
        self._lifeline_r.close()


# --- helpers -----------------------------------------------------------------------


def _resolve(future: Future[Any], value: Any, exc: BaseException | None) -> None:
    try:
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)
    except InvalidStateError:  # cancelled by its owner meanwhile
        pass


def _copy_error(err: BaseException) -> BaseException:
    """A fresh instance per future, so notes added to one do not show on another."""
    try:
        new: BaseException = pickle.loads(pickle.dumps(err))
    except Exception:
        return err
    new.__cause__ = err.__cause__
    return new


def _summary(err: BaseException) -> str:
    if isinstance(err, errors.ResilpoolError):
        return f"{type(err).__name__}: {err}"
    return f"raised {type(err).__name__}: {err}"


def _crash_error_factory(pid: int) -> Callable[[Task, float], BaseException]:
    def make(task: Task, elapsed: float) -> BaseException:
        return errors.WorkerCrashedError(pid=pid, exitcode=-signal.SIGKILL, task_id=task.id, fn_name=task.fn_name)

    return make


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _wait_stopped(pid: int, timeout_s: float = 0.2) -> None:
    """Wait until a SIGSTOPped process has really stopped (signal delivery is asynchronous).

    No event tells us this (the worker is the forkserver's child, not ours, so
    ``waitid(WSTOPPED)`` is not available): poll its state in /proc, briefly and
    boundedly. Where there is no /proc, return at once.
    """
    path = f"/proc/{pid}/stat"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return
        state = data[data.rindex(b")") + 2 : data.rindex(b")") + 3]
        if state in (b"T", b"t", b"Z", b"X") or time.monotonic() > deadline:
            return
        time.sleep(0.0002)


def _kill_group(pid: int, *, reaped: bool = False) -> None:
    """SIGKILL the worker's process group (it leads one), or the worker alone if it has none yet.

    With ``reaped`` the worker is already gone: only its group (grandchildren) is
    killed, never the pid itself, which may belong to another process by now.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if reaped:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
