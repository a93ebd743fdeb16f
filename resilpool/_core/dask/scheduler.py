"""Dask scheduler side: the :class:`AttemptLedger` plugin, and the pools' progress page.

Runs in the scheduler process (registered by each pool's client; the cluster must be
able to import resilpool).  Everything here is owned by the scheduler's event loop,
the HTTP handlers of ``/resilpool`` and ``/resilpool/progress.json`` included (tornado
runs them on that loop).
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final

from distributed.comm.core import CommClosedError
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from ...events import ExitReason
from . import CANCEL_BUDGET_S, CLAIM_OP, LEDGER_NAME, PROGRESS_FIELDS, PROGRESS_MAX_FUNCTIONS, PUSH_OP, RPC_TIMEOUT_S, SYNC_ANNOTATION, TOPIC_PREFIX
from .worker import cancel_unstarted, kill_worker_process, read_start_log, started_here

__all__ = ["AttemptLedger"]

log = logging.getLogger("resilpool")

# Ledger record states.
_STARTED: Final = 1  # claimed by a worker; its call may be running
_DONE: Final = 2  # ended (memory or erred), or its worker left; the result may still be held
_CANCELLED: Final = 3  # cancelled before any start: a claim is refused
_GONE: Final = 4  # forgotten by the scheduler; kept a while as a tombstone so a late claim is still refused
_DOUBT: Final = 5  # placed on a worker that left before its start reached us: its start log is being read
_TOMBSTONE_S: Final = 600.0
DEPARTED_KEEP_S: Final = 120.0  # how long status() names why a worker left
_CANCEL_ROUNDS: Final = 4  # cancel(): rounds for keys placed on workers that joined meanwhile


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


def _never_raises(handler: Callable[..., None]) -> Callable[..., None]:
    """``handler`` as a handler of workers' stream messages that never raises: an exception
    out of one makes the scheduler drop that worker's stream, and Dask then closes the
    worker and its nanny for good (the cluster loses a worker)."""

    @functools.wraps(handler)
    def guarded(**msg: Any) -> None:
        try:
            handler(**msg)
        except Exception:
            log.error("resilpool ledger: %s failed on a message from worker %s", handler.__name__, msg.get("worker"), exc_info=True)

    return guarded


class AttemptLedger(SchedulerPlugin):  # type: ignore[misc,unused-ignore]  # untyped without stubs
    """Scheduler plugin: which attempt key started where, and the workers' retirement.

    Owned by the scheduler's event loop (handlers and hooks all run on it).  Messages
    from workers:

    - stream message ``resilpool-started`` (:meth:`started_on`): an attempt started on
      that worker (sent on the worker's stream without waiting: the hot path).  It
      arrives before the attempt's outcome and end, which follow on the same stream.
    - ``resilpool_claim(key, owner, worker, pid, before)``: the checked path, for keys
      marked ``SYNC_ANNOTATION`` (reruns, cancelled keys) and retiring workers: record
      the first start of ``key``; ``{"op": "run"}``, or ``"refused"`` (started before,
      or it may have: its worker died before we heard), ``"cancelled"``, ``"reschedule"``
      (the worker is retiring).
    - stream message ``resilpool-outcome`` (:meth:`pushed`): a small outcome, forwarded
      to its client before the worker reports the task finished.

    From resilpool clients:

    - ``resilpool_cancel(keys, owner)``: cancel keys that have not started (asking every
      worker which it started); returns those.
    - ``resilpool_status(owner, progress)``: workers (pid, memory, CPU, starts, retiring)
      and the owner's running attempts with their run time so far; workers that left
      lately with why (``departed``), since a poll's answer can overtake the removal
      event.  ``progress`` is the owner's pool's progress (per function name, the
      :data:`PROGRESS_FIELDS` counts), kept in ``progress`` for the HTTP page.
    - ``resilpool_retire(worker, reason)``: no new task on it (``closing_gracefully``); it
      is restarted by its nanny once none of its attempts is running or held.
    - ``resilpool_kill(worker, key, reason)``: SIGKILL the worker through its nanny, if
      ``key`` (when given) still runs there; ``worker=None``: wherever ``key`` runs.
    - ``resilpool_register(owner, max_tasks)`` / ``resilpool_unregister(owner)`` (which
      also drops the owner's progress).

    Over HTTP, on the scheduler's dashboard server (:func:`add_progress_routes`):
    ``/resilpool/progress.json`` (:meth:`progress_report`) and ``/resilpool``, a page
    that reloads itself, drawn from it.

    Worker arrivals and departures (with the owner's attempts each departure cost) are
    published as events on topic ``resilpool-<owner>``.

    At most once, without waiting on the hot path: a key runs unchecked only on its
    first placement.  Whenever one of the owners' keys leaves ``processing`` or
    ``memory`` other than by ending (its worker left, it was rescheduled or
    recomputed), the ledger marks it ``SYNC_ANNOTATION`` before Dask places it again,
    so wherever it runs next it claims its start and waits.  If its worker left and no
    start of it had reached us, it is ``_DOUBT`` until the worker's nanny has read the
    worker's start log (:func:`~.worker.read_start_log`): started there, it is lost with
    the worker (and a claim is refused); not started, its record is dropped (a claim
    runs it).  Without an answer, it counts as started.

    Invariants: a key has at most one record, and a record leaves ``_STARTED``/``_DONE``
    only when the scheduler forgets the key or its worker leaves; a forgotten key stays a
    tombstone for ``_TOMBSTONE_S`` seconds, so a rerun whose claim arrives after the
    client released the key is still refused.  ``live[w]`` counts the records on worker
    ``w`` in ``_STARTED`` or ``_DONE`` (running, or a result not yet collected).
    ``placed`` holds exactly the owners' keys in ``processing`` (-> worker, owner);
    ``doubts[w]`` the ``_DOUBT`` keys of worker ``w``, whose ``resolved[w]`` is set once
    its start log has been read.
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
        self.replaces: dict[str, int] = {}  # worker address -> pid of the worker its nanny restarted it for
        self.placed: dict[str, tuple[str, str]] = {}  # the owners' keys in processing -> (worker, owner)
        self.doubts: dict[str, list[str]] = {}  # worker that left -> its _DOUBT keys
        self.resolved: dict[str, asyncio.Event] = {}  # worker that left -> set once its doubts are settled
        # Worker that left -> (why, when), kept DEPARTED_KEEP_S: a client's poll can see a
        # worker gone before the removal event reaches it, and must still name the cause.
        self.departed: dict[str, tuple[str | None, float]] = {}
        # Worker that left -> its start log once its nanny has read it (None: unreadable), kept
        # as long as ``departed``: cancel() consults it when that worker cannot answer.
        self.start_logs: dict[str, asyncio.Future[dict[str, int] | None]] = {}
        # Counts, for tests and diagnosis: starts recorded unchecked (the hot path) and
        # checked (a claim waited for); doubts the start logs settled (started / not started).
        self.unchecked = self.checked = self.log_started = self.log_unstarted = 0
        # Registered owner -> (label, {function name: PROGRESS_FIELDS counts}, monotonic time
        # of its last report): what each pool has been given, not only what is in flight here.
        self.progress: dict[str, tuple[str, dict[str, list[int]], float]] = {}
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
        scheduler.stream_handlers[PUSH_OP] = _never_raises(self.pushed)  # from workers' streams
        scheduler.stream_handlers[CLAIM_OP] = _never_raises(self.started_on)
        add_progress_routes(scheduler)
        for addr, ws in scheduler.workers.items():
            self.pids[addr] = ws.pid
            self.nannies[addr] = ws.nanny

    # --- handlers ---

    async def claim(self, key: str, owner: str, worker: str, pid: int, before: int = 0) -> dict[str, Any]:
        await self._doubts_settled([key])  # still in doubt after that: refused below (it may have started)
        rec = self.records.get(key)
        if rec is not None:
            if rec.state == _CANCELLED:
                return {"op": "cancelled"}
            return {"op": "refused", "worker": rec.address, "pid": rec.pid, "before": rec.before, "elapsed": time.monotonic() - rec.t0}
        if worker in self.retiring or worker not in self.scheduler.workers:
            return {"op": "reschedule"}
        n = max(self.starts.get(worker, 0), before)
        max_tasks = self.owners.get(owner)
        if max_tasks is not None and n >= max_tasks:
            self._retire(worker, ExitReason.MAX_TASKS.value)
            return {"op": "reschedule"}
        n = self._start(key, owner, worker, pid, before)
        self.checked += 1
        return {"op": "run", "before": n}

    def started_on(self, key: str, owner: str, pid: int, before: int = 0, worker: str = "") -> None:
        """An attempt started on ``worker`` without waiting for us (the hot path): record it."""
        rec = self.records.get(key)
        if rec is not None:
            if rec.state != _DOUBT and not (rec.state in (_STARTED, _DONE) and rec.address == worker):  # (cancel() may record it first)
                log.error("resilpool ledger: %s started on %s unchecked, but has a record (state %d)", key, worker, rec.state)
            return
        if worker not in self.scheduler.workers:
            return  # its worker left meanwhile: its start log tells (a _DOUBT record)
        self._start(key, owner, worker, pid, before)
        self.unchecked += 1

    def _start(self, key: str, owner: str, worker: str, pid: int, before: int) -> int:
        """Record the start of ``key`` on ``worker``; returns the starts there before it."""
        n = max(self.starts.get(worker, 0), before)
        self.records[key] = self.started[key] = _Rec(owner, _STARTED, worker, pid, n)
        self.live[worker] = self.live.get(worker, 0) + 1
        self.starts[worker] = n + 1
        max_tasks = self.owners.get(owner)
        if max_tasks is not None and n + 1 >= max_tasks:
            self._retire(worker, ExitReason.MAX_TASKS.value)  # no task after its N-th
        return n

    def pushed(self, key: str, owner: str, kind: int, elapsed: float, body: bytes, pid: int, worker: str = "") -> None:
        """An attempt's outcome, pushed by its worker ahead of its end: forward it to its client.

        Sent as a topic event straight down the client's stream (not kept in the
        scheduler's event log: it may be large and is of use to that client only).
        """
        comm = self.scheduler.client_comms.get(owner)
        if comm is None:
            return  # the client left: nobody waits for it
        event = {"op": "outcome", "key": key, "kind": kind, "elapsed": elapsed, "body": body, "pid": pid}
        try:
            comm.send({"op": "event", "topic": TOPIC_PREFIX + owner, "event": (time.time(), event)})
        except CommClosedError:
            pass  # the client is leaving (a core rebuild closes its old one): nobody waits for it

    async def cancel(self, keys: list[str], owner: str) -> list[str]:
        """Cancel those of ``keys`` that have not started; returns them.

        A key without a record may have started on a worker without our knowing yet (the
        hot path), and where Dask placed it is not always where a worker holds it (work
        stealing, a release still on its way): every worker is asked
        (:func:`~.worker.cancel_unstarted`) and records the start of those it had started.
        A key is cancelled only if every worker answered that it had not; a worker that
        cannot answer because it died answers through its start log, read once it is
        removed (waited for up to ``RPC_TIMEOUT_S``).

        Answers within ``CANCEL_BUDGET_S``; a key still undecided then is not cancelled
        (it may have started).  Callers wait longer than that, so that they get the keys
        decided rather than a timeout that counts every key as started.
        """
        out: list[str] = []
        deadline = time.monotonic() + CANCEL_BUDGET_S
        for _ in range(_CANCEL_ROUNDS):
            try:
                cancelled, keys = await asyncio.wait_for(self._cancel_round(keys, owner), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                # A round decides nothing before its last await: what it had not decided counts as started.
                log.warning("resilpool ledger: cancel() ran out of its %.0f s; %d key(s) undecided count as started", CANCEL_BUDGET_S, len(keys))
                break
            out += cancelled
            if not keys:
                break
            # Placed on a worker that joined after we asked (a nanny's restart, say): ask
            # again, that worker included, rather than count them as started.
        return out

    async def _doubts_settled(self, keys: list[str]) -> None:
        """Wait, up to ``RPC_TIMEOUT_S``, until none of ``keys`` is ``_DOUBT``: the start log
        of the worker each was placed on says whether it started there (its record becomes
        ``_DONE``) or not (its record is dropped)."""
        pending = {self.resolved[a] for k in keys if (r := self.records.get(k)) is not None and r.state == _DOUBT and (a := r.address) in self.resolved}
        if pending:
            try:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in pending)), RPC_TIMEOUT_S)
            except TimeoutError:
                pass  # the caller counts a key still in doubt as started

    async def _cancel_round(self, keys: list[str], owner: str) -> tuple[list[str], list[str]]:
        """One round of :meth:`cancel`: ``(cancelled, to ask again)``."""
        # A key placed on a worker that has just left is in doubt until that worker's start
        # log is read: settle it first, or a key that never started would count as started
        # (found by the Dask chaos suite, seed 1670075336: a rebuild failed a task that never ran).
        await self._doubts_settled(keys)
        out = []
        unknown = []
        again: list[str] = []
        for key in keys:
            rec = self.records.get(key)
            if rec is None:
                unknown.append(key)
            elif rec.state == _CANCELLED:
                out.append(key)
        if not unknown:
            return out, again
        workers = list(self.scheduler.workers)
        answers = await asyncio.gather(*(self._ask(w, unknown) for w in workers), return_exceptions=True)
        maybe_started: set[str] = set()
        silent = [(w, a) for w, a in zip(workers, answers) if isinstance(a, BaseException)]
        # A worker that cannot answer has usually just died: then its start log, read by its
        # nanny once the scheduler removes it, says exactly which keys it started.
        logs = await asyncio.gather(*(self._start_log_of(w) for w, _ in silent))
        for (worker, error), started_there in zip(silent, logs):
            if started_there is None:
                log.warning("resilpool ledger: could not ask %s which keys it started (%r), nor read its start log: none is cancelled", worker, error)
                maybe_started.update(unknown)  # it may have started any of them
            else:
                log.info("resilpool ledger: %s left before it could say which keys it started; its start log says", worker)
                maybe_started.update(k for k in unknown if k in started_there)
        for worker, answer in zip(workers, answers):
            if isinstance(answer, BaseException):
                continue
            _, started = answer
            for key, before in started.items():
                maybe_started.add(key)
                if key not in self.records and worker in self.scheduler.workers:
                    self._start(key, owner, worker, self.pids.get(worker) or 0, before)  # ahead of its message
        asked = set(workers)
        for key in unknown:
            rec = self.records.get(key)
            if rec is not None and rec.state == _DOUBT:
                again.append(key)  # its worker left while we asked: settled next round
                continue
            ws = getattr(self.scheduler.tasks.get(key), "processing_on", None)
            if ws is not None and ws.address not in asked:
                if key not in maybe_started and key not in self.records:
                    again.append(key)  # placed meanwhile on a worker that joined after we asked
                continue
            if key not in maybe_started and key not in self.records:
                self._cancelled(key, owner)
                out.append(key)
        return out, again

    async def _ask(self, worker: str, keys: list[str]) -> tuple[list[str], dict[str, int]]:
        """:func:`~.worker.cancel_unstarted` of ``keys`` on ``worker``: its answer.  Raises if
        it cannot answer, at once if it leaves meanwhile: asking a worker that was just
        killed can otherwise take the whole timeout (a connection to it is retried), and
        its start log will answer for it (:meth:`_start_log_of`)."""
        ask = asyncio.ensure_future(self._run_on(worker, cancel_unstarted, keys))
        left = self._start_log_future(worker)
        try:
            await asyncio.wait((ask, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not ask.done():
                ask.cancel()
        if ask.cancelled():
            raise ConnectionError(f"{worker} left the cluster before it answered")
        answer: tuple[list[str], dict[str, int]] = ask.result()
        return answer

    async def _start_log_of(self, worker: str) -> dict[str, int] | None:
        """The start log of ``worker`` once it has left and its nanny has read it; None if it
        does not leave within ``RPC_TIMEOUT_S`` or its log could not be read."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._start_log_future(worker)), RPC_TIMEOUT_S)
        except TimeoutError:
            return None

    def _start_log_future(self, worker: str) -> asyncio.Future[dict[str, int] | None]:
        """Resolved with the start log of ``worker`` once it has left (:meth:`_log_read`).
        Kept while the worker is in the cluster, and ``DEPARTED_KEEP_S`` after it left."""
        fut = self.start_logs.get(worker)
        if fut is None:
            fut = self.start_logs[worker] = asyncio.get_running_loop().create_future()
        return fut

    def _log_read(self, worker: str, log_: dict[str, int] | None) -> None:
        """Keep what the start log of ``worker``, which left, says (None: unreadable)."""
        fut = self._start_log_future(worker)
        if not fut.done():
            fut.set_result(log_)

    def _cancelled(self, key: str, owner: str) -> None:
        self.records[key] = _Rec(owner, _CANCELLED, None, None, 0)
        self._mark_checked(key)  # wherever it is placed from now on, its claim is refused

    def _mark_checked(self, key: str) -> None:
        ts = self.scheduler.tasks.get(key)
        if ts is not None:
            ts.annotations = {**(ts.annotations or {}), SYNC_ANNOTATION: True}

    async def _run_on(self, address: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on a worker's or a nanny's event loop (``address``); its result."""
        from distributed.protocol.pickle import dumps as _dumps

        dumps: Callable[[Any], bytes] = _dumps
        resp = await asyncio.wait_for(self.scheduler.rpc(address).run(function=dumps(fn), args=dumps(args), kwargs=dumps({})), RPC_TIMEOUT_S)
        if not isinstance(resp, dict) or resp.get("status") != "OK":
            raise RuntimeError(f"running {fn.__name__} on {address} failed: {resp!r}")
        return _value(resp["result"])

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()

    def status(self, owner: str, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        if progress is not None:
            self._keep_progress(owner, progress)
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
                    # (before our add_worker hook ran, the pid is still filed under its nanny)
                    "replaces": self.replaces.get(addr, self.replaced.get(ws.nanny) if ws.nanny else None),
                    "nthreads": ws.nthreads,
                    "status": ws.status.name,
                    "memory": metrics.get("memory"),
                    "cpu": metrics.get("cpu"),
                    "starts": self.starts.get(addr, 0),
                    "retiring": addr in self.retiring,
                    "running": running.get(addr, []),
                }
            )
        for addr in [a for a, (_, t) in self.departed.items() if now - t > DEPARTED_KEEP_S]:
            del self.departed[addr]
            self.start_logs.pop(addr, None)
        return {
            "workers": workers,
            # Workers removed whose departure is not published yet (their start logs are read).
            "leaving": list(self.resolved),
            "departed": {addr: why for addr, (why, _) in self.departed.items()},
        }

    def _keep_progress(self, owner: str, progress: dict[str, Any]) -> None:
        if owner not in self.owners:
            return  # unregistered meanwhile (a poll's message can trail its client's goodbye)
        try:
            label = str(progress.get("label", ""))[:200]
            functions: dict[str, list[int]] = {}
            for name, counts in list(progress["functions"].items())[:PROGRESS_MAX_FUNCTIONS]:
                values = [int(v) for v in counts]
                if len(values) != len(PROGRESS_FIELDS) or min(values) < 0:
                    raise ValueError(f"bad counts for {name!r}: {counts!r}")
                functions[str(name)[:200]] = values
        except (AttributeError, KeyError, TypeError, ValueError):
            log.warning("resilpool ledger: ignoring a malformed progress report from %s", owner, exc_info=True)
            return
        self.progress[owner] = (label, functions, time.monotonic())

    def progress_report(self) -> dict[str, Any]:
        """Every registered pool's progress: what ``/resilpool/progress.json`` serves.

        ``{"pools": [{"owner", "label", "updated_s_ago", "total": counts, "functions":
        {name: counts}}]}``; counts are :data:`PROGRESS_FIELDS` plus ``done`` (completed +
        failed + cancelled) and ``total`` (= submitted).
        """
        now = time.monotonic()
        pools = []
        for owner, (label, functions, at) in self.progress.items():
            sums = [0] * len(PROGRESS_FIELDS)
            named = {}
            for name, counts in functions.items():
                named[name] = _counts(counts)
                sums = [a + b for a, b in zip(sums, counts)]
            pools.append({"owner": owner, "label": label, "updated_s_ago": round(now - at, 3), "total": _counts(sums), "functions": named})
        return {"pools": pools}

    def retire(self, worker: str, reason: str) -> str:
        return self._retire(worker, reason)

    async def kill(self, worker: str | None, key: str | None, reason: str) -> str:
        if key is not None and key not in self.records:
            await self._confirm_start(key)  # its start message may still be on its way
        if worker is None and key is not None:  # wherever that attempt runs
            rec = self.started.get(key)
            if rec is None or rec.worker is None:
                return "finished"
            worker = rec.worker
        ws = self.scheduler.workers.get(worker) if worker is not None else None
        if ws is None or worker is None:
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
                if _value(answer.get("result")) == "gone":
                    self.marks.pop(worker, None)  # another process by now: its departure is not ours to name
                    return "gone"
                return "killed"
            self.marks.pop(worker, None)  # nothing was killed
            return f"kill failed: {answer!r}"
        # No nanny to kill it from outside: ask the scheduler to close it (a hung task may keep it).
        await self.scheduler.remove_worker(worker, close=True, stimulus_id=f"resilpool-kill-{time.time()}")
        return "removed"

    async def _confirm_start(self, key: str) -> None:
        """Ask the worker ``key`` is placed on whether it started there; if so, record it.

        The caller's code may have shown that a task runs (a file it wrote) before the
        worker's start message reached us: a kill for it must not find it not started.
        """
        ts = self.scheduler.tasks.get(key)
        ws = getattr(ts, "processing_on", None)
        placed = self.placed.get(key)
        if ws is None or placed is None:
            return
        try:
            started = await self._run_on(ws.address, started_here, [key])
        except Exception:
            log.warning("resilpool ledger: could not ask %s whether %s started", ws.address, key, exc_info=True)
            return
        if key in started and key not in self.records and ws.address in self.scheduler.workers:
            self._start(key, placed[1], ws.address, self.pids.get(ws.address) or 0, started[key])

    def register(self, owner: str, max_tasks: int | None = None) -> str:
        self.owners[owner] = max_tasks
        return "OK"

    def unregister(self, owner: str) -> str:
        self.owners.pop(owner, None)
        self.progress.pop(owner, None)
        return "OK"

    # --- hooks ---

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "processing":
            ts = self.scheduler.tasks.get(key)
            ws = getattr(ts, "processing_on", None)
            if ws is not None and self.owners:
                owner = next((cs.client_key for cs in ts.who_wants or () if cs.client_key in self.owners), None)
                if owner is not None:
                    self.placed[key] = (ws.address, owner)
            return
        placed = self.placed.pop(key, None) if start == "processing" else None
        rec = self.records.get(key)
        if finish == "forgotten":
            if rec is not None:
                self._bury(key, rec)
            return
        if finish in ("memory", "erred"):
            if rec is not None and rec.state == _STARTED:
                rec.state = _DONE
                del self.started[key]
            return
        if start not in ("processing", "memory") or (placed is None and rec is None):
            return
        # One of ours will be placed again (its worker left, or it was rescheduled or is
        # recomputed): from now on its start is checked (the annotation travels with it).
        self._mark_checked(key)
        leaving = [w for w in self.pids if w not in self.scheduler.workers] if rec is None and placed is not None else []
        if leaving and placed is not None:
            # Released while its worker is being removed (Scheduler.remove_worker releases
            # exactly the keys processing there), before we heard of its start, if it
            # started.  Work stealing moves keys without a transition, so the worker is
            # the one leaving, not necessarily where we saw it placed.
            owner = placed[1]
            address = placed[0] if placed[0] in leaving or len(leaving) > 1 else leaving[0]
            rec = self.records[key] = _Rec(owner, _DOUBT, None, self.pids.get(address), 0)
            rec.address = address
            self.doubts.setdefault(address, []).append(key)
            self.resolved.setdefault(address, asyncio.Event())

    def add_worker(self, scheduler: Any, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        pid = ws.pid if ws is not None else None
        nanny = ws.nanny if ws is not None else None
        self.pids[worker] = pid
        self.nannies[worker] = nanny
        replaces = self.replaced.pop(nanny, None) if nanny else None
        if replaces is not None:  # kept for status(): a client's poll may see this worker before the event
            self.replaces[worker] = replaces
        for owner in self.owners:
            scheduler.log_event(TOPIC_PREFIX + owner, {"op": "added", "worker": worker, "pid": pid, "replaces": replaces})

    def remove_worker(self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        pid = self.pids.pop(worker, None)
        nanny = self.nannies.pop(worker, None)
        self.replaces.pop(worker, None)
        reason = self.marks.pop(worker, None)
        self.departed[worker] = (reason, time.monotonic())
        self.retiring.discard(worker)
        self.restarting.discard(worker)
        starts = self.starts.pop(worker, 0)
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
        doubts = self.doubts.pop(worker, [])
        if doubts or (nanny and pid):
            task = asyncio.ensure_future(self._read_log(worker, pid, nanny, starts, doubts, lost, reason))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self._log_read(worker, None)
        if not doubts:
            self._removed(worker, pid, reason, lost)

    async def _read_log(self, worker: str, pid: int | None, nanny: str | None, starts: int, doubts: list[str], lost: dict[str, list[list[Any]]], reason: str | None) -> None:
        """Settle the ``_DOUBT`` keys of a worker that left from its start log (read and
        removed by its nanny), then publish its removal; without an answer, they count as
        started."""
        log_: dict[str, int] | None = None
        try:
            if nanny and pid:
                log_ = await self._run_on(nanny, read_start_log, pid)
        except Exception:
            if doubts:
                log.warning("resilpool ledger: could not read the start log of %s (pid %s): its %d unconfirmed attempt(s) count as started", worker, pid, len(doubts), exc_info=True)
        finally:
            now = time.monotonic()
            for key in doubts:
                rec = self.records.get(key)
                if rec is None or rec.state != _DOUBT:
                    continue  # forgotten meanwhile
                if log_ is None or key in log_:
                    rec.state = _DONE  # started there: lost with its worker; a claim is refused
                    self.log_started += log_ is not None
                    rec.before = log_[key] if log_ is not None else starts
                    lost.setdefault(rec.owner, []).append([key, rec.before, now - rec.t0])
                else:
                    del self.records[key]  # never started there: its rerun runs
                    self.log_unstarted += 1
            self._log_read(worker, log_)
            done = self.resolved.pop(worker, None)
            if done is not None:
                done.set()
            if doubts:
                self._removed(worker, pid, reason, lost)

    def _removed(self, worker: str, pid: int | None, reason: str | None, lost: dict[str, list[list[Any]]]) -> None:
        for owner in self.owners:
            self.scheduler.log_event(TOPIC_PREFIX + owner, {"op": "removed", "worker": worker, "pid": pid, "reason": reason, "lost": lost.get(owner, [])})

    def remove_client(self, scheduler: Any, client: str) -> None:
        # The scheduler forgets a departed client's keys; its tombstones expire as usual.
        self.owners.pop(client, None)
        self.progress.pop(client, None)

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
            if not await self._evacuate(worker):
                self.restarting.discard(worker)  # one started meanwhile: restarted once it ends
                return
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

    async def _evacuate(self, worker: str) -> bool:
        """Before a retiring worker is restarted: move the owners' keys placed there that
        have not started to other workers; False if one had started after all.

        Dask counts a key processing on a worker that dies against it (``KilledWorker``
        after ``allowed-failures`` + 1); a restart is no fault of those keys, and with
        short lifetimes a key could be placed on several retiring workers in a row.  The
        worker cancels them first (so none starts there), then Dask reschedules them.
        """
        ws = self.scheduler.workers.get(worker)
        keys = [ts.key for ts in getattr(ws, "processing", ()) if ts.key in self.placed and ts.key not in self.records]
        if not keys:
            return True
        cancelled, started = await self._run_on(worker, cancel_unstarted, keys)
        for key, before in started.items():
            owner = self.placed.get(key, ("", ""))[1]
            if key not in self.records and owner and worker in self.scheduler.workers:
                self._start(key, owner, worker, self.pids.get(worker) or 0, before)
        stimulus_id = f"resilpool-evacuate-{time.time()}"
        for key in cancelled:
            self.scheduler._reschedule(key, worker, stimulus_id=stimulus_id)
        return not started


def _value(result: Any) -> Any:
    """A ``run`` answer's result (the scheduler's connections do not deserialize)."""
    from distributed.protocol.serialize import Serialized, deserialize

    if isinstance(result, Serialized):
        return deserialize(result.header, result.frames)  # type: ignore[no-untyped-call]
    return result


# --- the progress page, on the scheduler's HTTP server (the dashboard's) ------------------


def _counts(values: list[int]) -> dict[str, int]:
    out = dict(zip(PROGRESS_FIELDS, values))
    out["done"] = out["completed"] + out["failed"] + out["cancelled"]
    out["total"] = out["submitted"]
    return out


def _report(scheduler: Any) -> dict[str, Any]:
    ledger = scheduler.plugins.get(LEDGER_NAME)  # looked up at each request: whichever is registered
    return ledger.progress_report() if isinstance(ledger, AttemptLedger) else {"pools": []}


class _ProgressJson(web.RequestHandler):
    """``GET /resilpool/progress.json``: :meth:`AttemptLedger.progress_report` as JSON."""

    def initialize(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(_report(self.scheduler)))


class _ProgressPage(web.RequestHandler):
    """``GET /resilpool``: each pool's progress per function, as bars; reloads every 2 s."""

    def initialize(self, scheduler: Any, json_url: str) -> None:
        self.scheduler = scheduler
        self.json_url = json_url

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(render_progress(_report(self.scheduler), self.json_url))


_PAGE_HEAD: Final = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>resilpool progress</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h2{font-size:15px;margin:1.5em 0 .3em}h2 small{color:#777;font-weight:normal}
table{border-collapse:collapse}th,td{padding:3px 8px;text-align:right}th{color:#555;font-weight:normal}
td.name{text-align:left;font-family:monospace}
.bar{display:flex;width:300px;height:12px;background:#e8e8e8;border-radius:2px;overflow:hidden}
.ok{background:#43a047}.failed{background:#e53935}.cancelled{background:#9e9e9e}.running{background:#1e88e5}
</style></head><body>
<h1>resilpool: pools on this scheduler</h1>
<p>Every task each pool was given, queued in the pool or in flight on Dask; bars: completed,
failed, cancelled, running. Reloads every 2 s; the same as JSON at <a href="{json_url}">progress.json</a>.</p>
"""


def render_progress(report: dict[str, Any], json_url: str) -> str:
    """The ``/resilpool`` page of a :meth:`AttemptLedger.progress_report` (no external assets)."""
    parts = [_PAGE_HEAD.replace("{json_url}", html.escape(json_url))]  # (CSS braces: no str.format)
    if not report["pools"]:
        parts.append("<p>No pool is connected.</p>")
    for pool in report["pools"]:
        parts.append(f"<h2>{html.escape(pool['label'])} <small>{html.escape(pool['owner'])}, updated {pool['updated_s_ago']:.1f} s ago</small></h2>")
        parts.append("<table><tr><th></th><th>done / total</th><th></th>" + "".join(f"<th>{f}</th>" for f in PROGRESS_FIELDS[1:]) + "</tr>")
        for name, c in [("all functions", pool["total"]), *sorted(pool["functions"].items())]:
            total = max(1, c["total"])
            segments = "".join(
                f'<span class="{cls}" style="width:{100 * c[field] / total:.2f}%"></span>'
                for cls, field in (("ok", "completed"), ("failed", "failed"), ("cancelled", "cancelled"), ("running", "running"))
                if c[field]
            )
            cells = "".join(f"<td>{c[f]}</td>" for f in PROGRESS_FIELDS[1:])
            parts.append(f'<tr><td class="name">{html.escape(name)}</td><td>{c["done"]} / {c["total"]}</td><td><div class="bar">{segments}</div></td>{cells}</tr>')
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _routes(router: Any, seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    """``(path pattern, handler class)`` of every route under a tornado router."""
    seen = set() if seen is None else seen
    if id(router) in seen:
        return
    seen.add(id(router))
    for rule in getattr(router, "rules", ()):
        target = rule.target
        if isinstance(target, type):
            pattern = getattr(getattr(rule.matcher, "regex", None), "pattern", None)
            if isinstance(pattern, str):
                yield pattern, target
        else:
            yield from _routes(target, seen)


def add_progress_routes(scheduler: Any) -> bool:
    """Serve ``/resilpool`` and ``/resilpool/progress.json`` on the scheduler's HTTP server
    (the dashboard's, under its prefix); False if it has none. Once per scheduler."""
    app = getattr(scheduler, "http_application", None)
    if app is None:
        return False
    routes = list(_routes(app.default_router))
    if any(target in (_ProgressJson, _ProgressPage) for _, target in routes):
        return True  # a ledger registered before (the plugin was replaced): the routes look it up
    # The dashboard's prefix (``--dashboard-prefix``) is not kept by the scheduler: read it
    # off distributed's own /health route.
    prefix = next((p[: -len("health$")] for p, _ in routes if p.endswith("/health$")), "/")
    json_url = prefix + "resilpool/progress.json"
    app.add_handlers(
        r".*",
        [
            (json_url, _ProgressJson, {"scheduler": scheduler}),
            (prefix + "resilpool/?", _ProgressPage, {"scheduler": scheduler, "json_url": json_url}),
        ],
    )
    return True
