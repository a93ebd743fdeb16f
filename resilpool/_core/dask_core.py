"""The Dask core: the pool's tasks run as Dask tasks on a ``distributed`` cluster.

Used through :class:`resilpool.dask.DaskBackend`; this module imports ``distributed``
at import time and is imported only when a backend makes a core.

Data flow::

    caller threads          core thread "resilpool-dask" (an asyncio loop; owns every table)     scheduler                    Dask worker (1 thread)
    --------------          -------------------------------------------------------------       ---------                    ----------------------
    submit() ──pickle──> _submitted ──┐ call_soon_threadsafe(wake)
    shutdown(), seams ──> _commands ──┘
                                      v
                 _pending (FIFO, retries at the front), _timers (retry backoff)
                                      │ dispatch: at most cap() attempts in flight
                                      v
                 client.map(run_attempt, keys, bodies) ── update-graph ──> queue, place ──> run_attempt(key, body):
                                                                          AttemptLedger <── 1. claim RPC: first start of
                                                                          (plugin)     ──>    this key? else refuse
                 watchers + one batched gather <── (kind, elapsed, bytes, pid) ─────────── 2. loads body, fn(*args)
                 futures resolved here (done-callbacks run on this thread)                   3. pickled result or
                                                                                                error payload
                 supervise() every interval ── resilpool_status ──> ledger: running attempts,
                   policy.decide() per worker   <──────────────────  worker pid, memory, CPU
                                            ── resilpool_retire ──> closing_gracefully, restart when idle
                                            ── resilpool_kill ────> nanny SIGKILLs the worker (nanny restarts it)
                 topic "resilpool-<client id>" <── added / removed + lost attempts ── ledger hooks
                 events ──> the pool's event thread ──> logging, listeners

One Dask key is one *attempt* of a task (``resilpool-<core>-<task id>-<attempt>``).
The ledger, a scheduler plugin, records the start of each attempt before the task's
call is unpickled (the start acknowledgement, as the local slot is); a second start
of the same key (Dask reruns a task whose worker died) is refused, so an attempt runs
at most once, and a retry is always a new attempt under a new key, scheduled by this
core's retry policy and timers.  Dask's own ``retries`` stay off.

Ownership:

- The core thread alone reads and writes ``_tasks``, ``_pending``, ``_timers``,
  ``_inflight``, ``_doomed``, ``_workers`` and the counters; it resolves every future,
  so done-callbacks run on it.
- Other threads only append to ``_submitted``/``_commands`` (under ``_lock`` for
  ``_submitted``) and wake the loop; they read ``_views``, ``_slots``, ``samples``,
  which the core thread replaces whole and never mutates.
- The scheduler-side :class:`AttemptLedger` is owned by the scheduler's event loop.

Invariants (asserted in tests):

- Each unresolved task is in exactly one place: ``_pending``, ``_timers``, or
  ``_inflight`` (under the key of its current attempt).
- An attempt key is started at most once in the cluster (the ledger refuses a second).
- A task whose attempt never started is never failed by a worker's death: Dask
  reschedules the unstarted key by itself.
- Each future is resolved exactly once, by the core thread.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import pickle
import random
import signal
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import distributed
from distributed.diagnostics.plugin import SchedulerPlugin

from .. import errors
from ..events import (
    CrashLoopTripped,
    DispatchPaused,
    DispatchResumed,
    Event,
    ExitReason,
    TaskQuarantined,
    TaskRetried,
    WorkerExited,
    WorkerStarted,
)
from ..supervisor.breaker import CrashLoopBreaker, blame
from ..supervisor.limits import Limits
from ..supervisor.policy import Kill, Retire, WorkerSample, decide, lifetime_with_jitter
from . import protocol as P
from . import worker as worker_module
from .executor import CoreGone, Task, WorkerView, _copy_error, _resolve, _summary

__all__ = ["AttemptLedger", "AttemptRefused", "DaskCore", "InitializerFailed", "run_attempt"]

log = logging.getLogger("resilpool")

LEDGER_NAME: Final = "resilpool-ledger"
TOPIC_PREFIX: Final = "resilpool-"
_MAX_DEPTH: Final = 256  # attempts in flight per worker thread at most (tiny tasks)
_DEEP_BELOW_S: Final = 0.005  # more than one queued attempt per thread only for tasks this short
_PIPELINE_S: Final = 0.02  # ... enough of them to cover this much work (Dask costs ~1-3 ms a task)
_RPC_TIMEOUT_S: Final = 10.0
_SUCCEEDED: Final = int(P.Kind.SUCCEEDED)
_FAILED: Final = int(P.Kind.FAILED)

# Ledger record states.
_STARTED: Final = 1  # claimed by a worker; its call may be running
_DONE: Final = 2  # ended (memory or erred), or its worker left; the result may still be held
_CANCELLED: Final = 3  # cancelled before any start: a claim is refused
_GONE: Final = 4  # forgotten by the scheduler; kept a while as a tombstone so a late claim is still refused
_TOMBSTONE_S: Final = 600.0


# --- worker side ----------------------------------------------------------------


class AttemptRefused(Exception):
    """Raised in a Dask worker when an attempt key may not start.

    ``why`` is ``"started"`` (a second start: the first ran on ``worker``, pid ``pid``,
    after ``before`` other attempts there) or ``"cancelled"`` (cancelled before it started).
    """

    def __init__(self, key: str, why: str, worker: str | None = None, pid: int | None = None, before: int = 0, elapsed: float = 0.0) -> None:
        super().__init__(key, why, worker, pid, before, elapsed)
        self.key = key
        self.why = why
        self.worker = worker
        self.pid = pid
        self.before = before
        self.elapsed = elapsed

    def __str__(self) -> str:
        if self.why == "cancelled":
            return f"attempt {self.key} was cancelled before it started"
        return f"refused second start of {self.key}: it started on {self.worker} (pid {self.pid})"


class InitializerFailed(Exception):
    """Raised in a Dask worker whose pool initializer raised; ``body`` is an error payload."""

    def __init__(self, worker: str, pid: int, body: bytes) -> None:
        super().__init__(worker, pid, body)
        self.worker = worker
        self.pid = pid
        self.body = body

    def __str__(self) -> str:
        return f"the initializer failed on {self.worker} (pid {self.pid})"


class ClaimFailed(Exception):
    """Raised in a Dask worker that could not reach the ledger; the call did not run."""


_INITIALIZED: set[str] = set()  # init tokens whose initializer ran in this worker process
_INIT_FAILED: dict[str, bytes] = {}


def run_attempt(key: str, body: bytes, *, owner: str, init: bytes | None = None, init_token: str = "") -> tuple[int, float, bytes, int]:
    """The Dask task of one attempt: claim its start, then run the call; runs in a Dask worker.

    Returns ``(kind, elapsed_s, body, pid)``: kind SUCCEEDED with the pickled result, or
    FAILED with an error payload, as a local worker's result frame.
    """
    worker = distributed.get_worker()
    address = worker.address
    pid = os.getpid()
    if init is not None and init_token not in _INITIALIZED:
        failed = _INIT_FAILED.get(init_token)
        if failed is None:
            try:
                fn, args, kwargs = pickle.loads(init)
                fn(*args, **kwargs)
            except BaseException as exc:
                failed = _INIT_FAILED[init_token] = P.error_payload(exc, "initializer failed:")
            else:
                _INITIALIZED.add(init_token)
        if failed is not None:
            raise InitializerFailed(address, pid, failed)
    try:
        reply = distributed.utils.sync(
            worker.loop, worker.scheduler.resilpool_claim, key=key, owner=owner, worker=address, pid=pid, callback_timeout=_RPC_TIMEOUT_S
        )
    except Exception as exc:
        raise ClaimFailed(f"could not record the start of {key} on the scheduler: {type(exc).__name__}: {exc}") from exc
    op = reply.get("op") if isinstance(reply, dict) else None
    if op == "reschedule":  # this worker is retiring: run elsewhere (nothing started)
        raise distributed.Reschedule()
    if op != "run":
        if op in ("refused", "cancelled"):
            raise AttemptRefused(key, "started" if op == "refused" else "cancelled", reply.get("worker"), reply.get("pid"), reply.get("before", 0), reply.get("elapsed", 0.0))
        raise ClaimFailed(f"unexpected answer from the resilpool ledger: {reply!r}")
    # Started: from here on this attempt is never run again.
    t0 = time.perf_counter()
    try:
        try:
            fn, args, kwargs = pickle.loads(body)
        except BaseException as exc:
            raise worker_module._unpickling_error(exc, _task_id(key)) from exc
        value = fn(*args, **kwargs)
    except BaseException as exc:
        return _FAILED, time.perf_counter() - t0, P.error_payload(exc), pid
    elapsed = time.perf_counter() - t0
    try:
        try:
            out = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception:
            out = worker_module._dumps_by_value(value)  # as a local worker: e.g. a notebook class
        return _SUCCEEDED, elapsed, out, pid
    except BaseException as exc:
        return _FAILED, elapsed, P.error_payload(worker_module._result_pickling_error(exc, _task_id(key))), pid


def _task_id(key: str) -> int:
    try:
        return int(key.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return 0


def kill_worker_process(expected_pid: int, dask_worker: Any = None) -> str:
    """Run on a nanny: SIGKILL its worker process if it is still ``expected_pid``."""
    pid = getattr(dask_worker, "pid", None)
    if pid is None or pid != expected_pid:
        return "gone"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "gone"
    return "killed"


# --- scheduler side ----------------------------------------------------------------


class _Rec:
    __slots__ = ("address", "before", "owner", "pid", "state", "t0", "worker")

    def __init__(self, owner: str, state: int, worker: str | None, pid: int | None, before: int) -> None:
        self.owner = owner
        self.state = state
        self.address = worker  # where it started (kept for reports)
        self.worker = worker  # the same while that worker is in the cluster and counts it as live
        self.pid = pid
        self.t0 = time.monotonic()
        self.before = before


class AttemptLedger(SchedulerPlugin):  # type: ignore[misc,unused-ignore]  # untyped without stubs
    """Scheduler plugin: which attempt key started where, and the workers' retirement.

    Owned by the scheduler's event loop (handlers and hooks all run on it).  Handlers,
    called by workers (``resilpool_claim``) and by resilpool clients (the rest):

    - ``resilpool_claim(key, owner, worker, pid)``: record the first start of ``key``;
      ``{"op": "run"}``, or ``"refused"`` (started before), ``"cancelled"``, ``"reschedule"``
      (the worker is retiring).
    - ``resilpool_cancel(keys, owner)``: cancel keys that have not started; returns those.
    - ``resilpool_status(owner)``: workers (pid, memory, CPU, starts, retiring) and the
      owner's running attempts with their run time so far.
    - ``resilpool_retire(worker, reason)``: no new task on it (``closing_gracefully``); it
      is restarted by its nanny once none of its attempts is running or held.
    - ``resilpool_kill(worker, key, reason)``: SIGKILL the worker through its nanny, if
      ``key`` (when given) still runs there.
    - ``resilpool_register(owner, max_tasks)`` / ``resilpool_unregister(owner)``.

    Worker arrivals and departures (with the owner's attempts each departure cost) are
    published as events on topic ``resilpool-<owner>``.

    Invariants: a key has at most one record, and a record leaves ``_STARTED``/``_DONE``
    only when the scheduler forgets the key or its worker leaves; a forgotten key stays a
    tombstone for ``_TOMBSTONE_S`` seconds, so a rerun whose claim arrives after the
    client released the key is still refused.  ``live[w]`` counts the records on worker
    ``w`` in ``_STARTED`` or ``_DONE`` (running, or a result not yet collected).
    """

    name = LEDGER_NAME
    idempotent = True

    def __init__(self) -> None:
        self.records: dict[str, _Rec] = {}
        self.started: dict[str, _Rec] = {}  # the records in _STARTED
        self.live: dict[str, int] = {}
        self.tombstones: deque[tuple[float, str]] = deque()
        self.starts: dict[str, int] = {}  # worker address -> attempts started there
        self.marks: dict[str, str] = {}  # worker address -> why we retire or kill it (ExitReason value)
        self.retiring: set[str] = set()
        self.restarting: set[str] = set()
        self.owners: dict[str, int | None] = {}  # owner -> max_tasks
        self.pids: dict[str, int | None] = {}
        self.nannies: dict[str, str | None] = {}
        self.replaced: dict[str, int | None] = {}  # nanny address -> pid of its last worker that left
        self.scheduler: Any = None
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "resilpool_claim": self.claim,
                "resilpool_cancel": self.cancel,
                "resilpool_status": self.status,
                "resilpool_retire": self.retire,
                "resilpool_kill": self.kill,
                "resilpool_register": self.register,
                "resilpool_unregister": self.unregister,
            }
        )
        for addr, ws in scheduler.workers.items():
            self.pids[addr] = ws.pid
            self.nannies[addr] = ws.nanny

    # --- handlers ---

    def claim(self, key: str, owner: str, worker: str, pid: int) -> dict[str, Any]:
        rec = self.records.get(key)
        if rec is not None:
            if rec.state == _CANCELLED:
                return {"op": "cancelled"}
            return {"op": "refused", "worker": rec.address, "pid": rec.pid, "before": rec.before, "elapsed": time.monotonic() - rec.t0}
        if worker in self.retiring or worker not in self.scheduler.workers:
            return {"op": "reschedule"}
        n = self.starts.get(worker, 0)
        max_tasks = self.owners.get(owner)
        if max_tasks is not None and n >= max_tasks:
            self._retire(worker, ExitReason.MAX_TASKS.value)
            return {"op": "reschedule"}
        rec = self.records[key] = self.started[key] = _Rec(owner, _STARTED, worker, pid, n)
        self.live[worker] = self.live.get(worker, 0) + 1
        self.starts[worker] = n + 1
        if max_tasks is not None and n + 1 >= max_tasks:
            self._retire(worker, ExitReason.MAX_TASKS.value)  # no task after its N-th
        return {"op": "run", "before": n}

    def cancel(self, keys: list[str], owner: str) -> list[str]:
        out = []
        for key in keys:
            rec = self.records.get(key)
            if rec is None:
                self.records[key] = _Rec(owner, _CANCELLED, None, None, 0)
                out.append(key)
            elif rec.state == _CANCELLED:
                out.append(key)
        return out

    def status(self, owner: str) -> dict[str, Any]:
        now = time.monotonic()
        running: dict[str, list[list[Any]]] = {}
        for key, rec in self.started.items():
            if rec.owner == owner and rec.worker is not None:
                running.setdefault(rec.worker, []).append([key, now - rec.t0])
        workers = []
        for addr, ws in self.scheduler.workers.items():
            metrics = ws.metrics or {}
            workers.append(
                {
                    "address": addr,
                    "pid": ws.pid,
                    "nanny": ws.nanny,
                    "nthreads": ws.nthreads,
                    "status": ws.status.name,
                    "memory": metrics.get("memory"),
                    "cpu": metrics.get("cpu"),
                    "starts": self.starts.get(addr, 0),
                    "retiring": addr in self.retiring,
                    "running": running.get(addr, []),
                }
            )
        return {"workers": workers}

    def retire(self, worker: str, reason: str) -> str:
        return self._retire(worker, reason)

    async def kill(self, worker: str, key: str | None, reason: str) -> str:
        ws = self.scheduler.workers.get(worker)
        if ws is None:
            return "gone"
        if key is not None:
            rec = self.started.get(key)
            if rec is None or rec.worker != worker:
                return "finished"  # the attempt ended meanwhile: kill nothing
        self.marks[worker] = reason
        if ws.nanny:
            from distributed.protocol.pickle import dumps as _dumps

            dumps: Callable[[Any], bytes] = _dumps
            resp = await self.scheduler.broadcast(
                msg={"op": "run", "function": dumps(kill_worker_process), "args": dumps((ws.pid,)), "kwargs": dumps({})},
                workers=[worker],
                nanny=True,
                on_error="return",
            )
            answer = resp.get(worker)  # broadcast answers by worker address
            if isinstance(answer, dict) and answer.get("status") == "OK":
                return "killed"
            return f"kill failed: {answer!r}"
        # No nanny to kill it from outside: ask the scheduler to close it (a hung task may keep it).
        await self.scheduler.remove_worker(worker, close=True, stimulus_id=f"resilpool-kill-{time.time()}")
        return "removed"

    def register(self, owner: str, max_tasks: int | None = None) -> str:
        self.owners[owner] = max_tasks
        return "OK"

    def unregister(self, owner: str) -> str:
        self.owners.pop(owner, None)
        return "OK"

    # --- hooks ---

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        rec = self.records.get(key)
        if rec is None:
            return
        if finish == "forgotten":
            self._bury(key, rec)
        elif finish in ("memory", "erred") and rec.state == _STARTED:
            rec.state = _DONE
            del self.started[key]

    def add_worker(self, scheduler: Any, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        pid = ws.pid if ws is not None else None
        nanny = ws.nanny if ws is not None else None
        self.pids[worker] = pid
        self.nannies[worker] = nanny
        replaces = self.replaced.pop(nanny, None) if nanny else None
        for owner in self.owners:
            scheduler.log_event(TOPIC_PREFIX + owner, {"op": "added", "worker": worker, "pid": pid, "replaces": replaces})

    def remove_worker(self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        pid = self.pids.pop(worker, None)
        nanny = self.nannies.pop(worker, None)
        reason = self.marks.pop(worker, None)
        self.retiring.discard(worker)
        self.restarting.discard(worker)
        self.starts.pop(worker, None)
        self.live.pop(worker, None)
        if nanny:
            self.replaced[nanny] = pid
        now = time.monotonic()
        lost: dict[str, list[list[Any]]] = {}
        for key, rec in list(self.started.items()):
            if rec.worker == worker:
                lost.setdefault(rec.owner, []).append([key, rec.before, now - rec.t0])
                rec.state = _DONE  # died with its worker; a rerun is refused
                del self.started[key]
        for rec in self.records.values():
            if rec.worker == worker:
                rec.worker = None  # its worker is gone: no longer counted in live
        for owner in self.owners:
            scheduler.log_event(TOPIC_PREFIX + owner, {"op": "removed", "worker": worker, "pid": pid, "reason": reason, "lost": lost.get(owner, [])})

    def remove_client(self, scheduler: Any, client: str) -> None:
        # The scheduler forgets a departed client's keys; its tombstones expire as usual.
        self.owners.pop(client, None)

    # --- records and retirement ---

    def _bury(self, key: str, rec: _Rec) -> None:
        if rec.state == _GONE:
            return
        if rec.state == _STARTED:
            del self.started[key]
        w = rec.worker
        if w is not None and rec.state in (_STARTED, _DONE):
            self.live[w] = self.live.get(w, 1) - 1
        rec.state = _GONE
        rec.worker = None
        now = time.monotonic()
        self.tombstones.append((now, key))
        stones = self.tombstones
        while stones and stones[0][0] < now - _TOMBSTONE_S:
            _, old = stones.popleft()
            r = self.records.get(old)
            if r is not None and r.state == _GONE:
                del self.records[old]
        if w is not None:
            self._maybe_restart(w)

    def _retire(self, worker: str, reason: str) -> str:
        from distributed.core import Status

        s = self.scheduler
        ws = s.workers.get(worker)
        if ws is None:
            return "gone"
        if worker in self.retiring:
            return "retiring"
        self.retiring.add(worker)
        self.marks.setdefault(worker, reason)
        # As Scheduler.retire_workers does, without moving data or closing: no new task goes
        # to it, the task it runs finishes; the worker pauses too (no queued task starts).
        stimulus_id = f"resilpool-retire-{time.time()}"
        s.handle_worker_status_change(Status.closing_gracefully, ws, stimulus_id)
        comm = s.stream_comms.get(worker)
        if comm is not None:
            comm.send({"op": "worker-status-change", "status": Status.closing_gracefully.name, "stimulus_id": stimulus_id})
        self._maybe_restart(worker)
        return "retiring"

    def _maybe_restart(self, worker: str) -> None:
        if worker not in self.retiring or worker in self.restarting or self.live.get(worker, 0) > 0:
            return  # not retiring, already restarting, or an attempt still runs or holds a result there
        self.restarting.add(worker)
        task = asyncio.ensure_future(self._restart(worker))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _restart(self, worker: str) -> None:
        s = self.scheduler
        try:
            if hasattr(s, "restart_workers"):
                await s.restart_workers([worker], stimulus_id=f"resilpool-restart-{time.time()}", wait_for_workers=False, on_error="return")
                return
            # Older distributed: ask the nanny to kill its worker; it starts a new one.
            ws = s.workers.get(worker)
            if ws is not None and ws.nanny:
                await s.rpc(ws.nanny).kill()
            elif ws is not None:
                await s.remove_worker(worker, close=True, stimulus_id=f"resilpool-restart-{time.time()}")
        except Exception:
            log.error("resilpool ledger: restarting %s failed", worker, exc_info=True)


# --- client side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _RetireWorker:
    pid: int
    reason: ExitReason


@dataclass(frozen=True, slots=True, kw_only=True)
class _KillWorker:
    pid: int
    task_id: int | None
    reason: ExitReason
    make_error: Callable[[Task, float], BaseException]


@dataclass(frozen=True, slots=True, kw_only=True)
class _SetPaused:
    reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Shutdown:
    cancel_futures: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class _Adopt:
    unstarted: list[Task]
    interrupted: list[Task]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Break:
    """Test hook: make the core thread fail as if from an internal bug."""


class CoreBrokenForTest(RuntimeError):
    """Raised inside the core thread by :meth:`DaskCore.inject_break`."""


@dataclass(frozen=True, slots=True)
class Sample:
    """Last measurement of one Dask worker (what ``ResilientPool.workers()`` shows)."""

    rss: int
    cpu_percent: float | None


class _Attempt:
    """One attempt of a task, in flight as Dask key ``key``. Owned by the core thread."""

    __slots__ = ("future", "key", "task", "watcher", "worker")

    def __init__(self, key: str, task: Task, future: Any) -> None:
        self.key = key
        self.task = task
        self.future = future
        self.watcher: asyncio.Task[None] | None = None
        self.worker: str | None = None


class _DWorker:
    """What the core knows of one Dask worker. Owned by the core thread."""

    __slots__ = ("address", "cpu_hist", "cpu_s", "killing", "last_poll", "lifetime_s", "nthreads", "pid", "retire_asked", "retiring", "slot", "spawned_at")

    def __init__(self, address: str, pid: int | None, slot: int, lifetime_s: float | None) -> None:
        self.address = address
        self.pid = pid or 0
        self.slot = slot
        self.spawned_at = time.monotonic()
        self.lifetime_s = lifetime_s
        self.nthreads = 1
        self.retiring = False
        self.retire_asked = False
        self.killing = False
        self.cpu_s = 0.0
        self.last_poll: float | None = None
        self.cpu_hist: deque[tuple[float, float]] = deque()


class DaskCore:
    """The executor core on a Dask cluster; the same seams as the local ``Core``. See the module docstring."""

    def __init__(
        self,
        *,
        backend: Any,
        address: str,
        security: Any,
        max_workers: int,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        max_tasks_per_worker: int | None,
        max_startup_failures: int,
        startup_window_s: float,
        quarantine_after: int,
        emit: Callable[[Event], None],
        on_broken: Callable[[Any, BaseException], None] | None,
        limits: Limits,
        init_body: bytes | None,
        connect_timeout_s: float,
        name: str = "resilpool",
    ) -> None:
        self.max_workers = max_workers
        self._backend = backend
        self._address = address
        self._security = security
        self._max_tasks = max_tasks_per_worker
        self._quarantine_after = quarantine_after
        self._emit = emit
        self._on_broken = on_broken
        self._limits = limits
        self._init_body = init_body  # the pickled (initializer, initargs, {}); run by run_attempt
        self._token = uuid.uuid4().hex[:12]
        self._rng = random.Random()

        # Shared with other threads (see the module docstring).
        self._lock = threading.Lock()
        self._accepting = True
        self._submitted: deque[Task] = deque()
        self._commands: deque[Any] = deque()
        self._wake_pending = False
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._wake_event: asyncio.Event | None = None
        self._views: tuple[WorkerView, ...] = ()
        self._slots: dict[int, tuple[int, float | None, int]] = {}
        self.samples: dict[int, Sample] = {}
        self.peak_rss = 0
        self.task_timeouts: dict[int, float] = {}
        self.stats = Counter[str]()
        self.recycled = Counter[str]()

        # Core-thread state.
        self._client: Any = None
        self._owner = ""
        self._tasks: dict[int, Task] = {}
        self._pending: deque[Task] = deque()
        self._timers: list[tuple[float, int, Task]] = []
        self._timer_seq = itertools.count()
        self._inflight: dict[str, _Attempt] = {}
        self._ready: list[_Attempt] = []  # finished or erred in Dask, result not fetched yet
        self._collecting = False
        self._doomed: dict[str, Callable[[Task, float], BaseException]] = {}  # key -> error of a kill we asked for
        self._workers: dict[str, _DWorker] = {}
        self._gone: deque[str] = deque(maxlen=1024)  # addresses of workers that left (dedupes poll and event)
        self._slot_seq = itertools.count()
        self._init_failed_on: set[str] = set()
        self._ewma_s: float | None = None
        self._paused: str | None = None
        self._draining = False
        self._broken: BaseException | None = None
        self._breaker = CrashLoopBreaker(max_startup_failures, startup_window_s)
        self._polling = False
        self._next_poll = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self._salvaged: tuple[list[Task], list[Task]] | None = None
        self._failing = False
        self._failed_over = False
        self._connect_timeout_s = connect_timeout_s

        self._connected = threading.Event()
        self._connect_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-dask", daemon=True)
        self._thread.start()
        if not self._connected.wait(connect_timeout_s + 10.0):
            self._connect_error = TimeoutError(f"could not connect to the Dask scheduler at {address} within {connect_timeout_s}s")
        if self._connect_error is not None:
            with self._lock:
                self._accepting = False
            self._command(_Shutdown(cancel_futures=True))
            self._thread.join(5.0)
            raise self._connect_error

    # --- called from any thread --------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a task; raises CoreGone if this core no longer accepts work."""
        with self._lock:
            if not self._accepting:
                raise CoreGone
            self._submitted.append(task)
        if not self._wake_pending:
            self._wake()

    def submit_many(self, tasks: Iterable[Task]) -> None:
        with self._lock:
            if not self._accepting:
                raise CoreGone
            self._submitted.extend(tasks)
        self._wake()

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def client(self) -> Any:
        """The core's asynchronous ``distributed.Client`` (lives on the core thread)."""
        return self._client

    def worker_views(self) -> tuple[WorkerView, ...]:
        return self._views

    def read_slot(self, slot: int) -> tuple[int, float | None, int]:
        """``(task id or 0, started at (monotonic) or None, attempts started)`` as of the last poll."""
        return self._slots.get(slot, (0, None, 0))

    def retire_worker(self, pid: int, reason: ExitReason) -> None:
        self._command(_RetireWorker(pid=pid, reason=reason))

    def kill_worker(self, pid: int, reason: ExitReason, make_error: Callable[[Task, float], BaseException], task_id: int | None = None) -> None:
        self._command(_KillWorker(pid=pid, task_id=task_id, reason=reason, make_error=make_error))

    def pause_dispatch(self, reason: str) -> None:
        self._command(_SetPaused(reason=reason))

    def resume_dispatch(self) -> None:
        self._command(_SetPaused(reason=None))

    def inject_break(self) -> None:
        self._command(_Break())

    def adopt(self, unstarted: list[Task], interrupted: list[Task]) -> None:
        for t in (*unstarted, *interrupted):
            if t.timeout is not None:
                self.task_timeouts[t.id] = t.timeout
        self._command(_Adopt(unstarted=unstarted, interrupted=interrupted))

    def shutdown(self, *, cancel_futures: bool) -> None:
        with self._lock:
            self._accepting = False
        self._command(_Shutdown(cancel_futures=cancel_futures))

    def join(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def unresolved(self) -> int:
        return len(self._tasks) + len(self._submitted)

    def counts(self) -> tuple[int, int]:
        running = len(self._inflight)
        return max(0, self.unresolved() - running), running

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

    def _command(self, cmd: Any) -> None:
        self._commands.append(cmd)
        self._wake()

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
                log.error("resilpool Dask core failed; rebuilding", exc_info=True)
                await self._fail_over(exc)
        finally:
            for t in list(self._background):
                t.cancel()
            for att in self._inflight.values():
                if att.watcher is not None:
                    att.watcher.cancel()
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
            self._take_submitted()
            while self._commands:
                self._execute(self._commands.popleft())
            self._fire_timers()
            now = time.monotonic()
            if now >= self._next_poll and not self._polling:
                self._spawn(self._supervise())
            self._dispatch()
            if self._draining and self._finished():
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
        if self._timers:
            deadline = min(deadline, self._timers[0][0])
        return max(0.0, min(deadline - time.monotonic(), 1.0))

    def _take_submitted(self) -> None:
        with self._lock:
            items = list(self._submitted)
            self._submitted.clear()
        for t in items:
            self._tasks[t.id] = t
            self._pending.append(t)

    # --- dispatch ------------------------------------------------------------------

    def _cap(self) -> int:
        threads = sum(w.nthreads for w in self._workers.values() if not w.retiring) or self.max_workers
        ewma = self._ewma_s
        depth = 1 if ewma is None or ewma >= _DEEP_BELOW_S else min(_MAX_DEPTH, 1 + int(_PIPELINE_S / max(ewma, 1e-6)))
        # One running and at least one queued per thread: the scheduler hands a worker its
        # next attempt as soon as one ends, without a round trip through this core.
        return threads * (1 + depth)

    def _dispatch(self) -> None:
        if self._broken is not None:
            self._fail_unassigned(self._broken)
            return
        if self._paused is not None or not self._pending:
            return
        room = self._cap() - len(self._inflight)
        if room <= 0:
            return
        batch: list[Task] = []
        pending = self._pending
        while pending and len(batch) < room:
            task = pending.popleft()
            if task.attempt == 1 and task.first_start is None:
                if not task.future.set_running_or_notify_cancel():
                    self._forget(task)
                    self.stats["cancelled"] += 1
                    continue
                task.first_start = time.monotonic()
            batch.append(task)
        if not batch:
            return
        keys = [f"resilpool-{self._token}-{t.id}-{t.attempt}" for t in batch]
        kwargs = {"owner": self._owner, "init": self._init_body, "init_token": self._token}
        client = self._client
        if len(batch) == 1:
            futures = [client.submit(run_attempt, keys[0], batch[0].body, key=keys[0], pure=False, **kwargs)]
        else:
            futures = client.map(run_attempt, keys, [t.body for t in batch], key=keys, pure=False, **kwargs)
        for key, task, fut in zip(keys, batch, futures):
            att = _Attempt(key, task, fut)
            self._inflight[key] = att
            att.watcher = asyncio.ensure_future(self._watch(att))

    async def _watch(self, att: _Attempt) -> None:
        fut = att.future
        # Wait for the key to finish or err, as distributed's own done-callbacks do; the
        # results are then fetched in batches (one gather for all that finished meanwhile).
        while fut.status == "pending":
            await fut._state.wait()
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

    def _settle(self, att: _Attempt) -> None:
        """Take an attempt out of flight and let Dask forget its key."""
        del self._inflight[att.key]
        self._doomed.pop(att.key, None)
        if att.watcher is not None and att.watcher is not asyncio.current_task():
            att.watcher.cancel()
        try:
            att.future.release()
        except Exception:
            pass

    # --- outcomes ------------------------------------------------------------------

    def _on_result(self, att: _Attempt, value: Any) -> None:
        self._settle(att)
        task = att.task
        try:
            kind, elapsed, body, pid = value
        except (TypeError, ValueError):
            self._attempt_failed(task, errors.ResilpoolError(f"unexpected result from a Dask worker: {value!r:.80}"), None, 0.0, died=False, blamed=False)
            return
        ewma = self._ewma_s
        self._ewma_s = elapsed if ewma is None else ewma + 0.1 * (elapsed - ewma)
        if kind == _SUCCEEDED:
            try:
                result = pickle.loads(body)
            except Exception as exc:
                err = errors.SerializationError(
                    f"the result of task {task.id} (fn={task.fn_name}) could not be unpickled in the parent: {type(exc).__name__}: {exc}",
                    part="result",
                    task_id=task.id,
                )
                err.__cause__ = exc
                self._attempt_failed(task, err, pid, elapsed, died=False, blamed=False)
                return
            self._forget(task)
            self.stats["completed"] += 1
            _resolve(task.future, result, None)
        else:
            self._attempt_failed(task, P.rebuild_error(body), pid, elapsed, died=False, blamed=False)

    def _on_dask_error(self, att: _Attempt, exc: BaseException) -> None:
        task = att.task
        if isinstance(exc, AttemptRefused):
            self._settle(att)
            if exc.why == "cancelled":
                return  # we cancelled it (a rebuild); its task is handled elsewhere
            err = self._death_error(att, exc.worker, exc.pid, exc.elapsed)
            self._attempt_failed(task, err, exc.pid, exc.elapsed, died=True, blamed=self._blamed(att, exc.before))
            return
        if isinstance(exc, InitializerFailed):
            self._settle(att)
            self._pending.appendleft(task)  # nothing of the task ran: not an attempt
            if exc.worker not in self._init_failed_on:
                self._init_failed_on.add(exc.worker)
                cause = P.rebuild_error(exc.body)
                log.error("Dask worker %s: initializer failed: %s", exc.worker, cause, exc_info=cause)
                self._spawn(self._ledger_kill(exc.worker, None, ExitReason.STARTUP))
                self._startup_failed(cause)
            return
        self._settle(att)
        if _is_killed_worker(exc):
            # Dask gave up on the key after allowed-failures + 1 worker deaths, none of which
            # we saw start it: the task kills workers before it can even start. Quarantine it.
            deaths = _killed_worker_deaths(exc)
            task.crashes = max(task.crashes, deaths - 1, self._quarantine_after - 1)
            killer = _crash_error(task, None, None, f"Dask gave up on it after {deaths} worker deaths (KilledWorker)")
            killer.__cause__ = exc
            self._attempt_failed(task, killer, None, 0.0, died=True, blamed=True)
            return
        if isinstance(exc, ClaimFailed):
            unstarted = errors.WorkerCrashedError(f"task {task.id} (fn={task.fn_name}) could not start: {exc}", task_id=task.id, fn_name=task.fn_name)
            unstarted.__cause__ = exc
            self._attempt_failed(task, unstarted, None, 0.0, died=False, blamed=False)
            return
        # Cancelled by the scheduler (a lost client connection), or another infrastructure
        # error: whether it started is unknown, so count it as a death.
        err = _crash_error(task, None, None, f"the Dask cluster lost it: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        self._attempt_failed(task, err, None, 0.0, died=True, blamed=False)

    def _blamed(self, att: _Attempt, before: int) -> bool:
        """Does this death count toward the task's quarantine?

        As locally: yes if the task was the first its worker started.  Dask chooses the
        worker, so a retry is not routed to a fresh one after an unblamed death; instead
        the death that follows an unblamed one is blamed (``needs_fresh`` marks the task),
        which is where the local routing leads too.
        """
        if att.key in self._doomed:
            return False  # a timeout or stall kill never counts toward quarantine (memory does, below)
        return blame(before) or att.task.needs_fresh

    def _death_error(self, att: _Attempt, worker: str | None, pid: int | None, elapsed: float) -> BaseException:
        make = self._doomed.get(att.key)
        if make is not None:
            return make(att.task, elapsed)
        return _crash_error(att.task, worker, pid)

    def _on_ledger_event(self, event: Any) -> None:
        # Runs on the core thread (the client's loop is ours).
        if self._failing:
            return
        try:
            _, msg = event
            op = msg.get("op")
            if op == "removed":
                self._on_worker_removed(msg)
            elif op == "added":
                self._on_worker_added(msg["worker"], msg.get("pid"), msg.get("replaces"))
        except Exception:
            log.error("resilpool: bad ledger event %r", event, exc_info=True)
        self._kick()

    def _on_worker_added(self, address: str, pid: int | None, replaces: int | None) -> None:
        if address in self._workers or address in self._gone:
            return
        w = _DWorker(address, pid, next(self._slot_seq), lifetime_with_jitter(self._limits.max_lifetime, self._rng))
        self._workers[address] = w
        self.stats["workers_started"] += 1
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
            if lost:
                t = lost[0][0].task
                detail += f" while running task {t.id} (fn={t.fn_name})"
            if reason in (ExitReason.CRASH, ExitReason.STARTUP):
                self.stats["worker_crashes"] += 1
            self.recycled[reason.value] += 1
            log.log(logging.INFO if reason.is_recycle else logging.WARNING, "%s (%s)", detail, reason.value)
            self._emit(WorkerExited(pid=pid or 0, exitcode=None, reason=reason, task_id=lost[0][0].task.id if lost else None, detail=detail))
            self._publish_views()
        for att, before, elapsed in lost:
            # A memory kill counts toward quarantine like a crash; a timeout or stall never does.
            blamed = blame(before) or att.task.needs_fresh if reason is ExitReason.MEMORY else self._blamed(att, before)
            err = self._death_error(att, address, pid, elapsed)
            self._settle(att)
            self._attempt_failed(att.task, err, pid, elapsed, died=True, blamed=blamed)

    # --- a failed attempt: retry, quarantine or fail (as the local core) ------------

    def _attempt_failed(self, task: Task, err: BaseException, pid: int | None, elapsed: float, *, died: bool, blamed: bool) -> None:
        if blamed:
            task.crashes += 1
        what = _summary(err)
        note = f"attempt {task.attempt} pid {pid}: {what} after {elapsed:.2f}s"
        if died and task.crashes >= self._quarantine_after:
            poison = errors.PoisonTaskError(crashes=task.crashes, fn_name=task.fn_name, args_repr=task.args_repr(), task_id=task.id)
            poison.__cause__ = err
            _add_notes(poison, task, note)
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
                    task.needs_fresh = True  # maybe the old worker's fault; the next death is the task's
                self.stats["retried"] += 1
                log.info("task %d (fn=%s) attempt %d failed (%s); retrying in %.2fs", task.id, task.fn_name, task.attempt - 1, what, delay)
                self._emit(TaskRetried(task_id=task.id, attempt=task.attempt - 1, delay_s=delay, error=what))
                if delay > 0:
                    heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), task))
                else:
                    self._pending.appendleft(task)
                return
        _add_notes(err, task, None)
        self._fail(task, err)

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
            self._pending.appendleft(t)

    def _startup_failed(self, cause: BaseException) -> None:
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
        while self._pending:
            self._fail(self._pending.popleft(), _copy_error(err))
        while self._timers:
            _, _, t = heapq.heappop(self._timers)
            self._fail(t, _copy_error(err))
        self._take_submitted()
        while self._pending:
            self._fail(self._pending.popleft(), _copy_error(err))

    # --- commands ------------------------------------------------------------------

    def _execute(self, cmd: Any) -> None:
        cls = type(cmd)
        if cls is _Shutdown:
            self._draining = True
            if cmd.cancel_futures:
                keep: deque[Task] = deque()
                for t in self._pending:
                    if t.first_start is None and t.future.cancel():
                        self._forget(t)
                        self.stats["cancelled"] += 1
                    else:
                        keep.append(t)
                self._pending = keep
        elif cls is _SetPaused:
            if cmd.reason is not None and self._paused is None:
                self._paused = cmd.reason
                log.warning("resilpool starts no new task: %s", cmd.reason)
                self._emit(DispatchPaused(reason=cmd.reason))
            elif cmd.reason is None and self._paused is not None:
                was, self._paused = self._paused, None
                self._emit(DispatchResumed(reason=was))
        elif cls is _RetireWorker:
            w = self._worker_by_pid(cmd.pid)
            if w is not None:
                self._retire(w, cmd.reason)
        elif cls is _KillWorker:
            w = self._worker_by_pid(cmd.pid)
            if w is not None:
                key = None
                if cmd.task_id is not None:
                    key = next((a.key for a in self._inflight.values() if a.task.id == cmd.task_id), None)
                    if key is None:
                        return
                self._kill(w, key, cmd.reason, cmd.make_error)
        elif cls is _Adopt:
            for t in cmd.unstarted:
                self._tasks[t.id] = t
                self._pending.append(t)
            for t in cmd.interrupted:
                self._tasks[t.id] = t
                err = errors.WorkerCrashedError(
                    f"task {t.id} (fn={t.fn_name}) was running when the pool's core broke and was rebuilt", task_id=t.id, fn_name=t.fn_name
                )
                self._attempt_failed(t, err, None, 0.0, died=True, blamed=False)
        elif cls is _Break:
            raise CoreBrokenForTest("core broken on purpose by the test hook")

    def _worker_by_pid(self, pid: int) -> _DWorker | None:
        return next((w for w in self._workers.values() if w.pid == pid), None)

    def _finished(self) -> bool:
        if self._tasks and self._broken is None:
            return False
        return not self._inflight

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
        st = await asyncio.wait_for(self._client.scheduler.resilpool_status(owner=self._owner), _RPC_TIMEOUT_S)
        if self._failing:
            return
        now = time.monotonic()
        limits = self._limits
        samples: dict[int, Sample] = {}
        slots: dict[int, tuple[int, float | None, int]] = {}
        seen = set()
        for info in st["workers"]:
            address = info["address"]
            seen.add(address)
            w = self._workers.get(address)
            if w is None:
                self._on_worker_added(address, info.get("pid"), None)
                w = self._workers.get(address)
                if w is None:
                    continue  # it left already (its removal event beat this answer)
            w.pid = info.get("pid") or w.pid
            w.nthreads = info.get("nthreads") or 1
            w.retiring = bool(info.get("retiring")) or info.get("status") not in ("running", "paused")
            rss = int(info.get("memory") or 0)
            cpu = info.get("cpu")
            samples[w.pid] = Sample(rss=rss, cpu_percent=cpu)
            if rss > self.peak_rss:
                self.peak_rss = rss
            cpu_window = self._record_cpu(w, now, cpu)
            running = [(a, float(e)) for key, e in info.get("running", []) if (a := self._inflight.get(key)) is not None]
            for a, _ in running:
                a.worker = address
            if running:
                a0, e0 = max(running, key=lambda r: r[1])
                slots[w.slot] = (a0.task.id, now - e0, int(info.get("starts", 0)))
            else:
                slots[w.slot] = (0, None, int(info.get("starts", 0)))
            if w.killing:
                continue
            checks: list[tuple[_Attempt | None, float]] = [*running] or [(None, 0.0)]
            for att, elapsed in checks:
                sample = WorkerSample(
                    pid=w.pid,
                    rss=rss,
                    age_s=now - w.spawned_at,
                    lifetime_s=w.lifetime_s,
                    task_id=att.task.id if att is not None else 0,
                    task_started=now - elapsed if att is not None else None,
                    task_timeout=att.task.timeout if att is not None else None,
                    cpu_window_s=cpu_window,
                    retiring=w.retiring or w.retire_asked,
                )
                action = decide(sample, limits, now)
                if action is None:
                    continue
                if isinstance(action, Retire):
                    self._retire(w, action.reason)
                elif att is None or action.reason is ExitReason.MEMORY:
                    self._kill(w, None, action.reason, _error_factory(action, w))
                    break
                elif att.key not in self._doomed:
                    self._kill(w, att.key, action.reason, _error_factory(action, w))
                    break
        for address in [a for a in self._workers if a in known and a not in seen]:
            # Gone without a removal event reaching us (e.g. before we subscribed).
            self._on_worker_removed({"worker": address, "pid": self._workers[address].pid, "reason": None, "lost": []})
        self.samples = samples
        self._slots = slots
        self._backend._telemetry.update(samples, self.peak_rss)
        self._publish_views()

    def _record_cpu(self, w: _DWorker, now: float, cpu_percent: float | None) -> float | None:
        """Integrate the worker's CPU % into CPU seconds; return the CPU used over stall_timeout."""
        if cpu_percent is not None and w.last_poll is not None:
            w.cpu_s += max(0.0, float(cpu_percent)) / 100.0 * (now - w.last_poll)
        w.last_poll = now
        stall = self._limits.stall_timeout
        if stall is None:
            return None
        hist = w.cpu_hist
        hist.append((now, w.cpu_s))
        while len(hist) > 2 and hist[1][0] <= now - stall - 1.0:
            hist.popleft()
        if hist[0][0] > now - stall:
            return None
        base = hist[0]
        for t, c in hist:
            if t <= now - stall:
                base = (t, c)
            else:
                break
        return w.cpu_s - base[1]

    def _retire(self, w: _DWorker, reason: ExitReason) -> None:
        if w.retire_asked or w.killing:
            return
        w.retire_asked = True
        log.info("retiring Dask worker %s after its current task (%s)", w.address, reason.value)
        self._spawn(self._rpc("resilpool_retire", worker=w.address, reason=reason.value))

    def _kill(self, w: _DWorker, key: str | None, reason: ExitReason, make_error: Callable[[Task, float], BaseException]) -> None:
        if key is None:
            w.killing = True
            for att in self._inflight.values():
                if att.worker == w.address:
                    self._doomed[att.key] = make_error
        else:
            self._doomed[key] = make_error
        log.warning("killing Dask worker %s (pid %d): %s", w.address, w.pid, reason.value)
        self._spawn(self._ledger_kill(w.address, key, reason))

    async def _ledger_kill(self, address: str, key: str | None, reason: ExitReason) -> None:
        answer = await self._rpc("resilpool_kill", worker=address, key=key, reason=reason.value)
        if answer == "finished" and key is not None:
            self._doomed.pop(key, None)  # it ended before the kill: nothing was killed for it

    async def _rpc(self, op: str, **kwargs: Any) -> Any:
        return await asyncio.wait_for(getattr(self._client.scheduler, op)(**kwargs), _RPC_TIMEOUT_S)

    def _publish_views(self) -> None:
        self._views = tuple(
            WorkerView(pid=w.pid, slot=w.slot, spawned_at=w.spawned_at, ready=True, retiring=w.retiring or w.retire_asked or w.killing)
            for w in self._workers.values()
        )

    # --- break and salvage -------------------------------------------------------------

    async def _fail_over(self, exc: BaseException) -> None:
        self._failing = True  # from here on no outcome or event touches the tables
        with self._lock:
            self._accepting = False
            submitted = list(self._submitted)
            self._submitted.clear()
        keys = list(self._inflight)
        cancelled: set[str] = set()
        if keys:
            try:
                cancelled = set(await self._rpc("resilpool_cancel", keys=keys, owner=self._owner))
            except Exception:
                log.error("resilpool: could not ask the ledger which attempts started", exc_info=True)
        unstarted: list[Task] = [*self._pending, *(t for _, _, t in sorted(self._timers)), *submitted]
        self._pending.clear()
        self._timers.clear()
        interrupted: list[Task] = []
        for key in keys:
            att = self._inflight[key]
            self._settle(att)
            (unstarted if key in cancelled else interrupted).append(att.task)
        done = {t.id for t in (*unstarted, *interrupted)}
        interrupted.extend(t for t in self._tasks.values() if t.id not in done and not t.future.done())
        self._tasks.clear()
        self._salvaged = (unstarted, interrupted)
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
        tasks = [*self._tasks.values(), *self._submitted]
        if self._salvaged is not None:
            tasks += [*self._salvaged[0], *self._salvaged[1]]
        for t in tasks:
            _resolve(t.future, None, _copy_error(err))


# --- helpers -----------------------------------------------------------------------


def _add_notes(err: BaseException, task: Task, last: str | None) -> None:
    notes = list(task.notes or ())
    if last is not None:
        notes.append(last)
    for n in notes:
        err.add_note(n)


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


def _error_factory(a: Kill | Retire, w: _DWorker) -> Callable[[Task, float], BaseException]:
    assert isinstance(a, Kill)
    pid = w.pid
    address = w.address
    if a.reason is ExitReason.MEMORY:

        def make(task: Task, elapsed: float) -> BaseException:
            err = errors.MemoryLimitError(pid=pid, rss=a.rss, limit=a.limit, task_id=task.id)
            err.address = address  # type: ignore[attr-defined]
            return err

    elif a.reason is ExitReason.TIMEOUT:

        def make(task: Task, elapsed: float) -> BaseException:
            err = errors.TaskTimeoutError(pid=pid, timeout=a.timeout, elapsed=max(elapsed, a.elapsed), task_id=task.id)
            err.address = address  # type: ignore[attr-defined]
            return err

    else:

        def make(task: Task, elapsed: float) -> BaseException:
            err = errors.TaskStalledError(pid=pid, timeout=a.timeout, elapsed=max(elapsed, a.elapsed), task_id=task.id, cpu_seconds=a.cpu_s)
            err.address = address  # type: ignore[attr-defined]
            return err

    return make

