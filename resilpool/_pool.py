"""ResilientPool: the ``concurrent.futures.Executor`` facade that wires the parts.

::

    ResilientPool ── submit/map ──> Core (manager thread, workers)   resilpool._core.executor
         │                            ^   │ events
         │                  seams     │   v
         ├── Monitor (sampling thread) ┘   EventBus thread ──> logging, listeners
         └── rebuild: when a Core breaks, a new Core adopts its unresolved tasks

The pool owns the current core reference (``_core``, swapped under
``_core_lock`` on a rebuild), the monitor and the event bus.  Callers'
threads pickle their task and hand it to the core; everything about running it
belongs to the core's manager thread.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.context
import os
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Final, ParamSpec, TypeVar, cast, final, overload

from . import errors
from ._core import executor as _exec
from ._core.commands import Backend, CoreLike, MonitorLike
from ._core.executor import CoreConfig
from ._core.tasks import CoreCounts, copy_error, error_type_name, outcome
from ._core.serialization import Serializer, serialize_task
from ._core.worker import call_chunk
from .events import CoreRebuilt, DurationHistogram, Event, PoolStats, WorkerInfo
from .retry import RetryPolicy, RetrySpec
from .supervisor.breaker import Breaker, CrashLoopBreaker
from .supervisor.limits import Limits
from .supervisor.monitor import Monitor

__all__ = ["ResilientPool", "TaskOptions"]

log = logging.getLogger("resilpool")

P = ParamSpec("P")
R = TypeVar("R")
#: ``set_task_wrapper``'s hook: (fn, args, kwargs) -> the call actually sent.
TaskWrapper = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]

_LIVE_POOLS: weakref.WeakSet[ResilientPool] = weakref.WeakSet()
# A future's tag (for abort()) is one int: its pool's serial << _TAG_BITS | its task id.
# An int, not a (pool, id) tuple: no allocation the garbage collector tracks, per task.
_TAG_BITS: Final = 48
_POOL_SERIALS = itertools.count(1)
# A lazy map's read-ahead, per worker: items (twice the deepest pipelining of tiny tasks,
# MAX_DEPTH = 256, so a worker's queue stays full while the consumer catches up), and at
# least this many chunks, so that each worker has chunks queued behind the running one and
# the window is topped up (one hand-over, one wake-up of the manager) every few chunks
# rather than after each one. More items than that only cost: each in-flight task holds a
# future, and thousands of them outlive the garbage collector's young generations.
# 32 chunks, not 8: while the consuming thread runs through a chunk's items it holds the
# GIL, and the manager thread waits for it (up to the 5 ms switch interval) before it can
# read a result or send a task; the workers must have that much work queued meanwhile
# (map at chunksize 1000, 100,000 items: 6.0M items/s with 8 chunks, 7.1M with 32).
# And at most this many bytes of pickled inputs in flight, so that large items do not
# make a large window (the stdlib and multiprocessing.Pool read the whole input at once).
_MAP_WINDOW_ITEMS_PER_WORKER = 512
_MAP_WINDOW_CHUNKS_PER_WORKER = 32
_MAP_WINDOW_BYTES_PER_WORKER = 16 << 20
_MAP_HAND_OVER_PER_WORKER = 2  # chunks handed over at a time while filling: the first start at once
# shutdown(timeout=...): a core still alive this long after the deadline (one that does not
# give up by itself: Dask) is told to kill what runs; this long after that, shutdown returns.
_ESCALATE_AFTER_S = 5.0
_GIVE_UP_WAIT_S = 30.0


def _default_workers() -> int:
    if hasattr(os, "process_cpu_count"):  # 3.13+
        n = os.process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS
        n = os.cpu_count()
    return max(1, n or 1)


def _resolve_context(mp_context: multiprocessing.context.BaseContext | str | None, *, local: bool = True) -> multiprocessing.context.BaseContext:
    """The context the pool's workers start from; with ``local`` (the workers are this
    process's) a forkserver is also launched now (:func:`_start_forkserver`)."""
    if mp_context is None:
        mp_context = "forkserver" if sys.platform.startswith("linux") else "spawn"
    if isinstance(mp_context, str):
        ctx = multiprocessing.get_context(mp_context)
    else:
        ctx = mp_context
    if ctx.get_start_method() == "forkserver":
        _preload_worker_module(ctx)
        if local:
            _start_forkserver()
    return ctx


#: What the forkserver imports once so that no forked worker imports it again: the worker
#: module, and what unpickling a worker's arguments imports in every worker otherwise:
#: popen_forkserver for the file descriptors of the pipes and of the slot table.
_FORKSERVER_PRELOAD = ("multiprocessing.popen_forkserver", "resilpool._core.worker")


def _preload_worker_module(ctx: multiprocessing.context.BaseContext) -> None:
    # Workers start faster when the forkserver has imported their modules already.
    # Append to (never replace) the user's preload list; effective only before it starts.
    try:
        from multiprocessing import forkserver

        mods = list(forkserver._forkserver._preload_modules)  # type: ignore[attr-defined]
        missing = [m for m in _FORKSERVER_PRELOAD if m not in mods]
        if missing:
            ctx.set_forkserver_preload(mods + missing)
    except Exception:  # pragma: no cover - private API moved: only slower starts
        pass


def _start_forkserver() -> None:
    """Start the forkserver now, if it is not running, without waiting for it.

    Its boot (a fresh interpreter importing what it preloads, ~50-90 ms of CPU) is the
    longest step before a first result; begun here, first thing in the constructor, it
    overlaps the rest of the pool's set-up instead of following it. The stdlib call
    only launches the server (and the resource tracker) and returns; the first
    ``Process.start()`` waits for it. A failure here is not raised: that first start
    meets it again and reports it as a start-up failure, with the breaker's accounting.
    """
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    except Exception:
        log.debug("resilpool could not start the forkserver early; the first worker start will", exc_info=True)


class _NoMonitor:
    """Stands in for the Monitor when sampling is off (``monitor_interval=None``)."""

    samples: dict[int, Any] = {}
    peak_rss = 0

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 0.0) -> None:
        pass


class _EventBus:
    """Delivers events to logging and listeners on its own thread, in order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._listeners: list[Callable[[Event], object]] = []
        self._thread = threading.Thread(target=self._run, name=f"{name}-events", daemon=True)
        self._thread.start()

    def emit(self, event: Event) -> None:
        self._queue.put(event)

    def add(self, fn: Callable[[Event], object]) -> None:
        self._listeners = [*self._listeners, fn]

    def remove(self, fn: Callable[[Event], object]) -> None:
        self._listeners = [f for f in self._listeners if f is not fn]

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            for fn in self._listeners:
                try:
                    fn(event)
                except BaseException:  # SystemExit too: the event thread goes on, later events arrive
                    log.error("resilpool listener %r raised on %r", fn, event, exc_info=True)


@final
class ResilientPool(Executor):
    """A supervised process pool where a dead worker costs only its own task.

    Args:
        max_workers: worker processes; default the CPUs this process may use.
        mp_context: a multiprocessing context or start method name; default
            ``"forkserver"`` on Linux, ``"spawn"`` elsewhere.
        initializer: called with ``initargs`` in each worker before its first task. If it
            keeps failing, the crash-loop breaker breaks the pool with ``CrashLoopError``.
        max_tasks_per_child: the stdlib's name for ``Limits.max_tasks``: a worker is replaced
            after this many tasks. Give it here or in ``limits``, not both differently.
        limits: :class:`Limits` for memory, task count, lifetime, timeouts and stalls.
        retry: default ``retry=`` for every task (None: tasks run at most once).
        breaker: :class:`Breaker` settings (crash-loop breaker, poison quarantine).
        monitor_interval: seconds between two samples of the workers (psutil).
        serializer: ``"auto"`` (stdlib pickle; cloudpickle for lambdas, local functions and
            functions of an interactive ``__main__``, when installed), ``"pickle"`` or
            ``"cloudpickle"``.
        backend: where tasks run; None for local worker processes, or
            ``resilpool.dask.DaskBackend(...)`` for a Dask cluster (same API and semantics).
        shutdown_timeout: the default ``timeout`` of :meth:`shutdown` (so also of ``with``
            and of the shutdown at interpreter exit): seconds to wait for the submitted
            work before the running tasks are killed and the rest cancelled. None (the
            default): wait as long as it takes, as the standard library does.

    Futures are plain :class:`concurrent.futures.Future`; a task's exception carries
    the worker's traceback as ``__cause__``, as with the standard library. The first
    four parameters and ``max_tasks_per_child`` are the stdlib's, in its order; where
    resilpool behaves differently, docs/failures.md says how and why.

    Raises:
        ValueError: ``max_workers`` < 1 ("max_workers must be greater than 0"), a bad
            ``max_tasks_per_child``, or one that conflicts with ``limits.max_tasks``.
        TypeError: a non-callable ``initializer``, or a wrong type for another argument.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: multiprocessing.context.BaseContext | str | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        limits: Limits | None = None,
        retry: RetrySpec = None,
        breaker: Breaker | None = None,
        monitor_interval: float | None = 0.2,
        serializer: Serializer = "auto",
        backend: Backend | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        if backend is None and multiprocessing.current_process().daemon:
            # A daemonic process may not have children: every worker would fail at start-up.
            raise RuntimeError(
                "ResilientPool cannot start worker processes inside a daemonic process (for example a"
                " multiprocessing.Pool worker); create the pool in the main process, or in a"
                " non-daemonic multiprocessing.Process(daemon=False)"
            )
        if max_workers is None:
            max_workers = _default_workers()
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise ValueError(f"max_workers must be an int > 0 or None, got {max_workers!r}")
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")  # the stdlib's words
        if limits is None:
            limits = Limits()
        elif not isinstance(limits, Limits):
            raise TypeError(f"limits must be a resilpool.Limits, got {limits!r}")
        limits = _merge_max_tasks(limits, max_tasks_per_child)
        if breaker is None:
            breaker = Breaker()
        elif not isinstance(breaker, Breaker):
            raise TypeError(f"breaker must be a resilpool.Breaker, got {breaker!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, got {initializer!r}")
        if monitor_interval is None:
            if limits.needs_monitor(ignore_default_floor=True):
                raise ValueError("monitor_interval=None turns sampling off, but these limits need it: " + ", ".join(limits.sampled_fields()))
        elif isinstance(monitor_interval, bool) or not isinstance(monitor_interval, (int, float)) or not monitor_interval > 0:
            raise ValueError(f"monitor_interval must be > 0 seconds or None, got {monitor_interval!r}")
        self._shutdown_timeout = _check_shutdown_timeout("shutdown_timeout", shutdown_timeout)
        self._shutdown_deadline: float | None = None  # monotonic; the earliest a shutdown asked for
        if serializer not in ("auto", "pickle", "cloudpickle"):
            raise ValueError(f"serializer must be 'auto', 'pickle' or 'cloudpickle', got {serializer!r}")
        self._serializer: Serializer = serializer
        # First: it starts the forkserver booting (not for a backend: its workers are not ours).
        self._ctx = _resolve_context(mp_context, local=backend is None)
        self._fork = self._ctx.get_start_method() == "fork"
        # Test seam (resilpool.testing): maps (fn, args, kwargs) to the call actually sent.
        self._task_wrapper: TaskWrapper | None = None
        if self._ctx.get_start_method() != "fork":
            _check_picklable(initializer, initargs)
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._limits = limits
        self._retry = RetryPolicy.coerce(retry)
        self._breaker = breaker
        self._ids = itertools.count(1)
        self._tag_base = next(_POOL_SERIALS) << _TAG_BITS  # tags this pool's futures (abort() ignores other pools')
        self._rejected = 0
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        self._core_lock = threading.Condition()
        self._carried = CoreCounts()  # counters of the cores a rebuild replaced
        self._rebuilds = 0
        self._rebuild_breaker = CrashLoopBreaker(5, 60.0)
        self._events = _EventBus("resilpool")
        self._backend = backend
        self._monitor_interval = monitor_interval
        b = breaker
        self._config = CoreConfig(
            max_workers=max_workers,
            mp_context=self._ctx,
            initializer=initializer,
            initargs=self._initargs,
            max_tasks_per_worker=limits.max_tasks,
            soft_max_rss=None if limits.soft_max_rss is None else int(limits.soft_max_rss),
            max_startup_failures=b.max_failures if b.max_failures is not None else max(3, 2 * max_workers),
            startup_window_s=b.window,
            quarantine_after=b.quarantine_after,
            monitor_interval=None if monitor_interval is None else float(monitor_interval),
            cgroup=limits.cgroup,
            init_timeout_s=limits.init_timeout,
            # A worker holding a task it has not started, silent this long, is stalled.
            ack_timeout_s=limits.stall_timeout if limits.stall_timeout is not None else 5.0,
        )
        try:
            self._core = self._new_core()
        except BaseException:
            self._events.close()  # a backend that cannot start must not leak the event thread
            raise
        # A backend samples its own workers (they are not our children); locally, the Monitor does.
        self._monitor: MonitorLike
        if backend is not None:
            self._monitor = backend.make_monitor(self)
        elif monitor_interval is None:
            self._monitor = _NoMonitor()
        else:
            self._monitor = Monitor(lambda: self._core, limits, float(monitor_interval))
        self._monitor.start()
        self._owner_pid = os.getpid()  # a forked child inherits the pool, not its threads
        _LIVE_POOLS.add(self)

    # --- construction of cores (also on rebuild) ----------------------------------------

    def _new_core(self) -> CoreLike:
        on_broken = _rebuild_hook(weakref.ref(self))
        if self._backend is None:
            return _exec.Core(self._config, emit=self._events.emit, on_broken=on_broken)
        return self._backend.make_core(
            self._config, emit=self._events.emit, on_broken=on_broken, limits=self._limits, serializer=self._serializer
        )

    def _rebuild(self, old: CoreLike, exc: BaseException) -> None:
        # Runs on the failed core's manager thread.
        if self._rebuild_breaker.record_failure(time.monotonic()):
            raise RuntimeError("the core broke more than 5 times within 60s; not rebuilding again") from exc
        with self._core_lock:
            new = self._new_core()
            unstarted, interrupted = old.salvage()
            self._carried = self._carried + _core_counts(old)
            new.adopt(unstarted, interrupted)
            if self._shutdown:
                deadline = self._shutdown_deadline
                new.shutdown(cancel_futures=False, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            self._core = new
            self._rebuilds += 1
            self._core_lock.notify_all()
        failed = sum(1 for t in interrupted if t.retry is None)
        log.error(
            "resilpool rebuilt its core after %s: %d tasks carried over",
            type(exc).__name__,
            len(unstarted) + len(interrupted) - failed,
            extra=outcome("rebuild"),
        )
        self._events.emit(CoreRebuilt(cause=f"{type(exc).__name__}: {exc}", carried_over=len(unstarted) + len(interrupted) - failed, failed=failed))

    # --- Executor API -----------------------------------------------------------------

    # Typing: the first overload is typeshed's Executor.submit, so a call is checked against
    # fn's own signature. A ParamSpec admits no extra keyword beside P.kwargs, so a call with
    # ``retry=`` matches the second overload, whose arguments are not checked; the checked
    # spelling of a retry is ``pool.options(retry=2).submit(fn, x)`` (docs/retry.md).
    @overload
    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]: ...

    @overload  # mypy deems it shadowed by the first; tests/typing shows a retry= call matches it
    def submit(self, fn: Callable[..., R], /, *args: Any, retry: RetrySpec, **kwargs: Any) -> Future[R]: ...  # type: ignore[overload-cannot-match]

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)``; return its future.

        Args:
            retry: retries after a failure (int >= 0 or :class:`RetryPolicy`); marks the task
                idempotent. None: the pool's default. ``submit`` consumes this keyword: wrap a
                function with its own ``retry`` parameter in ``functools.partial``.

        Raises:
            RuntimeError: after :meth:`shutdown` or once the interpreter is exiting.
            CrashLoopError: the crash-loop breaker has broken the pool.
        """
        retry: RetrySpec = kwargs.pop("retry", None) if kwargs else None
        policy = self._retry if retry is None else RetryPolicy.coerce(retry)
        return self._submit(fn, args, kwargs, policy, None)

    def _make_task(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], policy: RetryPolicy | None, timeout: float | None) -> tuple[Future[Any], _exec.Task | None]:
        if (self._shutdown or _global_shutdown) and (refused := _shut_down_error(self)) is not None:
            raise refused
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        task_id = next(self._ids)
        fut: Future[Any] = Future()
        fut._resilpool_task = self._tag_base | task_id  # type: ignore[attr-defined]  # for abort(): no cycle, no lookup table
        target = args[0] if fn is call_chunk else fn
        sent_fn, sent_args, sent_kwargs = fn, args, kwargs
        if self._task_wrapper is not None:
            sent_fn, sent_args, sent_kwargs = self._task_wrapper(fn, args, kwargs)
        try:
            body = serialize_task(task_id, sent_fn, sent_args, sent_kwargs, self._serializer, fork=self._fork, target=target)
        except errors.SerializationError as exc:
            self._rejected += 1
            fut.set_exception(exc)
            return fut, None
        return fut, _exec.Task(task_id, fn, args, kwargs, body, fut, policy, timeout)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], policy: RetryPolicy | None, timeout: float | None) -> Future[Any]:
        fut, task = self._make_task(fn, args, kwargs, policy, timeout)
        if task is not None:
            self._hand_over([task])
        return fut

    def _hand_over(self, tasks: list[_exec.Task]) -> None:
        while True:
            core = self._core
            if core.broken is not None:
                raise copy_error(core.broken)
            try:
                if len(tasks) == 1:
                    core.submit(tasks[0])
                else:
                    core.submit_many(tasks)
                return
            except _exec.CoreGone:
                if core.broken is not None:
                    raise copy_error(core.broken) from None
                if core is self._core and (refused := _shut_down_error(self)) is not None:
                    raise refused from None
                with self._core_lock:  # a rebuild is under way: wait for the new core
                    self._core_lock.wait_for(lambda: self._core is not core, timeout=1.0)

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        retry: RetrySpec = None,
    ) -> Iterator[R]:
        """Lazy, ordered ``map``: reads its inputs as work is needed, with bounded read-ahead.

        Closing or dropping the returned iterator cancels the work not yet started.
        With ``chunksize > 1`` a chunk is one task: it is retried, or fails, as a whole.
        """
        policy = self._retry if retry is None else RetryPolicy.coerce(retry)
        return _start_map(self, fn, iterables, timeout, chunksize, policy, None)

    def options(self, *, task_timeout: float | None = None, retry: RetrySpec = None) -> TaskOptions:
        """A view of the pool whose ``submit``/``map`` give each task these options.

        Example: ``pool.options(task_timeout=30, retry=2).submit(fn, x)``.
        """
        if task_timeout is not None:
            task_timeout = Limits(task_timeout=task_timeout).task_timeout
        return TaskOptions(self, task_timeout, RetryPolicy.coerce(retry) if retry is not None else self._retry)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, kill_running: bool = False, timeout: float | None = None) -> None:
        """Stop accepting tasks; finish (or with ``cancel_futures`` cancel) the queued ones.

        Args:
            wait: return once every worker and thread of the pool has exited. Called
                from a done-callback (the manager thread) it does not wait.
            cancel_futures: tasks not started yet never run: first attempts are
                cancelled; retries (waiting for their backoff or queued) fail with the
                error of their last attempt and a note; a task failing later is not retried.
            kill_running: kill the workers running a task now; those tasks fail with
                :class:`WorkerCrashedError` (never retried). Tasks they had queued that had
                not started run elsewhere, or with ``cancel_futures`` are cancelled.
            timeout: seconds from this call to wait for the work to finish (with ``wait``
                or not); then what has not started is cancelled, the workers running a task
                are killed (those tasks fail with :class:`WorkerCrashedError` naming the
                timeout, never retried), a result still being unpickled fails, and the pool
                stops. None: the pool's ``shutdown_timeout`` (default: no limit).

        A ``KeyboardInterrupt`` (Ctrl-C) while waiting does the same at once, waits for
        the workers to be gone, and is raised again.

        Raises:
            ValueError: ``timeout`` is negative or not a number.
        """
        if timeout is None:
            timeout = self._shutdown_timeout
        else:
            timeout = _check_shutdown_timeout("timeout", timeout)
        with self._shutdown_lock:
            self._shutdown = True
            core = self._core
            if timeout is not None:
                at = time.monotonic() + timeout
                if self._shutdown_deadline is None or at < self._shutdown_deadline:
                    self._shutdown_deadline = at
        try:
            core.shutdown(cancel_futures=cancel_futures, kill_running=kill_running, timeout=timeout)
            if not wait:
                return
            joined = self._wait_for_core()
        except KeyboardInterrupt:
            # Ctrl-C: stop waiting for the tasks, not for the pool: kill, cancel, and wait for
            # that (bounded; a second Ctrl-C is not caught), so no worker outlives the call.
            log.warning("resilpool: shutdown interrupted; killing the running tasks and cancelling the rest")
            with self._shutdown_lock:
                self._shutdown_deadline = time.monotonic()
                core = self._core
            core.shutdown(cancel_futures=True, kill_running=True, timeout=0.0)
            if self._wait_for_core():
                self._close_threads()
            raise
        if joined:
            self._close_threads()

    def _wait_for_core(self) -> bool:
        """Wait for the current core's owner thread to finish (following rebuilds).

        Returns False without waiting from a done-callback (the pool then finishes by
        itself), or when the core outlived its shutdown deadline by _ESCALATE_AFTER_S +
        _GIVE_UP_WAIT_S (logged). Without a deadline it waits as long as the work takes.
        """
        escalated_at: float | None = None
        while True:
            core = self._core
            if core.join(timeout=0.5):
                if core is self._core:
                    return True
                continue
            if threading.current_thread() is core.thread:
                return False  # a done-callback: the pool finishes by itself
            deadline = self._shutdown_deadline
            if deadline is None:
                continue
            now = time.monotonic()
            if escalated_at is None and now > deadline + _ESCALATE_AFTER_S:
                # A core that does not give up by itself (Dask): kill what runs.
                core.shutdown(cancel_futures=True, kill_running=True, timeout=0.0)
                escalated_at = now
            elif escalated_at is not None and now > escalated_at + _GIVE_UP_WAIT_S:
                log.error("resilpool: the pool did not stop within %.0fs of killing its workers; shutdown returns without it", _GIVE_UP_WAIT_S)
                return False

    def _close_threads(self) -> None:
        self._monitor.stop()
        self._events.close()
        _LIVE_POOLS.discard(self)

    def abort(self, futures: Iterable[Future[Any]], *, reason: str) -> None:
        """Abort some of this pool's tasks; the pool stays usable.

        Futures whose task has not started are cancelled (a retry that had started
        before fails with its last error and a note); the workers running started ones
        are killed and those futures fail with :class:`WorkerCrashedError` whose message
        names ``reason``, never retried. Done futures, and futures of other pools, are
        left as they are. Returns at once: the futures resolve shortly after.
        """
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"abort(reason=...) must be a non-empty str saying why, got {reason!r}")
        ids = []
        for f in futures:
            tag = getattr(f, "_resilpool_task", None)
            if type(tag) is int and tag >> _TAG_BITS == self._tag_base >> _TAG_BITS and not f.done():
                ids.append(tag & ((1 << _TAG_BITS) - 1))
        if ids:
            self._core.abort(ids, reason)

    # --- observability ---------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's counters."""
        with self._core_lock:  # a rebuild moves the old core's counts into _carried, then swaps cores
            core, carried = self._core, self._carried
        c = carried + _core_counts(core)
        t = c.tasks
        pending, running = core.counts()
        submitted = _last_id(self._ids)
        errs, failed_s = dict(t.errors), t.failed_s
        if rejected := self._rejected:  # failed in submit, before any core had them: 0 s each
            name = error_type_name(errors.SerializationError)
            errs[name] = errs.get(name, 0) + rejected
            failed_s = failed_s + DurationHistogram(cumulative=(rejected,) * len(failed_s.cumulative))
        return PoolStats(
            workers=sum(1 for v in core.worker_views() if v.ready and not v.retiring),
            max_workers=self._max_workers,
            submitted=submitted,
            pending=pending,
            running=running,
            completed=t.completed,
            failed=t.failed + rejected,
            cancelled=t.cancelled,
            retried=t.retried,
            quarantined=t.quarantined,
            worker_crashes=c.worker_crashes,
            workers_started=c.workers_started,
            recycled=dict(c.recycled),
            peak_worker_rss=self._monitor.peak_rss,
            rebuilds=self._rebuilds,
            broken=core.broken is not None,
            errors=dict(sorted(errs.items())),
            retried_errors=dict(t.retried_errors),
            durations={"succeeded": t.succeeded_s, "failed": failed_s},
        )

    def workers(self) -> list[WorkerInfo]:
        """A snapshot of each live worker: pid, memory, CPU, current task, age."""
        core = self._core
        now = time.monotonic()
        samples = self._monitor.samples
        out = []
        for v in core.worker_views():
            task_id, started, n = core.read_slot(v.slot)
            s = samples.get(v.pid)
            out.append(
                WorkerInfo(
                    pid=v.pid,
                    rss=s.rss if s else None,
                    cpu_percent=s.cpu_percent if s else None,
                    task_id=task_id or None,
                    running_since=started,
                    tasks_done=n,
                    age_s=now - v.spawned_at,
                    ready=v.ready,
                    retiring=v.retiring,
                )
            )
        return out

    def add_listener(self, callback: Callable[[Event], object]) -> None:
        """Call ``callback(event)`` for every event, on the pool's event thread."""
        self._events.add(callback)

    def remove_listener(self, callback: Callable[[Event], object]) -> None:
        self._events.remove(callback)

    @property
    def max_workers(self) -> int:
        return self._max_workers

    @property
    def limits(self) -> Limits:
        return self._limits

    # --- documented internal hooks: for resilpool.testing, not for applications --------

    @property
    def config(self) -> CoreConfig:
        """The frozen configuration every core of this pool is built from (``monitor_interval`` included)."""
        return self._config

    def set_task_wrapper(self, wrapper: TaskWrapper | None) -> TaskWrapper | None:
        """Test hook: map each ``(fn, args, kwargs)`` to the call actually sent; returns the previous one.

        ``resilpool.testing``'s fault injector wraps calls this way; ``None`` removes it.
        """
        previous, self._task_wrapper = self._task_wrapper, wrapper
        return previous

    def break_core_for_test(self) -> None:
        """Test hook: make the current core fail from inside, as an internal bug would (the rebuild path)."""
        self._core.inject_break()

    def check_invariants(self, *, idle: bool = False) -> None:
        """Test hook: check the current core's task tables; raises ``InvariantViolation``.

        Runs between two steps of the core's owner thread, so it may be called at any
        time; with ``idle`` (the caller knows every future it got has resolved), a task
        left anywhere in the core is a violation too.
        """
        check = getattr(self._core, "check_invariants", None)
        if check is not None:
            check(idle=idle)

    def __repr__(self) -> str:
        s = self.stats()
        return f"<ResilientPool workers={s.workers}/{s.max_workers} running={s.running} pending={s.pending}{' broken' if s.broken else ''}{' shut down' if self._shutdown else ''}>"


@final
class TaskOptions:
    """``submit``/``map`` with per-task options; made by :meth:`ResilientPool.options`."""

    __slots__ = ("_pool", "_retry", "_timeout")

    def __init__(self, pool: ResilientPool, task_timeout: float | None, retry: RetryPolicy | None) -> None:
        self._pool = pool
        self._timeout = task_timeout
        self._retry = retry

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """:meth:`ResilientPool.submit` with these options; typed like typeshed's ``Executor.submit``."""
        return self._pool._submit(fn, args, kwargs, self._retry, self._timeout)

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1) -> Iterator[R]:
        """:meth:`ResilientPool.map` with these options."""
        return _start_map(self._pool, fn, iterables, timeout, chunksize, self._retry, self._timeout)


class _MapState:
    """The inputs and in-flight futures of one lazy ``map``; owned by the consuming thread."""

    def __init__(self, pool: ResilientPool, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], timeout: float | None, chunksize: int, policy: RetryPolicy | None, task_timeout: float | None) -> None:
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")  # the stdlib's words, and the value
        if (refused := _shut_down_error(pool)) is not None:
            raise refused
        self.pool = pool
        self.fn = fn
        self.star = len(iterables) != 1
        self.inputs: Iterator[Any] | None = zip(*iterables) if self.star else iter(iterables[0])
        self.chunksize = chunksize
        self.policy = policy
        self.task_timeout = task_timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.futures: deque[Future[Any]] = deque()
        self.sizes: deque[int] = deque()  # the pickled size of each one's input, in step with futures
        self.in_flight_bytes = 0
        self.current: list[Any] | None = None  # the chunk being yielded (chunksize > 1)
        self.window = max(_MAP_WINDOW_CHUNKS_PER_WORKER, _MAP_WINDOW_ITEMS_PER_WORKER // chunksize) * pool.max_workers
        self.max_bytes = _MAP_WINDOW_BYTES_PER_WORKER * pool.max_workers
        # Tasks handed over at a time: all at once for single items; chunks a few at a time
        # (the first chunks start while the next are being pickled).
        self.batch = self.window if chunksize == 1 else _MAP_HAND_OVER_PER_WORKER * pool.max_workers

    def fill(self) -> None:
        """Submit more work, in batches (one hand-over, one wake-up), up to the read-ahead window."""
        inputs = self.inputs
        if inputs is None:
            return
        room = self.window - len(self.futures)
        if room <= 0 or (self.futures and room < self.window // 4):
            return
        tasks = []
        pool, fn, star = self.pool, self.fn, self.star
        futures, sizes = self.futures, self.sizes
        for _ in range(room):
            if self.in_flight_bytes >= self.max_bytes and futures:
                break  # large items: the window is full by size
            if self.chunksize == 1:
                try:
                    item = next(inputs)
                except StopIteration:
                    self.inputs = None
                    break
                fut, task = pool._make_task(fn, item if star else (item,), {}, self.policy, self.task_timeout)
            else:
                chunk = list(itertools.islice(inputs, self.chunksize))
                if not chunk:
                    self.inputs = None
                    break
                fut, task = pool._make_task(call_chunk, (fn, chunk, star), {}, self.policy, self.task_timeout)
            futures.append(fut)
            size = 0 if task is None else len(task.body)
            sizes.append(size)
            self.in_flight_bytes += size
            if task is not None:
                tasks.append(task)
                if len(tasks) >= self.batch:
                    pool._hand_over(tasks)
                    tasks = []
        if tasks:
            pool._hand_over(tasks)

    def wait(self, fut: Future[Any]) -> Any:
        while True:
            remaining = 1.0
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    fut.cancel()
                    raise FuturesTimeout()
                remaining = min(remaining, 1.0)
            try:
                return fut.result(timeout=remaining)
            except FuturesTimeout:
                if fut.done():
                    raise  # the task itself raised a TimeoutError
                continue

    def next_result(self) -> Any:
        """The next result in order (or its exception); refills the window first."""
        fut = self.futures.popleft()
        self.in_flight_bytes -= self.sizes.popleft()
        self.fill()
        return self.wait(fut)

    def close(self) -> None:
        """Stop reading inputs and cancel every item not handed to a worker yet.

        An item handed to a worker has a running future (as in the stdlib's call queue)
        and finishes; its result is dropped.
        """
        self.inputs = None
        futures = self.futures
        while futures:
            futures.pop().cancel()
        self.sizes.clear()
        self.in_flight_bytes = 0


def _map_results(state: _MapState) -> Iterator[Any]:
    """Yield a lazy map's results in order (chunksize 1); closing or dropping it cancels what
    has not started.

    No local of this frame holds a result while it is suspended (CPython issue 14406): a
    result the consumer drops is freed.
    """
    futures = state.futures
    try:
        # _start_map primes the generator to here, inside the try, so that close() or
        # dropping it before the first next() runs the finally too (issue 13, item 4).
        yield None
        while True:
            if not futures:
                state.fill()
                if not futures:
                    return
            yield state.next_result()
    finally:
        state.close()


_CHUNK_END: Final = object()  # the bottom of a chunk being yielded: see _map_chunks


def _map_chunks(state: _MapState) -> Generator[Iterator[Any], None, None]:
    """A chunked map's results, one iterator per chunk, in order, for :class:`_ChunkedMap`.

    Each chunk's list is reversed over a :data:`_CHUNK_END` and popped as its items are
    yielded, by C iterators: an item the consumer drops is freed (CPython issue 14406, as
    the stdlib's ``_chain_from_iterable_of_lists``), and the per-item step runs no bytecode.
    """
    futures = state.futures
    try:
        yield iter(())  # the priming step (_start_map): from here on the finally runs
        while True:
            if not futures:
                state.fill()
                if not futures:
                    return
            chunk = state.next_result()
            chunk.append(_CHUNK_END)
            chunk.reverse()
            state.current = chunk
            yield iter(chunk.pop, _CHUNK_END)
    finally:
        state.close()


class _ChunkedMap(itertools.chain):  # type: ignore[type-arg]
    """The iterator ``map(..., chunksize>1)`` returns: the items of each chunk's results,
    in order.

    An ``itertools.chain`` over :func:`_map_chunks`, so that the per-item ``next()`` is
    C code only (at chunksize 1000 the consumer's thread spent as long in a generator's
    per-item resume as in its own loop). ``close()``, or dropping it, cancels what has
    not started, as closing the generator a chunksize-1 map returns does.
    """

    __slots__ = ("_chunks", "_state")
    _chunks: Generator[Iterator[Any], None, None]
    _state: _MapState

    def close(self) -> None:
        """Stop: no more items; the inputs not handed to a worker are cancelled."""
        current = self._state.current
        if current is not None:
            del current[1:]  # the chunk being yielded ends at its next item
        self._chunks.close()


def _start_map(pool: ResilientPool, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], timeout: float | None, chunksize: int, policy: RetryPolicy | None, task_timeout: float | None) -> Iterator[Any]:
    state = _MapState(pool, fn, iterables, timeout, chunksize, policy, task_timeout)
    try:
        state.fill()  # work starts now, as with the stdlib, not at the first next()
    except BaseException:
        state.close()  # submit refused part way (shut down, broken): cancel what went in
        raise
    if chunksize == 1:
        results = _map_results(state)
        next(results)  # the priming step: see _map_results
        return results
    chunks = _map_chunks(state)
    next(chunks)  # the priming step: see _map_chunks
    it = cast(_ChunkedMap, _ChunkedMap.from_iterable(chunks))  # from_iterable makes the subclass
    it._chunks, it._state = chunks, state
    return it


def _core_counts(core: Any) -> CoreCounts:
    """A core's frozen counters (a Dask core not yet on the TaskBook: from its Counters)."""
    snapshot = getattr(core, "snapshot", None)
    if snapshot is not None:
        return snapshot()  # type: ignore[no-any-return]
    stats, recycled = dict(core.stats), dict(core.recycled)
    from ._core.tasks import BookCounts

    return CoreCounts(
        tasks=BookCounts(**{k: stats.get(k, 0) for k in ("completed", "failed", "cancelled", "retried", "quarantined")}),
        workers_started=stats.get("workers_started", 0),
        worker_crashes=stats.get("worker_crashes", 0),
        recycled=tuple(sorted((k, v) for k, v in recycled.items() if v)),
    )


def _rebuild_hook(pool_ref: weakref.ref[ResilientPool]) -> Callable[[CoreLike, BaseException], None]:
    def hook(core: CoreLike, exc: BaseException) -> None:
        pool = pool_ref()
        if pool is None:
            raise RuntimeError("pool is gone")
        pool._rebuild(core, exc)

    return hook


def _last_id(counter: itertools.count[int]) -> int:
    # itertools.count's repr is "count(N)": the next id; ids start at 1.
    return int(repr(counter)[6:-1]) - 1


def _check_picklable(initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    import pickle

    try:
        pickle.dumps((initializer, initargs))
    except Exception as exc:
        raise TypeError(
            f"initializer and initargs must be picklable for this start method: {type(exc).__name__}: {exc}"
        ) from exc


def _merge_max_tasks(limits: Limits, max_tasks_per_child: int | None) -> Limits:
    """``max_tasks_per_child`` (the stdlib's name) is ``Limits.max_tasks``: one setting, two spellings."""
    if max_tasks_per_child is None:
        return limits
    # The stdlib's checks and messages, so code matching on them keeps working.
    if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
        raise TypeError("max_tasks_per_child must be an integer")
    if max_tasks_per_child <= 0:
        raise ValueError("max_tasks_per_child must be >= 1")
    if limits.max_tasks is not None and limits.max_tasks != max_tasks_per_child:
        raise ValueError(
            f"max_tasks_per_child={max_tasks_per_child} conflicts with limits.max_tasks={limits.max_tasks}:"
            " they are the same setting; give only one of them"
        )
    return dataclasses.replace(limits, max_tasks=max_tasks_per_child)


def _check_shutdown_timeout(name: str, value: object) -> float | None:
    """``value`` as seconds (>= 0) or None; ValueError naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, or None to wait as long as it takes; got {value!r}")
    return float(value)


def _shut_down_error(pool: ResilientPool) -> RuntimeError | None:
    """The stdlib's ``RuntimeError`` (same words) if ``pool`` takes no more work, else None."""
    if _global_shutdown:
        return RuntimeError("cannot schedule new futures after interpreter shutdown")
    if pool._shutdown:
        return RuntimeError("cannot schedule new futures after shutdown")
    return None


# Set once, by _python_exit, when the interpreter starts to shut down; never reset.
_global_shutdown = False


def _python_exit() -> None:
    """Interpreter exit without shutdown(): finish the work, then stop every worker.

    Registered like the stdlib's executors do (``threading._register_atexit``): it runs
    when the main thread ends, before any ``atexit`` hook, so that a hook which submits
    work afterwards gets ``RuntimeError`` at once, whatever the order of imports and
    registrations, instead of work that no pool will run.
    """
    global _global_shutdown
    _global_shutdown = True
    for pool in list(_LIVE_POOLS):
        if pool._owner_pid != os.getpid():
            # A forked child (a fork-started worker runs this hook too, from its bootstrap)
            # must not drive its parent's pool: its threads are not here, its locks may be held.
            continue
        try:
            pool.shutdown(wait=True)
        except Exception:
            log.error("resilpool: shutdown at exit failed", exc_info=True)


def _register_exit_hook() -> None:
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_python_exit)
            return
        except RuntimeError:  # imported while the interpreter is already shutting down
            pass
    atexit.register(_python_exit)  # pragma: no cover - private hook gone or too late


_register_exit_hook()
