"""Dask worker side: the Dask task of one attempt, and what it raises.

Runs in a Dask worker process (imported there by name when the first attempt
arrives; the cluster must be able to import resilpool).  :func:`run_attempt` records
the attempt's start before it unpickles the call, so a key Dask reruns after its
worker died is refused instead of run again.  Two ways, chosen per key:

- **the hot path** (a key's first placement): the start is written to this process's
  *start log* (a local file, :func:`start_log_path`; it outlives the process, and the
  nanny reads it after a death) and sent to the ledger as a stream message; the call
  runs at once, without waiting for the scheduler;
- **the checked path** (the ledger marked the key ``SYNC_ANNOTATION``: Dask reruns it
  after a worker died or left, or the pool cancelled it, or this worker is not in
  ``running`` state, or its ``max_tasks`` is at hand): a claim request, waited for,
  which may refuse the start.

:func:`cancel_unstarted` runs on the worker's event loop (the ledger asks it, to cancel
keys already placed here); :func:`read_start_log` and :func:`kill_worker_process` run
on a nanny.  Module state (``_INITIALIZED``, ``_INIT_FAILED``, the start records below)
belongs to the worker process; the start records are read and written under
``_LOCK`` only (task threads and the event loop thread), never while user code runs.
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any, Final

import distributed

from .. import protocol as P
from .. import worker as worker_module
from . import CLAIM_OP, PUSH_MAX_BYTES, PUSH_OP, RPC_TIMEOUT_S, SYNC_ANNOTATION

__all__ = [
    "AttemptRefused",
    "ClaimFailed",
    "InitializerFailed",
    "cancel_unstarted",
    "kill_worker_process",
    "read_start_log",
    "run_attempt",
    "start_log_path",
    "started_here",
]

_SUCCEEDED: Final = int(P.Kind.SUCCEEDED)
_FAILED: Final = int(P.Kind.FAILED)


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

# Start records of this worker process, under _LOCK.  Invariant: a key in _RECENT or in
# the start log has started here (its call may have run); a key in _CANCELLED never
# starts here.  A key is in at most one of them.
_LOCK = threading.Lock()
_RECENT: dict[str, int] = {}  # keys started here -> starts before each, oldest first (the last _RECENT_MAX)
_CANCELLED: dict[str, None] = {}  # keys the ledger cancelled here before any start
_RECENT_MAX: Final = 4096
_starts = 0  # attempts started in this process (every pool's): the ledger's count for max_tasks
_log_fd: int | None = None


def start_log_path(pid: int) -> str:
    """The start log of worker process ``pid``: one ``<key> <before>`` line per start."""
    return os.path.join(tempfile.gettempdir(), f"resilpool-starts-{pid}")


def _record_start(key: str) -> int:
    """Record that ``key`` starts here now (under ``_LOCK``); returns the starts before it.

    The line reaches the kernel before the call runs, so it survives a SIGKILL of this
    process; it stays after the process ends, until the nanny reads it (the scheduler may
    not have heard how the last calls ended).  The log keeps the last ``_RECENT_MAX`` starts (compacted when older ones are
    evicted): a start whose claim the scheduler has not received yet is among them.
    """
    global _starts, _log_fd
    before = _starts
    _starts += 1
    _RECENT[key] = before
    path = start_log_path(os.getpid())
    if _log_fd is None:  # the first start in this process: a log left by an earlier process of this pid is dropped
        _log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
    if len(_RECENT) > _RECENT_MAX:
        for old in list(_RECENT)[: _RECENT_MAX // 2]:
            del _RECENT[old]
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(f"{k} {n}\n" for k, n in _RECENT.items())  # this key included
        os.replace(tmp, path)
        os.close(_log_fd)
        _log_fd = os.open(path, os.O_WRONLY | os.O_APPEND, 0o600)
    else:
        os.write(_log_fd, f"{key} {before}\n".encode())
    return before


def _remove_log(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def cancel_unstarted(keys: Iterable[str], dask_worker: Any = None) -> tuple[list[str], dict[str, int]]:
    """Run on a worker's event loop: cancel those of ``keys`` that have not started here.

    Returns ``(cancelled, started)``: from now on :func:`run_attempt` refuses each
    cancelled key on this worker; the started ones (-> the starts before each) may be
    running or done.
    """
    cancelled: list[str] = []
    started: dict[str, int] = {}
    with _LOCK:
        for key in keys:
            before = _RECENT.get(key)
            if before is None:
                _CANCELLED[key] = None
                cancelled.append(key)
            else:
                started[key] = before
        while len(_CANCELLED) > _RECENT_MAX:
            del _CANCELLED[next(iter(_CANCELLED))]
    return cancelled, started


def started_here(keys: Iterable[str], dask_worker: Any = None) -> dict[str, int]:
    """Run on a worker's event loop: those of ``keys`` that have started here (-> the starts
    before each), whether or not their start message has reached the scheduler yet."""
    with _LOCK:
        return {key: before for key in keys if (before := _RECENT.get(key)) is not None}


def read_start_log(pid: int, dask_worker: Any = None) -> dict[str, int]:
    """Run on a nanny after its worker process ``pid`` left: the keys it started (with the
    starts before each), read from its start log, which is then removed."""
    path = start_log_path(pid)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    _remove_log(path)
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, before = line.partition(" ")
        if key:
            out[key] = int(before) if before.isdigit() else 0
    return out


def _checked(worker: Any, key: str, max_tasks: int | None) -> bool:
    """Must this start be claimed from the ledger before the call runs?"""
    ts = worker.state.tasks.get(key)
    annotations = getattr(ts, "annotations", None) or {}
    if annotations.get(SYNC_ANNOTATION):
        return True  # a rerun, or cancelled: the ledger decides
    if getattr(getattr(worker, "status", None), "name", "running") != "running":
        return True  # retiring or closing: the ledger reschedules it
    return max_tasks is not None and _starts + 1 >= max_tasks  # the N-th start retires the worker


def run_attempt(
    key: str, body: bytes, *, owner: str, init: bytes | None = None, init_token: str = "", max_tasks: int | None = None
) -> tuple[int, float, bytes | None, int]:
    """The Dask task of one attempt: record its start, then run the call; runs in a Dask worker.

    Returns ``(kind, elapsed_s, body, pid)``: kind SUCCEEDED with the pickled result, or
    FAILED with an error payload, as a local worker's result frame.  A body of at most
    ``PUSH_MAX_BYTES`` is pushed to the client ahead (:func:`_push`) and the task's
    value carries ``None`` in its place, so the client need not fetch it.
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
    if _checked(worker, key, max_tasks):
        try:
            claim = worker.scheduler.resilpool_claim
            reply = distributed.utils.sync(worker.loop, claim, key=key, owner=owner, worker=address, pid=pid, before=_starts, callback_timeout=RPC_TIMEOUT_S)
        except Exception as exc:
            raise ClaimFailed(f"could not record the start of {key} on the scheduler: {type(exc).__name__}: {exc}") from exc
        op = reply.get("op") if isinstance(reply, dict) else None
        if op == "reschedule":  # this worker is retiring: run elsewhere (nothing started)
            raise distributed.Reschedule()
        if op != "run":
            if op in ("refused", "cancelled"):
                raise AttemptRefused(key, "started" if op == "refused" else "cancelled", reply.get("worker"), reply.get("pid"), reply.get("before", 0), reply.get("elapsed", 0.0))
            raise ClaimFailed(f"unexpected answer from the resilpool ledger: {reply!r}")
        with _LOCK:
            _CANCELLED.pop(key, None)
            _record_start(key)
    else:
        with _LOCK:
            if key in _CANCELLED:
                del _CANCELLED[key]
                raise AttemptRefused(key, "cancelled")
            before = _record_start(key)
        msg = {"op": CLAIM_OP, "key": key, "owner": owner, "pid": pid, "before": before}
        worker.loop.add_callback(worker.batched_stream.send, msg)  # ahead of the outcome, on the same stream
    # Started: from here on this attempt is never run again.
    t0 = time.perf_counter()
    try:
        try:
            fn, args, kwargs = pickle.loads(body)
        except BaseException as exc:
            raise worker_module._unpickling_error(exc, _task_id(key)) from exc
        value = fn(*args, **kwargs)
    except BaseException as exc:
        return _push(worker, key, owner, _FAILED, time.perf_counter() - t0, P.error_payload(exc), pid)
    elapsed = time.perf_counter() - t0
    try:
        try:
            out = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception:
            out = worker_module._dumps_by_value(value)  # as a local worker: e.g. a notebook class
    except BaseException as exc:
        return _push(worker, key, owner, _FAILED, elapsed, P.error_payload(worker_module._result_pickling_error(exc, _task_id(key))), pid)
    return _push(worker, key, owner, _SUCCEEDED, elapsed, out, pid)


def _push(worker: Any, key: str, owner: str, kind: int, elapsed: float, body: bytes, pid: int) -> tuple[int, float, bytes | None, int]:
    """Send a small outcome to the client ahead of the task's end; the task's value then omits it.

    The message goes on the worker's stream to the scheduler, where the ledger forwards it
    to the owner's client (``AttemptLedger.pushed``), before the worker reports the task
    finished on the same stream: the client has the outcome before the key is done, with
    no request to fetch it.  A large body stays the task's value (fetched as Dask does).
    """
    stream = getattr(worker, "batched_stream", None)
    if len(body) > PUSH_MAX_BYTES or stream is None:
        return kind, elapsed, body, pid
    msg = {"op": PUSH_OP, "key": key, "owner": owner, "kind": kind, "elapsed": elapsed, "body": body, "pid": pid}
    worker.loop.add_callback(stream.send, msg)
    return kind, elapsed, None, pid


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
