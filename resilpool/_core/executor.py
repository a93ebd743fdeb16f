"""The local transport: one manager thread, the worker processes it feeds, and their pipes.

The task state machine is :class:`~resilpool._core.tasks.TaskBook`; this module only
moves bytes and reports to it: a worker answered, a worker died, a worker is ready.
It carries out the book's dispatch decisions (``take``) by writing frames.

Data flow::

    caller threads          manager thread (owns the book and every _Worker)               worker processes
    --------------          ------------------------------------------------               ----------------
    submit() ──pickle──> _submitted ─┐ (under _lock)
    shutdown(), abort(),             │
    monitor (retire/kill/pause) ─> _commands ─┤ 1 byte on the wake-up pipe
                                     v
                   select() on: wake-up pipe, result pipes, sentinels, writable task pipes;
                   timeout = next retry backoff, shutdown grace or timeout, respawn, deadline check
                                     │
                   TaskBook: queued / fresh / timers ──take(pid)──> held by worker pid (FIFO)
                                     │                                  │ outbox ──task pipe──> run frames in order,
                                     │                                  │                       claim each in the slot
                   answered(pid, id) <─── FrameReader <──result pipe────┘ <── one frame per task
                   (header and task id checked here)
                   decoding(task) ── DecodeJob(body) ──> decoder threads (decode.py, <= max_workers + 1):
                                                         pickle.loads / rebuild_error, user code
                   decoded(task)  <── done deque + 1 byte on the wake-up pipe ──┘
                   succeeded / attempt_failed (retry, quarantine, fail)
                   lost(pid, started=slot) <── sentinel (death) ─────────── slot (shared memory):
                   take_back(pid, ids)  ── SIGSTOP, read slot, revoke ──>  [task, start ns, frame claimed, pid,
                                                                            stop, revoked frames]
                   futures resolved (done-callbacks run here)
                   events ──> event thread ──> logging, listeners

Ownership (who may touch what):

- The manager thread alone drives the :class:`TaskBook` (``_book``), ``_workers`` and
  every ``_Worker``, resolves futures (so done-callbacks run on it) and starts,
  stops, kills and reaps processes. One exception, before it exists: with ``fork`` and
  ``spawn`` the constructing thread starts the first workers, then starts the manager
  thread, which takes that state over (``Thread.start`` orders the two).
- It never unpickles a result or a task's error that may run user code: those may
  take any time. (A small result naming no class or function, which can run no code,
  is unpickled here at once: ``decode.loads_plain``.) The decoder threads (:class:`~resilpool._core.decode.Decoder`, ``_decoder``) do, and
  touch nothing but the :class:`DecodeJob` each took: they never see the book, a
  worker or a future. A decoded job comes back through the decoder's done deque and
  a wake-up; the manager then settles the task in the book. While it decodes, the
  task is in the book's ``decoding`` place: it left its worker (whose death no longer
  concerns it), counts as running, and keeps a shutdown draining.
  (An initializer's error, sent once by a worker that then exits, is still rebuilt
  on the manager thread.)
- Other threads only append to ``_submitted``/``_commands`` and wake the manager;
  they read the immutable ``_views`` tuple the manager republishes when workers
  change, the slots (shared memory, written by workers; the parent writes only
  ``stop`` and ``revoke``, and zeroes a slot before a new worker gets it), and
  :meth:`Core.snapshot` (ints only).
- ``_lock`` guards the ``_accepting`` flag and the submit queue hand-over, so no
  task can be queued to a core after it stopped accepting or broke.

Invariants (the book's :meth:`TaskBook.check_invariants`, plus):

- A worker's results arrive in the order its tasks were sent; a result for any other
  task is a protocol violation: that worker is killed, nobody else is affected.
- A task whose frame number is above the slot's ``started`` never started: a worker's
  death or a take-back returns it to the queue, never fails it.
- Each future is resolved exactly once, by the manager thread.
- Messages between the manager and the decoders: a ``DecodeJob`` handed over means
  "unpickle this answered attempt's body"; the same job in the done deque means
  "decoded: ``value``, or the attempt's ``error``". An exception from unpickling,
  ``BaseException`` included, is that attempt's failure (retried if its policy says
  so), never the manager's.

Seams for the supervisor (any thread): :meth:`Core.worker_views`,
:meth:`Core.read_slot`, :meth:`Core.retire_worker`, :meth:`Core.kill_worker`,
:meth:`Core.pause_dispatch`/:meth:`Core.resume_dispatch`; for the pool:
:meth:`Core.abort`, :meth:`Core.shutdown`; for a rebuild, :meth:`Core.salvage`
hands the unresolved tasks to a new core's :meth:`Core.adopt`.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import os
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .. import errors
from ..events import Event, ExitReason, WorkerExited, WorkerStarted
from ..supervisor.breaker import blame
from ..supervisor.policy import Kill
from . import protocol as P
from . import worker as worker_module
from .decode import DecodeJob, Decoder, loads_plain, settle_decoded
from .commands import Abort, Command, KillWorker, RetireWorker, Shutdown
from .inbox import CoreInbox
from .lazy import FORK_LOCK
from .reaper import Reaper, kill_tree
from .tasks import CoreGone, ProtocolViolation, Task, TaskBook, WorkerCounters, copy_error, outcome, resolve

__all__ = ["Core", "CoreConfig", "CoreGone", "Task", "WorkerView"]

log = logging.getLogger("resilpool")


# A pipe holds 64 KiB: a read never returns more. A larger buffer only costs an mmap,
# mremap and munmap per read (glibc serves blocks of 128 KiB and up with mmap).
_READ_SIZE: Final = 1 << 16
_STOP_GRACE_S: Final = 5.0  # after the last task, how long retiring workers get before SIGKILL
_JOIN_S: Final = 2.0
_REAPER_DEFER_S: Final = 0.2  # the reaper starts once the first workers are up and idle, or this long after the core


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreConfig:
    """Everything a core needs from the pool, fixed for the pool's life (one object, not
    ten arguments through three layers). Built by :class:`ResilientPool`; also what the
    test hooks of ``resilpool.testing`` read (``monitor_interval``)."""

    max_workers: int
    mp_context: multiprocessing.context.BaseContext
    initializer: Callable[..., object] | None = None
    initargs: tuple[Any, ...] = ()
    max_tasks_per_worker: int | None = None
    soft_max_rss: int | None = None
    max_startup_failures: int = 3
    startup_window_s: float = 60.0
    quarantine_after: int = 3
    monitor_interval: float | None = 0.2
    #: a new worker not ready within this many seconds is killed (a start-up failure); None: no limit
    init_timeout_s: float | None = 60.0
    #: a worker holding a task it has not started, with no word from it for this long (or
    #: stopped this long, by SIGSTOP or a debugger), is stalled: killed and replaced;
    #: its unstarted tasks run elsewhere
    ack_timeout_s: float = 5.0
    #: the largest result frame a worker may announce; a bigger one is a corrupt channel
    max_frame_bytes: int = 1 << 36
    name: str = "resilpool"
    cgroup: bool = False  # Limits.cgroup: a cgroup v2 per worker (reaper.py)


# --- workers -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerView:
    """What other threads may know of a worker: published by the manager on every change."""

    pid: int
    slot: int
    spawned_at: float  # time.monotonic()
    ready: bool
    retiring: bool



def _fork_popen_fds(process: Any) -> tuple[int, ...]:
    """The fds a fork ``Popen`` keeps for its child: the sentinel, and the write end whose
    EOF tells the child that its parent died. A worker forked later must not hold them.

    Read from the arguments of the Popen's finalizer, which closes exactly these
    (``multiprocessing/popen_fork.py``, the same from 3.8 to 3.13); () if that changes.
    """
    args = getattr(getattr(getattr(process, "_popen", None), "finalizer", None), "_args", None)
    if isinstance(args, tuple) and all(isinstance(fd, int) for fd in args):
        return args
    return ()


class _Worker:
    """Parent-side state of one worker process. Owned by the manager thread.

    The tasks it holds are the book's ``held(pid)``, in the order sent; ``task.seq`` is
    each one's frame number on this worker.
    """

    __slots__ = (
        "condemned",
        "head_since",
        "init_error",
        "kill",
        "outbox",
        "pid",
        "process",
        "progress_at",
        "reader",
        "ready",
        "reading",
        "replaces",
        "result_conn",
        "result_fd",
        "retiring",
        "revoked",
        "sent",
        "sentinel",
        "slot",
        "spawned_at",
        "stopped_cpu",
        "stopped_since",
        "task_conn",
        "task_fd",
        "writing",
    )

    def __init__(self, process: Any, slot: int, task_conn: Any, result_conn: Any, replaces: int | None, reader: P.FrameReader) -> None:
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
        self.reader = reader
        self.progress_at = self.spawned_at  # last time it said anything (result pipe)
        self.head_since = self.spawned_at  # when its first held task became first (sent to it idle)
        self.stopped_since: float | None = None  # first seen stopped (SIGSTOP, debugger) while busy
        self.stopped_cpu = 0  # its CPU ticks then
        self.outbox = bytearray()
        self.sent = 0  # RUN frames sent, ever: the last one's frame number
        self.revoked = 0  # frames taken back, ever (never run here)
        self.ready = False
        self.retiring: ExitReason | None = None
        self.kill: Kill | None = None
        self.condemned = False  # broke the protocol: killed, nothing more it says counts
        self.init_error: BaseException | None = None
        self.reading = True
        self.writing = False

    @property
    def open(self) -> bool:
        """Takes new tasks: not leaving, not being killed."""
        return self.retiring is None and self.kill is None


# --- the core ---------------------------------------------------------------------


class Core(CoreInbox):
    """Worker processes fed by one manager thread. See the module docstring.

    What other threads call (submit, commands, counters, joins) is :class:`CoreInbox`'s,
    shared with the Dask core; this class is the transport behind it."""

    def __init__(
        self,
        config: CoreConfig,
        *,
        emit: Callable[[Event], None],
        on_broken: Callable[[Core, BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self.max_workers = config.max_workers
        self._ctx = config.mp_context
        self._start_method = self._ctx.get_start_method()
        self._emit = emit
        self._on_broken = on_broken

        super().__init__()  # shared with callers: _lock, _accepting, _submitted, _commands
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._views: tuple[WorkerView, ...] = ()
        self._views_dirty = True
        n_slots = 2 * config.max_workers + 2
        # The workers' slots, then one field: the reaper's pid once it runs (0 until then).
        self._reaper_cell = n_slots * P.SLOT_FIELDS
        self._slot_table = P.SlotTable(n_slots * P.SLOT_FIELDS + 1)
        self._slots = self._slot_table.view
        self._free_slots = list(range(n_slots - 1, -1, -1))
        # The parent never writes to the lifeline; workers see EOF when it dies.
        self._lifeline_r, self._lifeline_w = self._ctx.Pipe(duplex=False)
        # Kills the workers' trees if this process dies (reaper.py). Started by the manager
        # thread once the first workers are up and idle, or _REAPER_DEFER_S from now at the latest
        # (see Reaper.start); a worker reads its pid from the slot table's last field.
        self._reaper = Reaper(cgroup=config.cgroup, start=False)
        self._reaper_due: float | None = time.monotonic() + _REAPER_DEFER_S

        # Manager-thread state.
        self._book: TaskBook[int] = TaskBook(
            quarantine_after=config.quarantine_after,
            max_startup_failures=config.max_startup_failures,
            startup_window_s=config.startup_window_s,
            emit=emit,
        )
        self._counters = WorkerCounters()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._workers: dict[int, _Worker] = {}
        self._vacated: deque[int] = deque()
        self._stopping_since: float | None = None
        self._respawn_at: float | None = None
        self._rebalance_at: float | None = None  # next look for a task to move to an idle worker
        self._check_at: float | None = None  # next deadline check (init, acknowledgement, stopped)
        self._give_up_at: float | None = None  # shutdown(timeout=...): when to stop waiting for the drain
        self._give_up_after_s = 0.0
        self.task_timeouts = _TaskTimeouts(self._book)  # per-task overrides, read by the monitor
        # Results are unpickled on these threads, never on the manager's (decode.py).
        self._decoder = Decoder(config.name, self._wake, max_threads=config.max_workers + 1)

        if self._start_method != "forkserver":
            # fork and spawn: start the first workers here, before the manager thread exists
            # (it takes over this state at its start). A fork then copies a parent with one
            # thread fewer, and neither start waits for the GIL behind the rest of the
            # constructor; each costs this thread a few ms. The forkserver's first start
            # waits for the server's boot, which the manager thread does instead.
            self._ensure_capacity()
        self._thread = threading.Thread(target=self._owner_main, args=(self._run,), name=f"{config.name}-manager", daemon=True)
        self._thread.start()

    # --- called from any thread ----------------------------------------------------

    @property
    def broken(self) -> BaseException | None:
        """The CrashLoopError that broke this core, if its breaker tripped."""
        return self._book.broken

    def worker_views(self) -> tuple[WorkerView, ...]:
        """The live workers, as last published by the manager thread."""
        return self._views

    def read_slot(self, slot: int) -> tuple[int, float | None, int]:
        """``(task id or 0, started at (monotonic) or None, frames claimed)`` for a worker slot."""
        base = slot * P.SLOT_FIELDS
        s = self._slots
        try:
            for _ in range(8):
                task = s[base + P.SLOT_TASK]
                start_ns = s[base + P.SLOT_START_NS]
                started = s[base + P.SLOT_STARTED]
                if s[base + P.SLOT_TASK] == task:  # not torn by a task switch in between
                    break
        except ValueError:  # released: the core has closed (a monitor's last look)
            return 0, None, 0
        return task, (start_ns / 1e9 if task else None), started

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
            log.error("resilpool core failed; rebuilding", exc_info=True, extra=outcome("rebuild"))
            self._fail_over(exc)
        finally:
            self._close()

    def _loop(self) -> None:
        select = self._selector.select
        book = self._book
        decoder = self._decoder
        while True:
            if self._views_dirty:  # a worker came, went or changed: start any missing, publish
                self._ensure_capacity()
                self._publish_views()
            timeout = self._next_timeout()
            dead: list[_Worker] = []
            for key, _ in select(timeout):
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
            if decoder.has_done():
                self._settle_decoded()
            while self._commands:
                self._execute(self._commands.popleft())
            for w in dead:
                self._on_worker_exit(w)
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                self._give_up()  # before dispatch: nothing starts at the deadline to be killed
            book.fire_timers()
            self._dispatch()
            now = time.monotonic()
            if self._check_at is None or now >= self._check_at:
                self._check_deadlines(now)
            if self._rebalance_at is None or now >= self._rebalance_at:
                # Worth a look with two tasks held (one running, one waiting behind it) and
                # none queued; otherwise nothing to do, and no deadline kept (no busy turns).
                if book.held_count >= 2 and not book.has_queued():
                    self._rebalance(now)
                else:
                    self._rebalance_at = None
            if self._reaper_due is not None and (now >= self._reaper_due or self._first_workers_idle()):
                self._start_reaper()
            if book.draining and self._maybe_finish():
                return

    def _first_workers_idle(self) -> bool:
        """Every worker of a full complement is ready, and none has work (the reaper may
        start: its boot competes with neither a worker's start nor a first task)."""
        workers = self._workers
        book = self._book
        return book.held_count == 0 and not book.has_queued() and len(workers) >= self.max_workers and all(w.ready for w in workers.values())

    def _start_reaper(self) -> None:
        """Start the reaper (deferred: see Reaper.start) and publish its pid to the workers."""
        self._reaper_due = None
        self._reaper.start()
        self._slots[self._reaper_cell] = self._reaper.pid or 0

    def _drain_wakeups(self) -> None:
        # One read: the pipe holds a byte per wake-up since the last drain; were there more
        # than 64 KiB of them, select() reports it readable again. (A second read that
        # only says EAGAIN costs a syscall per round trip.)
        try:
            os.read(self._wake_r, 65536)
        except BlockingIOError:
            pass

    def _next_timeout(self) -> float | None:
        """Seconds until the earliest deadline of the loop (None: none); runs every turn."""
        at = self._book.next_due()
        for d in (self._check_at, self._rebalance_at, self._respawn_at, self._give_up_at, self._reaper_due):
            if d is not None and (at is None or d < at):
                at = d
        if self._stopping_since is not None:
            d = self._stopping_since + _STOP_GRACE_S
            at = d if at is None or d < at else at
        if at is None:
            return None
        now = time.monotonic()
        if self._respawn_at is not None and self._respawn_at <= now:
            self._views_dirty = True  # makes the next _ensure_capacity look again
        # Clamped: select() refuses timeouts of about 25 days and more.
        return min(86400.0, max(0.0, at - now))

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
        return sum(1 for w in self._workers.values() if w.open)

    def _ensure_capacity(self) -> None:
        if self._book.broken is not None or self._stopping_since is not None or not self._views_dirty:
            return  # worker changes always set _views_dirty: nothing changed, nothing to start
        while self._active_workers() < self.max_workers:
            if not self._free_slots or not self._spawn():
                # Try again shortly (a retiring worker frees its slot; a failed start is counted
                # by the breaker, which bounds how often this can happen).
                self._respawn_at = time.monotonic() + 0.05
                return
        self._respawn_at = None

    def _spawn(self) -> bool:
        cfg = self.config
        slot = self._free_slots.pop()
        base = slot * P.SLOT_FIELDS
        for i in range(P.SLOT_FIELDS):
            self._slots[base + i] = 0
        task_r, task_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        close_fds: tuple[int, ...] = ()
        if self._start_method == "fork":
            # A forked child inherits every fd of this process: it drops all of this core's
            # but its own ends and the lifeline's read end (every live worker's are open: a
            # worker leaves _workers as its connections close, on this thread). Kept, the
            # parent's ends of the other workers' pipes would grow each worker's fd table with
            # the pool and keep those pipes open after the parent closed its copies.
            close_fds = (
                self._lifeline_w.fileno(),
                task_w.fileno(),
                result_r.fileno(),
                self._wake_r,
                self._wake_w,
                self._selector.fileno(),
                *(fd for o in self._workers.values() for fd in (o.task_fd, o.result_fd, *_fork_popen_fds(o.process))),
            )
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_module.main,
            args=(task_r, result_w, self._lifeline_r, self._slot_table, slot, cfg.initializer, cfg.initargs, close_fds, cfg.soft_max_rss, self._reaper_cell),
            name="resilpool-worker",
        )
        try:
            if self._start_method == "fork":
                with FORK_LOCK:  # no lazy import of ours is half done in the copy (lazy.py)
                    process.start()
            else:
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
        self._counters.started += 1
        replaces = self._vacated.popleft() if self._vacated else None
        reader = P.FrameReader(P.FROM_WORKER, cfg.max_frame_bytes, ids=self._book)
        w = _Worker(process, slot, task_w, result_r, replaces, reader)
        os.set_blocking(w.task_fd, False)
        os.set_blocking(w.result_fd, False)
        self._workers[w.pid] = w
        self._reaper.watch(w.pid)
        self._selector.register(w.result_fd, selectors.EVENT_READ, ("r", w))
        self._selector.register(w.sentinel, selectors.EVENT_READ, ("s", w))
        self._views_dirty = True
        return True

    def _dispatch(self) -> None:
        book = self._book
        if book.broken is not None:
            if book.has_queued():
                book.fail_unassigned(book.broken)
            return
        if book.paused is not None or not book.has_queued():
            return
        max_tasks = self.config.max_tasks_per_worker
        if book.has_fresh():
            for w in self._workers.values():
                if not book.has_fresh():
                    break
                if w.sent == 0 and w.open and w.ready:
                    task = book.take(w.pid, fresh_holder=True)
                    if task is not None:
                        self._send(w, task, len(book.held(w.pid)))
                        if max_tasks is not None and w.sent - w.revoked >= max_tasks:
                            self._retire(w, ExitReason.MAX_TASKS)
                        if w.outbox and not w.writing:
                            self._flush(w)
            # No fresh worker to be had: take any rather than wait forever. One still starting
            # (a replacement, spawned at the death) will do: the retry waits for it, within its
            # init_timeout, so a death there is its own (blamed), not another task's leak.
            if book.has_fresh() and not any(w.sent == 0 and w.open and not w.ready for w in self._workers.values()):
                book.release_fresh()
        held = book.held
        if book.queued_count() == 1:
            # One task (a caller's submit-and-wait): the first idle worker takes it, as the
            # least-loaded order below would give it, without sorting and caps. (Every
            # frame queued above is flushed already.)
            for w in self._workers.values():
                if w.open and w.ready and not held(w.pid):
                    task = book.take(w.pid)
                    if task is not None:
                        self._send(w, task, 1)
                        if max_tasks is not None and w.sent - w.revoked >= max_tasks:
                            self._retire(w, ExitReason.MAX_TASKS)
                        if w.outbox and not w.writing:
                            self._flush(w)
                    return
        depth = book.durations.depth()
        # Least loaded first (an idle worker gets the next task, never a busy one), and no
        # task is sent to a worker before it is ready (its initializer may hang).
        open_workers = [w for w in self._workers.values() if w.open and w.ready]
        if not open_workers:
            return
        # How many tasks each holds, kept here as tasks are taken (the book's count is only
        # read once per worker per pass: this loop runs once per task).
        n_held = {w.pid: len(held(w.pid)) for w in open_workers}
        if len(open_workers) > 1:
            open_workers.sort(key=lambda w: n_held[w.pid])
        if depth > 1:
            slow_after = self._slow_after()
            now = time.monotonic()
            caps = {w.pid: 1 if self._running_for(w, now) > slow_after else depth for w in open_workers}
        else:
            caps = None
        take, send = book.take, self._send
        while open_workers:
            still_open: list[_Worker] = []
            for w in open_workers:
                pid = w.pid
                n = n_held[pid]
                if n >= (depth if caps is None else caps[pid]):
                    continue
                task = take(pid)
                if task is None:  # nothing left to take
                    still_open = []
                    break
                n_held[pid] = n = n + 1
                send(w, task, n)
                if max_tasks is not None and w.sent - w.revoked >= max_tasks:
                    self._retire(w, ExitReason.MAX_TASKS)
                    continue
                still_open.append(w)
            open_workers = still_open
        for w in self._workers.values():
            if w.outbox and not w.writing:
                self._flush(w)

    def _slow_after(self) -> float:
        """A running task that has run this long outlasts the estimate: pipeline no more behind it."""
        ewma = self._book.durations.ewma_s or 0.0
        return max(0.001, 4 * ewma)

    def _running_for(self, w: _Worker, now: float) -> float:
        """Seconds the worker's current task has run (0 between tasks)."""
        base = w.slot * P.SLOT_FIELDS
        if not self._slots[base + P.SLOT_TASK]:
            return 0.0
        return max(0.0, now - float(self._slots[base + P.SLOT_START_NS]) / 1e9)

    def _rebalance(self, now: float) -> None:
        """No idle worker while a task waits: take unstarted tasks back from a worker whose
        running task outlasted the estimate, for an idle worker (issue 16.1)."""
        self._rebalance_at = None
        book = self._book
        if book.paused is not None or book.broken is not None or book.held_count < 2:
            return
        held = book.held
        if not any(w.open and w.ready and not held(w.pid) for w in self._workers.values()):
            return
        slow_after = self._slow_after()
        next_at: float | None = None
        for w in list(self._workers.values()):
            h = held(w.pid)
            if len(h) < 2 or w.kill is not None:
                continue
            ran = self._running_for(w, now)
            if ran >= slow_after:
                back = self._take_back(w)
                if back:
                    log.debug("took %d unstarted tasks back from worker %d (its task ran %.3fs)", len(back), w.pid, ran)
            else:
                at = now + slow_after - ran
                next_at = at if next_at is None else min(next_at, at)
        if book.has_queued():
            self._dispatch()
        self._rebalance_at = next_at

    def _check_deadlines(self, now: float) -> None:
        """Every state has a deadline: a worker not ready within init_timeout, or holding a
        task it has not started with no word from it for ack_timeout, or stopped (SIGSTOP,
        a debugger) that long, is killed; its unstarted tasks run elsewhere (issue 13.1)."""
        cfg = self.config
        ack = cfg.ack_timeout_s
        self._check_at = None
        book = self._book
        watching = False
        for w in list(self._workers.values()):
            if w.kill is not None:
                continue
            if not w.ready:
                if cfg.init_timeout_s is None:
                    continue
                watching = True
                if now - w.spawned_at > cfg.init_timeout_s:
                    log.error(
                        "worker %d did not become ready within init_timeout=%.1fs; killing it", w.pid, cfg.init_timeout_s, extra=outcome("startup")
                    )
                    w.init_error = errors.WorkerCrashedError(
                        f"worker {w.pid} did not finish its initializer within init_timeout={cfg.init_timeout_s}s", pid=w.pid
                    )
                    self._kill_now(w, Kill(pid=w.pid, task_id=None, reason=ExitReason.STARTUP, detail="init_timeout"))
                continue
            held = book.held(w.pid)
            if not held:
                w.stopped_since = None
                continue
            watching = True
            # Stopped, and stayed so: seen stopped at every look, with no CPU used since the
            # first (a brief stop by the pool's own take-back, or anyone's, does not count).
            cpu = _proc_cpu_ticks(w.pid)
            if _is_stopped(w.pid) and cpu is not None:
                if w.stopped_since is None or cpu != w.stopped_cpu:
                    w.stopped_since, w.stopped_cpu = now, cpu
            else:
                w.stopped_since = None
            head_waiting = held[0].seq > self._started(w)
            quiet_s = now - max(w.progress_at, w.head_since)
            if w.stopped_since is not None and now - w.stopped_since >= ack:
                why = f"it was stopped (SIGSTOP or a debugger) for {now - w.stopped_since:.1f}s with work queued"
            elif head_waiting and quiet_s >= ack:
                why = f"it held task {held[0].id} for {quiet_s:.1f}s without starting it or saying anything"
            else:
                continue
            log.warning("worker %d stalled: %s; killing it (its unstarted tasks run elsewhere)", w.pid, why)
            self._kill_now(w, Kill(pid=w.pid, task_id=None, reason=ExitReason.STALL, timeout=ack, detail=why))
        if watching:
            self._check_at = now + min(1.0, ack / 4, (cfg.init_timeout_s or 1.0) / 4)

    def _send(self, w: _Worker, task: Task, n_held: int) -> None:
        """Queue ``task``'s frame to ``w``, which holds ``n_held`` tasks with this one."""
        w.sent += 1
        task.seq = w.sent
        if n_held == 1:  # it was idle: this one is first, from now
            now = time.monotonic()
            w.head_since = now
            if self._check_at is None:
                self._check_at = now + min(1.0, self.config.ack_timeout_s / 4)
        w.outbox += P.HEADER.pack(len(task.body), P.Kind.RUN, task.id, 0.0)
        w.outbox += task.body

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
        if not w.open:
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

    def _started(self, w: _Worker) -> int:
        """The frame number the worker claimed last (its acknowledgement)."""
        return int(self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_STARTED])

    def _n_started(self, w: _Worker) -> int:
        """How many of the tasks ``w`` holds have started (held in frame order). Exact once
        ``w`` is dead or stopped; more than one only when its answers were lost."""
        claimed = self._started(w)
        n = 0
        for t in self._book.held(w.pid):
            if t.seq > claimed:
                break
            n += 1
        return n

    def _head_started(self, w: _Worker) -> bool:
        """Has the first task ``w`` holds started? Exact once ``w`` is dead or stopped."""
        held = self._book.held(w.pid)
        return bool(held) and held[0].seq <= self._started(w)

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
        w.progress_at = time.monotonic()
        self._feed(w, data)

    def _feed(self, w: _Worker, data: bytes) -> None:
        if w.condemned:
            return
        try:
            frames = w.reader.feed_frames(data)
        except P.ProtocolError as exc:
            self._protocol_error(w, f"it sent a corrupt frame ({exc})")
            return
        jobs: list[DecodeJob] = []
        try:
            self._take_frames(w, frames, jobs)
        finally:
            if jobs:  # answered before a protocol error too: theirs are good
                self._decoder.put(jobs)

    def _take_frames(self, w: _Worker, frames: list[tuple[int, int, float, bytes]], jobs: list[DecodeJob]) -> None:
        """The book takes each answered task from ``w``; its body goes to ``jobs`` to be
        unpickled by a decoder thread (decode.py), never here."""
        book = self._book
        SUCCEEDED, FAILED = P.Kind.SUCCEEDED, P.Kind.FAILED
        pid = w.pid
        for kind, task_id, elapsed, body in frames:
            if kind == SUCCEEDED or kind == FAILED:
                try:
                    if kind == SUCCEEDED:
                        plain, value = loads_plain(body)  # no user code can run: done here, at once
                        if plain:
                            book.answered_ok(pid, task_id, elapsed, value)
                            continue
                    task = book.answered(pid, task_id)
                except ProtocolViolation as exc:
                    self._protocol_error(w, str(exc))
                    return
                book.durations.observe(elapsed)
                book.decoding(task)
                jobs.append(DecodeJob(task, w.pid, kind == SUCCEEDED, elapsed, body))
            elif kind == P.Kind.READY:
                w.ready = True
                self._views_dirty = True
                self._emit(WorkerStarted(pid=w.pid, replaces=w.replaces))
            elif kind == P.Kind.INIT_FAILED:
                w.init_error = P.rebuild_error(body)
            else:
                self._protocol_error(w, f"it sent a frame of kind {kind}, which only the parent sends")
                return

    def _settle_decoded(self) -> None:
        """Settle the tasks whose results the decoders unpickled since the last turn."""
        settle_decoded(self._book, self._decoder)

    def _protocol_error(self, w: _Worker, what: str) -> None:
        """The worker broke the protocol: kill it; its tasks fare as in any death."""
        log.error("worker %d broke the protocol: %s; killing it", w.pid, what, extra=outcome("protocol"))
        w.condemned = True
        if w.kill is None:
            self._kill_now(w, Kill(pid=w.pid, task_id=None, reason=ExitReason.CRASH, detail=f"protocol error: {what}"))

    def _on_worker_exit(self, w: _Worker) -> None:
        sel = self._selector
        book = self._book
        sel.unregister(w.sentinel)
        if w.writing:
            sel.unregister(w.task_fd)
            w.writing = False
        # Everything it wrote before dying is in the pipe: read it all before judging.
        while w.reading:
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
        self._reaper.gone(w.pid)  # nor one that left its group, with Limits(cgroup=True)
        now = time.monotonic()
        # The task it was running, if any; the ones queued behind it go back to the queue.
        # Behind a corrupt frame, answers of tasks that ran may be lost: the slot's claim
        # says how many started, and none of those runs again (at most once).
        started_tasks = book.lost_started(w.pid, self._n_started(w))
        crashed = started_tasks[-1] if started_tasks else None  # the last one claimed was running

        self_retired = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_STOP] == P.STOP_SOFT_MEMORY
        if w.kill is not None:
            reason = w.kill.reason
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
            self._counters.crashes += 1
        self._counters.recycled[reason.value] += 1
        if reason is not ExitReason.SHUTDOWN:
            if w.open:  # else its replacement started already
                self._vacated.append(w.pid)
            lvl = logging.INFO if reason.is_recycle or reason is ExitReason.ABORT else logging.WARNING
            log.log(lvl, "%s (%s)", detail, reason.value)
        self._emit(WorkerExited(pid=w.pid, exitcode=exitcode, reason=reason, task_id=crashed.id if crashed else None, detail=detail))
        if reason is not ExitReason.STARTUP:
            self._ensure_capacity()  # the replacement starts now, fresh for a retry that needs one

        if crashed is not None:
            start_ns = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_START_NS]
            elapsed = max(0.0, now - start_ns / 1e9) if start_ns else 0.0
            tasks_before = max(0, crashed.seq - 1 - w.revoked)
            if w.kill is not None:
                err: BaseException = w.kill.to_error(crashed.id, crashed.fn_name, elapsed)
                blamed = reason is ExitReason.MEMORY and blame(tasks_before)
                if reason is ExitReason.ABORT and crashed.aborted is None:
                    crashed.aborted = w.kill.detail or "aborted"
            else:
                err = errors.WorkerCrashedError(pid=w.pid, exitcode=exitcode, task_id=crashed.id, fn_name=crashed.fn_name)
                blamed = blame(tasks_before)
            book.attempt_failed(crashed, err, pid=w.pid, elapsed=elapsed, died=True, blamed=blamed)
            for t in started_tasks[:-1]:  # ran, but their answers were lost with the channel
                lost_err = w.kill.to_error(t.id, t.fn_name, 0.0) if w.kill is not None else errors.WorkerCrashedError(
                    pid=w.pid, exitcode=exitcode, task_id=t.id, fn_name=t.fn_name
                )
                lost_err.add_note(f"task {t.id} ran on worker {w.pid}, but its answer was lost with the worker's result channel")
                book.attempt_failed(t, lost_err, pid=w.pid, elapsed=0.0, died=True, blamed=False)
        if reason is ExitReason.STARTUP and not book.draining:
            cause = w.init_error or errors.WorkerCrashedError(
                f"worker {w.pid} {errors.describe_exit(exitcode)} before it was ready", pid=w.pid, exitcode=exitcode
            )
            if w.init_error is not None:
                log.error("worker %d: initializer failed: %s", w.pid, w.init_error, exc_info=w.init_error, extra=outcome("startup"))
            self._startup_failed(cause)

    def _startup_failed(self, cause: BaseException) -> None:
        if self._book.startup_failed(cause):
            with self._lock:
                self._accepting = False
            self._take_submitted()  # raced in before the flag: fail them too
            self._book.fail_unassigned(self._book.broken or cause)

    # --- take-back: unstarted tasks leave a live worker ---------------------------------

    def _take_back(self, w: _Worker) -> list[Task] | None:
        """Take every unstarted task back from live worker ``w`` (see protocol: Take-back).

        Returns the tasks taken back (the book queued them again, or cancelled the
        aborted ones), or None if ``w`` could not be stopped to settle it safely.
        """
        held = self._book.held(w.pid)
        if not held or held[-1].seq <= self._started(w):
            return []  # nothing unstarted (a cheap look first: the claim only grows)
        was_stopped = _is_stopped(w.pid)
        if not was_stopped:
            _signal_pid(w.pid, signal.SIGSTOP)
            if not _wait_stopped(w.pid):
                _signal_pid(w.pid, signal.SIGCONT)
                return None
        interfered = gone = False
        try:
            claimed = self._started(w)
            tail = [t for t in held if t.seq > claimed]
            if not tail:
                return []
            hi = w.sent
            if hi - claimed >= 1 << P.REVOKE_SPAN_BITS:
                return None
            self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_REVOKE] = P.revoke_range(claimed, hi)
            # It died meanwhile (its task killed it, say): no interference, a death, which
            # its sentinel reports next and which is judged by its final claim, exactly.
            gone = _is_gone(w.pid)
            # Someone else's SIGCONT while we looked would void the argument above: then
            # nobody can tell which frames it will skip, so it dies instead, and its death
            # is judged by its final claim, exactly (no task runs twice; none hangs).
            interfered = not gone and (self._started(w) != claimed or not _is_stopped(w.pid))
        finally:
            if not was_stopped and not interfered and not gone:
                _signal_pid(w.pid, signal.SIGCONT)
        if gone:
            return None
        if interfered:
            log.warning("worker %d was resumed by someone else during a take-back; killing it", w.pid)
            self._kill_now(w, Kill(pid=w.pid, task_id=None, reason=ExitReason.CRASH, detail="it was resumed during a take-back"))
            return None
        w.revoked += len(tail)
        return self._book.take_back(w.pid, [t.id for t in tail])

    # --- commands ----------------------------------------------------------------

    def _execute(self, cmd: Command) -> None:
        if self._execute_shared(cmd):
            return
        book = self._book
        match cmd:
            case RetireWorker(pid=pid, reason=reason):
                w = self._workers.get(pid)
                if w is not None:
                    self._retire(w, reason)
            case KillWorker(kill=kill):
                w = self._workers.get(kill.pid)
                if w is not None and w.kill is None:
                    self._kill_now(w, kill)
            case Shutdown(cancel_futures=cancel, kill_running=kill_running, timeout_s=timeout_s):
                reserve = 0
                if cancel and (timeout_s is None or timeout_s > 0):  # (no time for it: a Ctrl-C)
                    # Like the stdlib, which lets the calls already in its call queue run: hand
                    # the workers what they have room for now, as had this thread run before the
                    # shutdown call, and keep one queued task for each worker still starting
                    # (it gets no task before it is ready); only the rest is cancelled
                    # (docs/failures.md, differences).
                    self._dispatch()
                    reserve = sum(1 for w in self._workers.values() if w.open and not w.ready and not book.held(w.pid))
                book.drain(cancel_futures=cancel, keep_queued=reserve)
                if kill_running:
                    self._kill_running("the pool shut down with kill_running=True")
                if timeout_s is not None:
                    at = time.monotonic() + timeout_s
                    if self._give_up_at is None or at < self._give_up_at:
                        self._give_up_at, self._give_up_after_s = at, timeout_s
            case Abort(task_ids=ids, reason=reason):
                self._abort(ids, reason)

    def _kill_running(self, why: str) -> None:
        """Kill every worker that holds a task (reason ``abort``): its started task fails
        with ``why``, never retried; its unstarted ones come back (cancelled if draining
        with ``cancel_futures``)."""
        for w in list(self._workers.values()):
            if self._book.held(w.pid) and w.kill is None:
                self._kill_now(w, Kill(pid=w.pid, task_id=None, reason=ExitReason.ABORT, detail=why))

    def _give_up(self) -> None:
        """The shutdown's timeout ran out: nothing is waited for any more (docs/core.md, Shutdown).

        What has not started is cancelled (as ``cancel_futures``), the workers running a task
        are killed (as ``kill_running``), and a task whose result is still being unpickled
        fails: a decoder thread cannot be stopped, so its result, if it ever comes, is dropped.
        What is left is the retirement of idle workers, itself bounded by _STOP_GRACE_S.
        """
        self._give_up_at = None
        why = f"shutdown(timeout={self._give_up_after_s:g}) ran out"
        book = self._book
        running = sum(1 for w in self._workers.values() if book.held(w.pid) and w.kill is None)
        book.drain(cancel_futures=True)
        self._kill_running(why)
        abandoned = book.abandon_decoding(
            lambda t: errors.SerializationError(
                f"the result of task {t.id} (fn={t.fn_name}) was still being unpickled when {why}", part="result", task_id=t.id
            )
        )
        log.warning("resilpool: %s; killed %d running workers, failed %d results still unpickling", why, running, abandoned)

    def _abort(self, ids: frozenset[int], reason: str) -> None:
        for pid, tasks in self._book.abort(ids, reason).items():
            w = self._workers.get(pid)
            if w is None:
                continue
            if self._take_back(w) is None:
                if _is_gone(w.pid):
                    continue  # it died meanwhile: the death path cancels its aborted tasks
                # Could not stop it to settle the race: kill it; its unstarted tasks come back
                # through the death path (aborted ones cancelled there, the others queued again).
                log.warning("worker %d could not be stopped to take back aborted tasks; killing it", w.pid)
                if w.kill is None:
                    self._kill_now(w, Kill(pid=w.pid, task_id=None, reason=ExitReason.ABORT, detail=reason))
                continue
            held = self._book.held(pid)
            if held and held[0].aborted is not None and held[0] in tasks and w.kill is None:
                self._kill_now(w, Kill(pid=w.pid, task_id=held[0].id, reason=ExitReason.ABORT, detail=reason))

    def _kill_now(self, w: _Worker, kill: Kill) -> None:
        task_id = kill.task_id
        if task_id is not None:
            # Only if it still runs that task: its first held task, claimed, not yet answered.
            # Stop the group first so the worker cannot move on while we look. (If the task
            # ended and its result is in the pipe, the death path reads it: it succeeds.)
            was_stopped = _is_stopped(w.pid)  # by someone else: leave it so
            _signal_group(w.pid, signal.SIGSTOP)
            _wait_stopped(w.pid)
            held = self._book.held(w.pid)
            if not (held and held[0].id == task_id and self._head_started(w)):
                if not was_stopped:
                    _signal_group(w.pid, signal.SIGCONT)
                return
        w.kill = kill
        self._views_dirty = True
        if w.retiring is None:
            self._vacated.append(w.pid)
        _kill_group(w.pid)

    def _maybe_finish(self) -> bool:
        book = self._book
        if len(book) and book.broken is None:
            return False
        if len(book) and book.held_count:  # broken: tasks still on live workers finish
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
        self._book.broken = err
        unstarted, interrupted = self.salvage()
        for t in (*unstarted, *interrupted):
            resolve(t.future, None, copy_error(err))

    def salvage(self) -> tuple[list[Task], list[Task]]:
        """After the manager thread failed: kill the workers, sort out the unresolved tasks.

        Returns ``(unstarted, interrupted)``: tasks that never started anywhere, and
        tasks that had started in a worker of this core. Runs on the failed manager thread.
        """
        with self._lock:
            self._accepting = False
            submitted = list(self._submitted)
            self._submitted.clear()
        book = self._book
        book.submit(submitted)
        interrupted: list[Task] = []
        for w in list(self._workers.values()):
            _kill_group(w.pid)
        for w in list(self._workers.values()):
            w.process.join(_JOIN_S)
            try:
                while data := os.read(w.result_fd, _READ_SIZE):
                    self._feed(w, data)
            except Exception:  # half-broken state: what could be read was read
                pass
            ran = book.lost_started(w.pid, self._n_started(w))
            running = ran[-1] if ran else None  # the last one claimed was running
            start_ns = self._slots[w.slot * P.SLOT_FIELDS + P.SLOT_START_NS]
            for t in ran:
                t.last_worker = (w.pid, max(0.0, time.monotonic() - start_ns / 1e9) if start_ns else 0.0)
                interrupted.append(t)
            self._counters.recycled[ExitReason.REBUILD.value] += 1
            self._emit(
                WorkerExited(
                    pid=w.pid,
                    exitcode=w.process.exitcode,
                    reason=ExitReason.REBUILD,
                    task_id=running.id if running else None,
                    detail=f"worker {w.pid} killed: the pool's core broke and was rebuilt",
                )
            )
            for c in (w.task_conn, w.result_conn):
                c.close()
        self._workers.clear()
        # Results read above, or already with a decoder: a bounded moment to be unpickled and
        # resolved here; one still unpickling after it counts as interrupted (book.salvage).
        self._decoder.close(_JOIN_S)
        self._settle_decoded()
        return book.salvage(interrupted)

    def _close(self) -> None:
        for w in list(self._workers.values()):
            _kill_group(w.pid)
            w.process.join(_JOIN_S)
        self._views = ()
        decoders_done = self._decoder.close(_JOIN_S)
        try:
            self._selector.close()
        except Exception:
            pass
        # A decoder still unpickling wakes this pipe when it ends: its fds must not be reused
        # before then; the last decoder closes them as it exits.
        if decoders_done:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        else:
            self._decoder.close_fds_when_done((self._wake_r, self._wake_w))
        self._lifeline_w.close()
        self._lifeline_r.close()
        self._reaper.close()
        self._slot_table.close()  # no worker starts any more; read_slot() now reads zeros


class _TaskTimeouts:
    """``core.task_timeouts.get(task_id)``: a task's own ``task_timeout``, for the monitor (any thread)."""

    __slots__ = ("_tasks",)

    def __init__(self, book: TaskBook[Any]) -> None:
        self._tasks = book.tasks

    def get(self, task_id: int, default: float | None = None) -> float | None:
        t = self._tasks.get(task_id)
        return t.timeout if t is not None and t.timeout is not None else default


# --- helpers -----------------------------------------------------------------------


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass
    except OSError:
        _signal_pid(pid, sig)


def _proc_state(pid: int) -> bytes | None:
    """The one-letter state of ``pid`` from /proc (None: gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rindex(b")")
    return data[end + 2 : end + 3]


def _proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks, from /proc (None: gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def _is_stopped(pid: int) -> bool:
    return _proc_state(pid) in (b"T", b"t")


def _is_gone(pid: int) -> bool:
    """Dead: a zombie not yet reaped, or no such process any more."""
    return _proc_state(pid) in (None, b"Z", b"X")


def _wait_stopped(pid: int, timeout_s: float = 0.2) -> bool:
    """Wait until a SIGSTOPped process has really stopped (signal delivery is asynchronous).

    True once it is stopped or gone. No event tells us this (the worker is the
    forkserver's child, not ours, so ``waitid(WSTOPPED)`` is not available): this polls
    its state in /proc, briefly and boundedly (the one poll of the manager thread;
    it runs only for a take-back or a kill of a given task). Without /proc: True.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        state = _proc_state(pid)
        if state is None or state in (b"T", b"t", b"Z", b"X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)


def _kill_group(pid: int, *, reaped: bool = False) -> None:
    """SIGKILL the worker's process group (it leads one), or the worker alone if it has none yet.

    With ``reaped`` the worker is already gone: only its group (grandchildren) is
    killed, never the pid itself, which may belong to another process by now.
    """
    if not reaped:
        kill_tree(pid)  # its group, and what setsid moved out of it (reaper.py)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if reaped:
            return
        _signal_pid(pid, signal.SIGKILL)

