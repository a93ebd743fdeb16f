"""Dask client side: :class:`DaskCore`, the executor core of a pool on a Dask cluster.

Runs in the pool's process.  The core thread ``resilpool-dask`` runs an asyncio loop
with an asynchronous ``distributed.Client``; it dispatches attempts (``client.map`` of
:func:`~.worker.run_attempt`), collects their outcomes, follows the workers through
the ledger's events and polls the ledger to enforce the limits.  The data flow is drawn
in :mod:`resilpool._core.dask`.

This is a transport: it keeps no task state machine of its own.  Every task table and
transition (queue, retry timers with ``due``/``last_error``, quarantine, PEP 678
notes, drain, cancel, salvage/adopt, counters) is the :class:`~resilpool._core.tasks.TaskBook`'s,
the same as the local core's.  This core reports to it (an attempt answered, a Dask
error, a worker that left with the attempts it had started) and carries out its
dispatch (``take`` for each attempt key it may put in flight).  Each in-flight
:class:`_Attempt` is the book's holder of exactly one task.

Ownership:

- The core thread alone reads and writes ``_book``, ``_inflight``, ``_doomed``,
  ``_workers``, ``_progress`` and the worker counters; the book resolves every future
  on it, so done-callbacks run on it (but a caller's ``Future.cancel()`` runs them on the
  caller's thread: ``_Tally.resolved`` is the one deque they append to).
- Other threads only append to ``_submitted``/``_commands`` (under ``_lock`` for
  ``_submitted``, which the core thread empties under it) and wake the loop; they read
  ``_views``, ``_slots``, ``samples`` (replaced whole, never mutated), ints, and the
  book's ``snapshot()``.
- The scheduler-side :class:`~.scheduler.AttemptLedger` is owned by the scheduler's event loop.
- Outcomes are unpickled off the core thread, as locally (:mod:`~resilpool._core.decode`):
  a body that names no global is decoded at once (``loads_plain``); any other result,
  and every error, goes to the decoder threads ``<pool>-dask-decoder`` while its task
  waits in the book's ``decoding`` place; a decoded job comes back through the
  decoder's done deque and a wake-up, and the core thread settles it. So a result
  whose ``__setstate__`` blocks, or raises ``SystemExit``, costs its own task only.

Invariants:

- The book's (``check_invariants()``): each unresolved task is in exactly one place;
  each future is resolved once.
- ``_inflight`` holds exactly the book's holders, by Dask key; an attempt leaves it
  (``_settle``) in the same step the book takes its task back (answered or lost).
- An attempt key is started at most once in the cluster (the ledger refuses a second).
- A task whose attempt never started is never failed by a worker's death: Dask
  reschedules the unstarted key by itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, Final

import distributed

from ... import errors
from ...events import Event, ExitReason, WorkerExited, WorkerStarted
from ...supervisor.breaker import blame
from ...supervisor.limits import Limits
from ...supervisor.monitor import Limiter, Running, describe_kill
from ...supervisor.policy import Kill, Retire
from ...supervisor.probes import DaskMetricsProbe, Sample
from .. import protocol as P
from ..commands import Abort, Adopt, Command, KillWorker, RetireWorker, Shutdown
from ..decode import DecodeJob, Decoder, loads_plain, settle_decoded
from ..executor import CoreConfig, WorkerView
from ..inbox import CoreInbox
from ..tasks import Task, TaskBook, WorkerCounters, copy_error, outcome, resolve
from . import CANCEL_BUDGET_S, LEDGER_NAME, PROGRESS_MAX_FUNCTIONS, PROGRESS_OTHER, RPC_TIMEOUT_S, TOPIC_PREFIX
from .scheduler import AttemptLedger
from .worker import AttemptRefused, ClaimFailed, InitializerFailed, run_attempt

__all__ = ["DaskCore"]

log = logging.getLogger("resilpool")

_SUCCEEDED: Final = int(P.Kind.SUCCEEDED)
_PIPELINE_S: Final = 0.05  # queue enough attempts per worker thread to cover this much work
_MAX_DEPTH: Final = 256  # attempts queued per worker thread at most (tiny tasks)


class _Tally:
    """The tasks of one function on this core, for the pool's progress on the scheduler.

    The counts are the core thread's; ``resolved`` is the one thing other threads touch:
    a future's done-callback (:meth:`on_done`) appends the outcome on whichever thread
    resolves it (the core thread, or a caller's cancelling it), and only the core thread
    pops (``deque`` appends and pops are atomic). Holds no reference to the core.
    """

    __slots__ = ("cancelled", "completed", "failed", "resolved", "submitted")

    def __init__(self) -> None:
        self.submitted = self.completed = self.failed = self.cancelled = 0
        self.resolved: deque[int] = deque()  # 0 completed, 1 failed, 2 cancelled

    def on_done(self, f: Future[Any]) -> None:
        self.resolved.append(2 if f.cancelled() else 0 if f.exception(timeout=0) is None else 1)

    def settle(self) -> None:
        """Core thread: count the outcomes appended since the last call."""
        resolved = self.resolved
        while resolved:
            outcome = resolved.popleft()
            if outcome == 0:
                self.completed += 1
            elif outcome == 1:
                self.failed += 1
            else:
                self.cancelled += 1


class _Progress:
    """Per function name: tasks submitted to this core and their outcomes. Owned by the core
    thread; each poll of the ledger carries :meth:`payload` (issue 15: the dashboard
    showed only attempts in flight, not the work queued in the pool)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._tallies: dict[str, _Tally] = {}

    def add(self, tasks: Iterable[Task]) -> None:
        """Tasks this core took over (submitted, or adopted from a broken core)."""
        tallies = self._tallies
        for t in tasks:
            name = t.fn_name
            tally = tallies.get(name)
            if tally is None:
                if len(tallies) >= PROGRESS_MAX_FUNCTIONS - 1:
                    name = PROGRESS_OTHER  # a bounded message, whatever the number of functions
                    tally = tallies.get(name)
                if tally is None:
                    tally = tallies[name] = _Tally()
            tally.submitted += 1
            t.future.add_done_callback(tally.on_done)

    def payload(self, inflight: Iterable[_Attempt]) -> dict[str, Any]:
        """``{"label", "functions": {name: [submitted, pending, running, completed, failed,
        cancelled]}}`` (:data:`PROGRESS_FIELDS`); running: attempts in flight on Dask."""
        running: dict[str, int] = {}
        for att in inflight:
            name = att.task.fn_name
            if name not in self._tallies:
                name = PROGRESS_OTHER
            running[name] = running.get(name, 0) + 1
        functions: dict[str, list[int]] = {}
        for name, tally in self._tallies.items():
            tally.settle()
            done = tally.completed + tally.failed + tally.cancelled
            run = min(running.get(name, 0), tally.submitted - done)
            functions[name] = [tally.submitted, max(0, tally.submitted - done - run), run, tally.completed, tally.failed, tally.cancelled]
        return {"label": self.label, "functions": functions}


class _Attempt:
    """One attempt of a task, in flight as Dask key ``key``: the TaskBook's holder of that task.

    Owned by the core thread.  Made before the book hands it a task (``take``), so
    ``key``/``task``/``future`` are set right after.
    """

    __slots__ = ("future", "key", "task", "watcher", "worker")
    task: Task  # set by _dispatch right after the book hands the attempt its task

    def __init__(self) -> None:
        self.key = ""
        self.future: Any = None
        self.watcher: asyncio.Task[None] | None = None
        self.worker: str | None = None  # where the ledger saw it start, once a poll said so

    def __repr__(self) -> str:
        return f"<attempt {self.key}>"


class _DWorker:
    """What the core knows of one Dask worker. Owned by the core thread."""

    __slots__ = ("address", "killing", "nthreads", "pid", "retire_asked", "retiring", "slot", "spawned_at")

    def __init__(self, address: str, pid: int | None, slot: int) -> None:
        self.address = address
        self.pid = pid or 0
        self.slot = slot
        self.spawned_at = time.monotonic()
        self.nthreads = 1
        self.retiring = False
        self.retire_asked = False
        self.killing = False


class DaskCore(CoreInbox):
    """The executor core on a Dask cluster; the same seams as the local ``Core``. See the module docstring."""

    def __init__(
        self,
        config: CoreConfig,
        *,
        backend: Any,
        address: str,
        security: Any,
        emit: Callable[[Event], None],
        on_broken: Callable[[Any, BaseException], None] | None,
        limits: Limits,
        init_body: bytes | None,
        connect_timeout_s: float,
    ) -> None:
        """``config`` is the pool's (its ``mp_context`` and ``soft_max_rss`` are the local
        core's: ``limits`` carries every limit here); ``init_body`` is the pickled
        ``(initializer, initargs, {})`` that :func:`~.worker.run_attempt` runs once per worker."""
        self.max_workers = config.max_workers
        self._backend = backend
        self._address = address
        self._security = security
        self._max_tasks = config.max_tasks_per_worker
        self._quarantine_after = config.quarantine_after
        self._emit = emit
        self._on_broken = on_broken
        self._limits = limits
        self._init_body = init_body  # the pickled (initializer, initargs, {}); run by run_attempt
        # Digits only: Dask names a key's task group by its leading words up to the first
        # word that is not all letters, so "<fn name>-<token>-..." groups by the function.
        self._token = f"{uuid.uuid4().int % 10**12:012d}"
        self._rng = random.Random()
        self._limiter = Limiter(limits, backend.monitor_interval_s, self._rng)
        self._probe = DaskMetricsProbe()

        # Shared with other threads (see the module docstring).
        super().__init__()
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._wake_event: asyncio.Event | None = None
        self._views: tuple[WorkerView, ...] = ()
        self._slots: dict[int, tuple[int, float | None, int]] = {}
        self.samples: dict[int, Sample] = {}
        self.peak_rss = 0
        self._counters = WorkerCounters()  # written by the core thread, read by any (snapshot)

        # Core-thread state.
        self._client: Any = None
        self._owner = ""
        # The task state machine: every task table and transition (retry, quarantine,
        # drain, salvage/adopt, counters). This core only reports to it and dispatches.
        self._book: TaskBook[_Attempt] = TaskBook(
            quarantine_after=config.quarantine_after,
            max_startup_failures=config.max_startup_failures,
            startup_window_s=config.startup_window_s,
            emit=emit,
            route_fresh=False,  # Dask picks the worker: a retry after an unblamed death goes to the front
        )
        self._inflight: dict[str, _Attempt] = {}  # Dask key -> attempt, exactly the book's holders
        self._ready: list[_Attempt] = []  # finished or erred in Dask, result not fetched yet
        self._collecting = False
        self._doomed: dict[str, Kill] = {}  # key -> the kill we asked for (its task fails with kill.to_error)
        self._workers: dict[str, _DWorker] = {}
        self._gone: deque[str] = deque(maxlen=1024)  # addresses of workers that left (dedupes poll and event)
        self._slot_seq = itertools.count()
        self._init_failed_on: set[str] = set()
        self._broken: BaseException | None = None  # CrashLoopError, or the error of a core that could not be rebuilt
        self._polling = False
        self._next_poll = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self._salvaged: tuple[list[Task], list[Task]] | None = None
        self._failing = False
        self._failed_over = False
        self._connect_timeout_s = connect_timeout_s
        self._give_up_at: float | None = None  # shutdown(timeout=): when to stop waiting
        self._give_up_after_s = 0.0
        # Results are unpickled on these threads, never on the core thread (decode.py):
        # a result's __setstate__ may run for seconds, or raise SystemExit.
        self._decoder = Decoder(f"{config.name}-dask", self._wake, max_threads=config.max_workers + 1)
        self._progress = _Progress(f"{config.name} pid {os.getpid()} on {socket.gethostname()}")

        self._connected = threading.Event()
        self._connect_error: BaseException | None = None
        self._thread = threading.Thread(target=self._owner_main, args=(self._run,), name=f"{config.name}-dask", daemon=True)
        self._thread.start()
        if not self._connected.wait(connect_timeout_s + 10.0):
            self._connect_error = TimeoutError(f"could not connect to the Dask scheduler at {address} within {connect_timeout_s}s")
        if self._connect_error is not None:
            with self._lock:
                self._accepting = False
            self._command(Shutdown(cancel_futures=True))
            self._thread.join(5.0)
            raise self._connect_error

    # --- called from any thread --------------------------------------------------

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    @property
    def serving(self) -> bool:
        """True while this core serves its pool: its thread runs and it is not handing its
        work over to a rebuilt core (a backend refuses a second pool meanwhile)."""
        return self._thread.is_alive() and not self._failing

    @property
    def client(self) -> Any:
        """The core's asynchronous ``distributed.Client`` (lives on the core thread)."""
        return self._client

    def worker_views(self) -> tuple[WorkerView, ...]:
        return self._views

    def read_slot(self, slot: int) -> tuple[int, float | None, int]:
        """``(task id or 0, started at (monotonic) or None, attempts started)`` as of the last poll."""
        return self._slots.get(slot, (0, None, 0))

    def salvage(self) -> tuple[list[Task], list[Task]]:
        """After the core thread failed: ``(unstarted, interrupted)`` tasks, for a new core.

        Sorted out on the failing core thread before the rebuild hook runs (it asks the
        ledger which in-flight attempts had started).
        """
        if self._salvaged is None:
            return [], []
        unstarted, interrupted = self._salvaged
        self._salvaged = ([], [])
        return [t for t in unstarted if not t.future.done()], [t for t in interrupted if not t.future.done()]

    def _wake(self) -> None:
        self._wake_pending = True
        loop, ev = self._aloop, self._wake_event
        if loop is None or ev is None:
            return  # not connected yet: the first iteration takes everything
        try:
            loop.call_soon_threadsafe(ev.set)
        except RuntimeError:
            pass  # the loop is closed: the core is gone

    # --- the core thread ---------------------------------------------------------------

    def _run(self) -> None:
        failed_over = False
        try:
            asyncio.run(self._main())
            failed_over = self._failed_over
        except BaseException as exc:  # connecting failed, or a bug outside the guarded loop
            if not self._connected.is_set():
                self._connect_error = exc
                self._connected.set()
                return
            log.error("resilpool Dask core failed", exc_info=True)
            self._fail_everything(exc)
        finally:
            self._views = ()
            if not failed_over and self._connect_error is None:
                self._backend._core_finished(self)

    async def _main(self) -> None:
        self._aloop = asyncio.get_running_loop()
        self._wake_event = asyncio.Event()
        make_client: Callable[..., Any] = distributed.Client
        client = make_client(
            self._address,
            asynchronous=True,
            security=self._security,
            set_as_default=False,
            name=f"resilpool-{self._token}",
            timeout=self._connect_timeout_s,
        )
        try:
            await client
        except BaseException:
            try:  # close it here, on its loop: left to its finalizer it would find the loop closed
                await asyncio.wait_for(client.close(), 5.0)
            except Exception:
                pass
            raise
        self._client = client
        try:
            client = self._client
            self._owner = client.id
            if hasattr(client, "register_plugin"):
                await client.register_plugin(AttemptLedger(), name=LEDGER_NAME)
            else:  # distributed < 2023.9
                await client.register_scheduler_plugin(AttemptLedger(), name=LEDGER_NAME, idempotent=True)
            client.subscribe_topic(TOPIC_PREFIX + self._owner, self._on_ledger_event)
            await client.scheduler.resilpool_register(owner=self._owner, max_tasks=self._max_tasks)
            await self._poll()  # the workers as they are now
            self._connected.set()
            try:
                await self._loop()
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.error("resilpool Dask core failed; rebuilding", exc_info=True, extra=outcome("rebuild"))
                await self._fail_over(exc)
        finally:
            for t in list(self._background):
                t.cancel()
            for att in self._inflight.values():
                if att.watcher is not None:
                    att.watcher.cancel()
            # Nothing is left decoding here (the loop waits for it; a fail-over salvaged it):
            # the decoders exit; one stuck in a result's __setstate__ is a daemon, left behind.
            self._decoder.close(1.0)
            try:
                client = self._client
                if client.status == "running":
                    try:
                        await asyncio.wait_for(client.scheduler.resilpool_unregister(owner=self._owner), 5.0)
                    except Exception:
                        pass
                    client.unsubscribe_topic(TOPIC_PREFIX + self._owner)
                await asyncio.wait_for(client.close(), 10.0)
            except Exception:
                log.warning("resilpool: closing the Dask client failed", exc_info=True)

    async def _loop(self) -> None:
        assert self._wake_event is not None
        wake = self._wake_event
        wake.set()  # take what was submitted while connecting
        while True:
            timeout = self._next_timeout()
            if not wake.is_set():
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    pass
            wake.clear()
            self._wake_pending = False  # before draining: a later submit wakes us again
            if taken := self._take_submitted():
                self._progress.add(taken)
                if self._broken is not None:
                    self._book.fail_unassigned(self._broken)  # broken meanwhile: nothing new runs
            while self._commands:
                self._execute(self._commands.popleft())
            if self._decoder.has_done():
                settle_decoded(self._book, self._decoder)
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                self._give_up()
            self._book.fire_timers()
            now = time.monotonic()
            if now >= self._next_poll and not self._polling:
                self._spawn(self._supervise())
            self._dispatch()
            if self._book.draining and self._finished():
                return

    def _kick(self) -> None:
        if self._wake_event is not None:
            self._wake_event.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("resilpool Dask core: background step failed", exc_info=task.exception())

    def _next_timeout(self) -> float:
        deadline = self._next_poll
        due = self._book.next_due()
        if due is not None:
            deadline = min(deadline, due)
        if self._give_up_at is not None:
            deadline = min(deadline, self._give_up_at)
        return max(0.0, min(deadline - time.monotonic(), 1.0))

    # --- dispatch ------------------------------------------------------------------

    def _cap(self) -> int:
        """Attempts in flight at most: one running and enough queued per worker thread.

        The scheduler hands a worker its next attempt as soon as one ends, without a
        round trip through this core; attempts shorter than ``_PIPELINE_S`` are queued
        deep enough to cover that much work (Dask spends a few ms per task).  The rest
        wait in the book, where they can still be cancelled.
        """
        threads = sum(w.nthreads for w in self._workers.values() if not w.retiring) or self.max_workers
        ewma = self._book.durations.ewma_s
        depth = 1 if ewma is None or ewma >= _PIPELINE_S else min(_MAX_DEPTH, 1 + int(_PIPELINE_S / max(ewma, 1e-6)))
        return threads * (1 + depth)

    def _dispatch(self) -> None:
        book = self._book
        cap = self._cap()
        room = cap - book.held_count
        if room < cap // 4 and book.held_count:
            return  # refill in batches: one graph update for several attempts, not one each
        batch: list[_Attempt] = []
        while len(batch) < room:
            att = _Attempt()
            task = book.take(att)  # None: nothing queued, paused, or broken
            if task is None:
                break
            att.task = task
            att.key = f"{_key_name(task.fn_name)}-{self._token}-{task.id}-{task.attempt}"
            batch.append(att)
        if not batch:
            return
        kwargs = {"owner": self._owner, "init": self._init_body, "init_token": self._token, "max_tasks": self._max_tasks}
        client = self._client
        if len(batch) == 1:
            a = batch[0]
            futures = [client.submit(run_attempt, a.key, a.task.body, key=a.key, pure=False, **kwargs)]
        else:
            keys = [a.key for a in batch]
            futures = client.map(run_attempt, keys, [a.task.body for a in batch], key=keys, pure=False, **kwargs)
        for att, fut in zip(batch, futures):
            att.future = fut
            self._inflight[att.key] = att
            att.watcher = asyncio.ensure_future(self._watch(att))

    async def _watch(self, att: _Attempt) -> None:
        fut = att.future
        # Wait for the key to finish or err, as distributed's own done-callbacks do; the
        # results are then fetched in batches (one gather for all that finished meanwhile).
        while fut.status == "pending":
            await fut._state.wait()
        if self._inflight.get(att.key) is not att:
            _release(att)  # settled by its pushed outcome: the key just ended
            return
        if self._failing:
            return
        self._ready.append(att)
        if not self._collecting:
            self._collecting = True
            self._spawn(self._collect())

    async def _collect(self) -> None:
        try:
            while self._ready and not self._failing:
                batch = [a for a in self._ready if self._inflight.get(a.key) is a]
                self._ready.clear()
                done = [a for a in batch if a.future.status == "finished"]
                values: dict[str, Any] = {}
                if done:
                    try:
                        values = await self._client.gather({a.key: a.future for a in done}, errors="skip")
                    except Exception:
                        log.debug("resilpool: batched gather failed; fetching one by one", exc_info=True)
                for a in batch:
                    if self._failing or self._inflight.get(a.key) is not a:
                        continue  # settled meanwhile (a worker's departure), or the core is failing over
                    value = values.get(a.key)
                    if value is not None:
                        self._on_result(a, value)
                        continue
                    try:  # erred, cancelled, or its result was lost: the future says which
                        value = await a.future.result()
                    except asyncio.CancelledError:
                        raise
                    except BaseException as exc:
                        if not self._failing and self._inflight.get(a.key) is a:
                            self._on_dask_error(a, exc)
                    else:
                        if not self._failing and self._inflight.get(a.key) is a:
                            self._on_result(a, value)
                self._kick()
        finally:
            self._collecting = False

    def _settle(self, att: _Attempt, *, key_running: bool = False) -> Kill | None:
        """Take an attempt out of flight and let Dask forget its key; returns the kill we
        had asked for it, if any (its task's error).

        With ``key_running`` (its outcome was pushed ahead of the key's end) the key is
        left to finish: its watcher releases it then, so Dask never cancels a key its
        worker is completing.
        """
        del self._inflight[att.key]
        kill = self._doomed.pop(att.key, None)
        if not key_running:
            if att.watcher is not None and att.watcher is not asyncio.current_task():
                att.watcher.cancel()
            _release(att)
        return kill

    # --- outcomes ------------------------------------------------------------------

    def _on_result(self, att: _Attempt, value: Any, *, pushed: bool = False) -> None:
        self._settle(att, key_running=pushed)
        book = self._book
        try:
            kind, elapsed, body, pid = value
        except (TypeError, ValueError):
            task = book.answered(att, att.task.id, in_order=False)
            book.attempt_failed(task, errors.ResilpoolError(f"unexpected result from a Dask worker: {value!r:.80}"), pid=None, elapsed=0.0, died=False, blamed=False)
            return
        task = book.answered(att, att.task.id, in_order=False)
        book.durations.observe(elapsed)
        if body is None:  # pushed ahead, but the push never came (the stream closed under it)
            lost = errors.ResilpoolError(f"the outcome of task {task.id} (fn={task.fn_name}) was lost on its way from Dask worker pid {pid}")
            book.attempt_failed(task, lost, pid=pid, elapsed=elapsed, died=False, blamed=False)
            return
        if kind == _SUCCEEDED:
            plain, result = loads_plain(body)  # no user code can run: done here, at once
            if plain:
                book.succeeded(task, result)
                return
        # Anything else (a result naming a class, every error) runs user code to unpickle.
        book.decoding(task)
        self._decoder.put([DecodeJob(task, pid or 0, kind == _SUCCEEDED, elapsed, body)])

    def _lost(self, att: _Attempt, *, started: bool) -> Task:
        """The attempt's task leaves the book's holder ``att``; with ``started``, in hand."""
        task = self._book.lost(att, started=started)
        if started and task is None:  # pragma: no cover - _inflight and the book's holders are one set
            raise RuntimeError(f"attempt {att.key} held no task")
        return task  # type: ignore[return-value]

    def _on_dask_error(self, att: _Attempt, exc: BaseException) -> None:
        book = self._book
        kill = self._settle(att)
        if isinstance(exc, AttemptRefused):
            if exc.why == "cancelled":
                self._book.lost(att, started=False)  # we cancelled it before any start: queued again (or dropped if aborted)
                return
            task = self._lost(att, started=True)
            err = _death_error(task, kill, exc.worker, exc.pid, exc.elapsed)
            book.attempt_failed(task, err, pid=exc.pid, elapsed=exc.elapsed, died=True, blamed=_blamed(task, kill, exc.before))
            return
        if isinstance(exc, InitializerFailed):
            book.lost(att, started=False)  # nothing of the task ran: not an attempt
            if exc.worker not in self._init_failed_on:
                self._init_failed_on.add(exc.worker)
                cause = P.rebuild_error(exc.body)
                log.error("Dask worker %s: initializer failed: %s", exc.worker, cause, exc_info=cause, extra=outcome("startup"))
                self._spawn(self._ledger_kill(exc.worker, None, ExitReason.STARTUP))
                if book.startup_failed(cause):
                    self._broken = book.broken
                    with self._lock:
                        self._accepting = False
            return
        task = self._lost(att, started=True)
        if _is_killed_worker(exc):
            # Dask gave up on the key after allowed-failures + 1 worker deaths, none of which
            # we saw start it: the task kills workers before it can even start. Quarantine it.
            deaths = _killed_worker_deaths(exc)
            task.crashes = max(task.crashes, deaths - 1, self._quarantine_after - 1)
            killer = _crash_error(task, None, None, f"Dask gave up on it after {deaths} worker deaths (KilledWorker)")
            killer.__cause__ = exc
            book.attempt_failed(task, killer, pid=None, elapsed=0.0, died=True, blamed=True)
            return
        if isinstance(exc, ClaimFailed):
            unstarted = errors.WorkerCrashedError(f"task {task.id} (fn={task.fn_name}) could not start: {exc}", task_id=task.id, fn_name=task.fn_name)
            unstarted.__cause__ = exc
            book.attempt_failed(task, unstarted, pid=None, elapsed=0.0, died=False, blamed=False)
            return
        # Cancelled by the scheduler (a lost client connection), or another infrastructure
        # error: whether it started is unknown, so count it as a death.
        err = _crash_error(task, None, None, f"the Dask cluster lost it: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        book.attempt_failed(task, err, pid=None, elapsed=0.0, died=True, blamed=False)

    def _on_ledger_event(self, event: Any) -> None:
        # Runs on the core thread (the client's loop is ours).
        if self._failing:
            return
        try:
            _, msg = event
            op = msg.get("op")
            if op == "outcome":
                att = self._inflight.get(msg["key"])
                if att is not None:  # else settled already (its worker left, or a rebuild)
                    self._on_result(att, (msg["kind"], msg["elapsed"], msg["body"], msg["pid"]), pushed=True)
            elif op == "removed":
                self._on_worker_removed(msg)
            elif op == "added":
                self._on_worker_added(msg["worker"], msg.get("pid"), msg.get("replaces"))
        except Exception:
            log.error("resilpool: bad ledger event %r", event, exc_info=True)
        self._kick()

    def _on_worker_added(self, address: str, pid: int | None, replaces: int | None) -> None:
        if address in self._workers or address in self._gone:
            return
        w = _DWorker(address, pid, next(self._slot_seq))
        self._workers[address] = w
        self._counters.started += 1
        self._publish_views()
        self._emit(WorkerStarted(pid=w.pid, replaces=replaces))

    def _on_worker_removed(self, msg: dict[str, Any]) -> None:
        address = msg["worker"]
        w = self._workers.pop(address, None)
        pid = msg.get("pid") or (w.pid if w else None)
        mark = msg.get("reason")
        try:
            reason = ExitReason(mark) if mark else ExitReason.CRASH
        except ValueError:
            reason = ExitReason.CRASH
        lost = [(att, before, elapsed) for key, before, elapsed in msg.get("lost", []) if (att := self._inflight.get(key)) is not None]
        if w is not None or address not in self._gone:  # else a poll saw it gone first: only its attempts are left
            self._gone.append(address)
            detail = f"Dask worker {address} (pid {pid}) left the cluster"
            first = lost[0][0].task if lost else None
            if first is not None:
                detail += f" while running task {first.id} (fn={first.fn_name})"
            if reason in (ExitReason.CRASH, ExitReason.STARTUP):
                self._counters.crashes += 1
            self._counters.recycled[reason.value] += 1
            log.log(logging.INFO if reason.is_recycle else logging.WARNING, "%s (%s)", detail, reason.value)
            self._emit(WorkerExited(pid=pid or 0, exitcode=None, reason=reason, task_id=first.id if first is not None else None, detail=detail))
            self._publish_views()
        for att, before, elapsed in lost:
            kill = self._settle(att)
            task = self._lost(att, started=True)
            err = _death_error(task, kill, address, pid, elapsed)
            self._book.attempt_failed(task, err, pid=pid, elapsed=elapsed, died=True, blamed=_blamed(task, kill, before))

    # --- commands ------------------------------------------------------------------

    def _execute(self, cmd: Command) -> None:
        if isinstance(cmd, Adopt):
            self._progress.add((*cmd.unstarted, *cmd.interrupted))  # a rebuilt core's work: this core's now
        if self._execute_shared(cmd):
            return
        book = self._book
        match cmd:
            case Shutdown(cancel_futures=cancel, kill_running=kill_running, timeout_s=timeout_s):
                book.drain(cancel_futures=cancel)
                if kill_running:
                    self._spawn(self._kill_started(list(self._inflight.values()), "the pool shut down with kill_running=True", cancel_unstarted=False))
                if timeout_s is not None:
                    at = time.monotonic() + timeout_s
                    if self._give_up_at is None or at < self._give_up_at:
                        self._give_up_at, self._give_up_after_s = at, timeout_s
            case Abort(task_ids=ids, reason=reason):
                attempts = list(book.abort(ids, reason))  # marks them: a failure is never retried
                if attempts:
                    self._spawn(self._kill_started(attempts, reason, cancel_unstarted=True))
            case RetireWorker(pid=pid, reason=reason):
                w = self._worker_by_pid(pid)
                if w is not None:
                    self._retire(w, reason)
            case KillWorker(kill=kill):
                w = self._worker_by_pid(kill.pid)
                if w is not None:
                    key = None
                    if kill.task_id is not None:
                        key = next((a.key for a in self._inflight.values() if a.task.id == kill.task_id), None)
                        if key is None:
                            return  # that task is no longer in flight: kill nothing
                    self._kill(w, key, kill)
            case _:
                log.error("resilpool Dask core: unknown command %r", cmd)

    def _give_up(self) -> None:
        """The shutdown's timeout ran out, as locally (docs/core.md, Shutdown): what has not
        started is cancelled, the workers running a task are killed, and a task whose result
        is still being unpickled fails (a decoder thread cannot be stopped)."""
        self._give_up_at = None
        why = f"shutdown(timeout={self._give_up_after_s:g}) ran out"
        book = self._book
        book.drain(cancel_futures=True)
        self._spawn(self._kill_started(list(self._inflight.values()), why, cancel_unstarted=False))
        abandoned = book.abandon_decoding(
            lambda t: errors.SerializationError(
                f"the result of task {t.id} (fn={t.fn_name}) was still being unpickled when {why}", part="result", task_id=t.id
            )
        )
        log.warning("resilpool: %s; killing %d running Dask attempts, failed %d results still unpickling", why, len(self._inflight), abandoned)

    def _worker_by_pid(self, pid: int) -> _DWorker | None:
        return next((w for w in self._workers.values() if w.pid == pid), None)

    def _finished(self) -> bool:
        if len(self._book) and self._broken is None:
            return False
        return not self._inflight and not self._book.held_count  # (held_count: decoding too)

    # --- supervision: the limits, from the scheduler's view of the workers --------------

    async def _supervise(self) -> None:
        self._polling = True
        try:
            await self._poll()
        finally:
            self._polling = False
            self._next_poll = time.monotonic() + self._backend.monitor_interval_s

    async def _poll(self) -> None:
        known = set(self._workers)  # a worker added by an event while we wait may be newer than the answer
        progress = self._progress.payload(self._inflight.values())
        st = await asyncio.wait_for(self._client.scheduler.resilpool_status(owner=self._owner, progress=progress), RPC_TIMEOUT_S)
        if self._failing:
            return
        now = time.monotonic()
        samples: dict[int, Sample] = {}
        slots: dict[int, tuple[int, float | None, int]] = {}
        seen = set()
        for info in st["workers"]:
            address = info["address"]
            seen.add(address)
            w = self._workers.get(address)
            if w is None:
                self._on_worker_added(address, info.get("pid"), info.get("replaces"))
                w = self._workers.get(address)
                if w is None:
                    continue  # it left already (its removal event beat this answer)
            w.pid = info.get("pid") or w.pid
            w.nthreads = info.get("nthreads") or 1
            w.retiring = bool(info.get("retiring")) or info.get("status") not in ("running", "paused")
            reading = self._probe.measure(address, now, info)
            if reading.rss > self.peak_rss:
                self.peak_rss = reading.rss
            running = [(a, float(e)) for key, e in info.get("running", []) if (a := self._inflight.get(key)) is not None]
            for a, _ in running:
                a.worker = address
            if running:
                a0, e0 = max(running, key=lambda r: r[1])
                slots[w.slot] = (a0.task.id, now - e0, int(info.get("starts", 0)))
            else:
                slots[w.slot] = (0, None, int(info.get("starts", 0)))
            cpu_percent, action = self._limiter.judge(
                address,
                now,
                reading,
                pid=w.pid,
                spawned_at=w.spawned_at,
                running=[Running(task_id=a.task.id, started=now - e, timeout=a.task.timeout) for a, e in running if a.key not in self._doomed],
                retiring=w.retiring or w.retire_asked or w.killing,
            )
            samples[w.pid] = Sample(rss=reading.rss, cpu_percent=cpu_percent)
            if w.killing or action is None:
                continue
            if isinstance(action, Retire):
                self._retire(w, action.reason)
            else:
                kill = action
                key = None if kill.task_id is None else next((a.key for a, _ in running if a.task.id == kill.task_id), None)
                log.warning("%s", describe_kill(kill, f"Dask worker {address} (pid {w.pid})"))
                self._kill(w, key, kill)
        leaving = set(st.get("leaving", ()))  # their removal event is on its way
        departed = st.get("departed", {})
        for address in [a for a in self._workers if a in known and a not in seen and a not in leaving]:
            # Gone, its removal event not here yet (or lost: before we subscribed). The
            # ledger names why it left; the event, when it comes, settles its attempts.
            self._on_worker_removed({"worker": address, "pid": self._workers[address].pid, "reason": departed.get(address), "lost": []})
        for address in [a for a in self._workers if a not in seen]:
            self._probe.forget(address)
        self._limiter.keep_only(seen)
        self.samples = samples
        self._slots = slots
        self._backend._telemetry.update(samples, self.peak_rss)
        self._publish_views()

    def _retire(self, w: _DWorker, reason: ExitReason) -> None:
        if w.retire_asked or w.killing:
            return
        w.retire_asked = True
        log.info("retiring Dask worker %s after its current task (%s)", w.address, reason.value)
        self._spawn(self._rpc("resilpool_retire", worker=w.address, reason=reason.value))

    def _kill(self, w: _DWorker, key: str | None, kill: Kill) -> None:
        """Kill worker ``w`` (with ``key``: only if that attempt still runs there); the tasks
        the kill costs fail with ``kill.to_error``."""
        if key is None:
            w.killing = True
            for att in self._inflight.values():
                if att.worker == w.address:
                    self._doomed[att.key] = kill
        else:
            self._doomed[key] = kill
        log.info("killing Dask worker %s (pid %d): %s", w.address, w.pid, kill.reason.value)
        self._spawn(self._ledger_kill(w.address, key, kill.reason))

    async def _kill_started(self, attempts: list[_Attempt], why: str, *, cancel_unstarted: bool) -> None:
        """Kill the workers of those attempts that started (their tasks fail with a
        WorkerCrashedError naming ``why``, never retried); with ``cancel_unstarted`` the
        others are cancelled before they start (their aborted tasks are cancelled)."""
        keys = [a.key for a in attempts if self._inflight.get(a.key) is a]
        if not keys:
            return
        cancelled: set[str] = set()
        if cancel_unstarted:
            cancelled = await self._cancel_unstarted(keys)
        for key in keys:
            att = self._inflight.get(key)
            if att is None or self._failing:
                continue  # settled meanwhile
            if key in cancelled:
                self._settle(att)
                self._book.lost(att, started=False)  # aborted: cancelled, never run
                continue
            w = self._workers.get(att.worker) if att.worker is not None else None
            kill = Kill(pid=w.pid if w is not None else 0, task_id=att.task.id, reason=ExitReason.ABORT, detail=why)
            self._doomed[key] = kill
            log.warning("killing the Dask worker running task %d (fn=%s): %s", att.task.id, att.task.fn_name, why)
            answer = await self._rpc("resilpool_kill", worker=None, key=key, reason=ExitReason.ABORT.value)
            if answer in ("finished", "gone"):
                self._doomed.pop(key, None)  # it had not started (Dask reschedules it) or it ended: kill nothing

    async def _ledger_kill(self, address: str, key: str | None, reason: ExitReason) -> None:
        answer = await self._rpc("resilpool_kill", worker=address, key=key, reason=reason.value)
        if answer == "finished" and key is not None:
            self._doomed.pop(key, None)  # it ended before the kill: nothing was killed for it

    async def _rpc(self, op: str, *, timeout: float = RPC_TIMEOUT_S, **kwargs: Any) -> Any:
        return await asyncio.wait_for(getattr(self._client.scheduler, op)(**kwargs), timeout)

    async def _cancel_unstarted(self, keys: list[str]) -> set[str]:
        """The ledger cancels those of ``keys`` that have not started; returns them. It
        answers within CANCEL_BUDGET_S: wait that long, and a request's time besides."""
        return set(await self._rpc("resilpool_cancel", timeout=CANCEL_BUDGET_S + RPC_TIMEOUT_S, keys=keys, owner=self._owner))

    def _publish_views(self) -> None:
        self._views = tuple(
            WorkerView(pid=w.pid, slot=w.slot, spawned_at=w.spawned_at, ready=True, retiring=w.retiring or w.retire_asked or w.killing)
            for w in self._workers.values()
        )

    # --- break and salvage -------------------------------------------------------------

    async def _fail_over(self, exc: BaseException) -> None:
        self._failing = True  # from here on no outcome or event touches the tables
        book = self._book
        with self._lock:
            self._accepting = False
            submitted = list(self._submitted)
            self._submitted.clear()
        book.submit(submitted)
        keys = list(self._inflight)
        cancelled: set[str] = set()
        if keys:
            try:
                cancelled = await self._cancel_unstarted(keys)
            except Exception:
                log.error("resilpool: could not ask the ledger which attempts started", exc_info=True)
        interrupted: list[Task] = []
        for key in keys:
            att = self._inflight[key]
            self._settle(att)
            task = book.lost(att, started=key not in cancelled)  # unstarted: back to the queue
            if task is not None:
                w = self._workers.get(att.worker) if att.worker is not None else None
                task.last_worker = (w.pid if w is not None else None, 0.0)
                interrupted.append(task)
        self._salvaged = book.salvage(interrupted)
        if self._on_broken is not None:
            try:
                self._on_broken(self, exc)
                self._failed_over = True  # the new core has the work (and the cluster)
                return
            except BaseException:
                log.error("resilpool could not rebuild its core", exc_info=True)
        self._fail_everything(exc)

    def _fail_everything(self, exc: BaseException) -> None:
        err = errors.WorkerCrashedError(f"the pool's core failed and could not be rebuilt: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        self._broken = err
        with self._lock:
            self._accepting = False
            submitted = list(self._submitted)
            self._submitted.clear()
        tasks = [*self._book.tasks.values(), *submitted]
        if self._salvaged is not None:
            tasks += [*self._salvaged[0], *self._salvaged[1]]
        for t in tasks:
            resolve(t.future, None, copy_error(err))


# --- helpers -----------------------------------------------------------------------


def _release(att: _Attempt) -> None:
    try:
        att.future.release()
    except Exception:
        pass  # the client is closing: nothing to release


def _blamed(task: Task, kill: Kill | None, before: int) -> bool:
    """Does this death count toward the task's quarantine (``before``: attempts its worker
    had started before it)?

    As locally: yes if the task was the first its worker started.  Dask chooses the
    worker, so a retry is not routed to a fresh one after an unblamed death; instead
    the death that follows an unblamed one is blamed (``needs_fresh`` marks the task),
    which is where the local routing leads too.  A kill we asked for counts only for
    memory (as a crash); a timeout or stall kill never does.
    """
    if kill is not None and kill.reason is not ExitReason.MEMORY:
        return False
    return blame(before) or task.needs_fresh


def _death_error(task: Task, kill: Kill | None, worker: str | None, pid: int | None, elapsed: float) -> BaseException:
    """The error of a task whose worker died under it: the kill's, if we asked for one
    (an abort's kill also marks the task aborted, so it is never retried)."""
    if kill is not None:
        if kill.reason is ExitReason.ABORT and task.aborted is None:
            task.aborted = kill.detail or "aborted"  # killed on purpose: never retried
        if not kill.pid and pid:
            kill = dataclasses.replace(kill, pid=pid)  # killed by key before a poll told us where it ran
        return kill.to_error(task.id, task.fn_name, elapsed, address=worker)
    return _crash_error(task, worker, pid)


def _crash_error(task: Task, worker: str | None, pid: int | None, how: str | None = None) -> errors.WorkerCrashedError:
    where = f"Dask worker {worker} (pid {pid})" if worker else "its Dask worker"
    msg = f"{where} died while running task {task.id} (fn={task.fn_name})" if how is None else f"task {task.id} (fn={task.fn_name}): {how}"
    err = errors.WorkerCrashedError(msg, pid=pid, exitcode=None, task_id=task.id, fn_name=task.fn_name)
    err.address = worker  # type: ignore[attr-defined]  # survives pickling (__dict__ is carried)
    return err


def _is_killed_worker(exc: BaseException) -> bool:
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover
        return type(exc).__name__ == "KilledWorker"
    return isinstance(exc, KilledWorker)


def _killed_worker_deaths(exc: BaseException) -> int:
    """Worker deaths behind a KilledWorker: its ``allowed_failures`` + 1."""
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    allowed = args[2] if len(args) > 2 else None
    return allowed + 1 if isinstance(allowed, int) else 1


def _key_name(fn_name: str) -> str:
    """The function's name as the first word of a Dask key (what the dashboard shows)."""
    return fn_name.replace("-", "_") or "resilpool"
