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
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, TypeVar, final

from . import errors
from ._core import executor as _exec
from ._core.serialization import Serializer, _cloudpickle, serialize_task
from ._core.worker import call_chunk
from .events import CoreRebuilt, Event, PoolStats, WorkerInfo
from .retry import RetryPolicy, RetrySpec
from .supervisor.breaker import Breaker, CrashLoopBreaker
from .supervisor.limits import Limits
from .supervisor.monitor import Monitor

__all__ = ["ResilientPool", "TaskOptions"]

log = logging.getLogger("resilpool")

R = TypeVar("R")

_LIVE_POOLS: weakref.WeakSet[ResilientPool] = weakref.WeakSet()
_MAP_WINDOW_ITEMS = 4096  # items a lazy map reads ahead of its consumer, at most


def _default_workers() -> int:
    if hasattr(os, "process_cpu_count"):  # 3.13+
        n = os.process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS
        n = os.cpu_count()
    return max(1, n or 1)


def _resolve_context(mp_context: multiprocessing.context.BaseContext | str | None) -> multiprocessing.context.BaseContext:
    if mp_context is None:
        mp_context = "forkserver" if sys.platform.startswith("linux") else "spawn"
    if isinstance(mp_context, str):
        ctx = multiprocessing.get_context(mp_context)
    else:
        ctx = mp_context
    if ctx.get_start_method() == "forkserver":
        _preload_worker_module(ctx)
    return ctx


def _preload_worker_module(ctx: multiprocessing.context.BaseContext) -> None:
    # Workers start faster when the forkserver has imported the worker module already.
    # Append to (never replace) the user's preload list; effective only before it starts.
    try:
        from multiprocessing import forkserver

        mods = list(forkserver._forkserver._preload_modules)  # type: ignore[attr-defined]
        if "resilpool._core.worker" not in mods:
            ctx.set_forkserver_preload(mods + ["resilpool._core.worker"])
    except Exception:  # pragma: no cover - private API moved: only slower starts
        pass


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
                except Exception:
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
        limits: :class:`Limits` for memory, task count, lifetime, timeouts and stalls.
        retry: default ``retry=`` for every task (None: tasks run at most once).
        breaker: :class:`Breaker` settings (crash-loop breaker, poison quarantine).
        monitor_interval: seconds between two samples of the workers (psutil).
        serializer: ``"auto"`` (stdlib pickle; cloudpickle for lambdas, local functions and
            functions of an interactive ``__main__``, when installed), ``"pickle"`` or
            ``"cloudpickle"``.
        backend: where tasks run; None for local worker processes, or
            ``resilpool.dask.DaskBackend(...)`` for a Dask cluster (same API and semantics).

    Futures are plain :class:`concurrent.futures.Future`; a task's exception carries
    the worker's traceback as ``__cause__``, as with the standard library.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        mp_context: multiprocessing.context.BaseContext | str | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        limits: Limits | None = None,
        retry: RetrySpec = None,
        breaker: Breaker | None = None,
        monitor_interval: float | None = 0.2,
        serializer: Serializer = "auto",
        backend: Any = None,
    ) -> None:
        if max_workers is None:
            max_workers = _default_workers()
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers <= 0:
            raise ValueError(f"max_workers must be an int > 0, got {max_workers!r}")
        if limits is None:
            limits = Limits()
        elif not isinstance(limits, Limits):
            raise TypeError(f"limits must be a resilpool.Limits, got {limits!r}")
        if breaker is None:
            breaker = Breaker()
        elif not isinstance(breaker, Breaker):
            raise TypeError(f"breaker must be a resilpool.Breaker, got {breaker!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        if monitor_interval is None:
            if limits.needs_monitor(ignore_default_floor=True):
                raise ValueError("monitor_interval=None turns sampling off, but these limits need it: " + ", ".join(limits.sampled_fields()))
        elif isinstance(monitor_interval, bool) or not isinstance(monitor_interval, (int, float)) or not monitor_interval > 0:
            raise ValueError(f"monitor_interval must be > 0 seconds or None, got {monitor_interval!r}")
        if serializer not in ("auto", "pickle", "cloudpickle"):
            raise ValueError(f"serializer must be 'auto', 'pickle' or 'cloudpickle', got {serializer!r}")
        self._serializer: Serializer = serializer
        if serializer != "pickle":
            # Import now, not lazily in a submitting thread: a worker forked while another
            # thread holds an import lock would deadlock on it.
            _cloudpickle()
        self._ctx = _resolve_context(mp_context)
        self._fork = self._ctx.get_start_method() == "fork"
        # Test seam (resilpool.testing): maps (fn, args, kwargs) to the call actually sent.
        self._task_wrapper: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] | None = None
        if self._ctx.get_start_method() != "fork":
            _check_picklable(initializer, initargs)
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._limits = limits
        self._retry = RetryPolicy.coerce(retry)
        self._breaker = breaker
        self._ids = itertools.count(1)
        self._rejected = 0
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        self._core_lock = threading.Condition()
        self._carried: Counter[str] = Counter()
        self._carried_recycled: Counter[str] = Counter()
        self._rebuilds = 0
        self._rebuild_breaker = CrashLoopBreaker(5, 60.0)
        self._events = _EventBus("resilpool")
        self._backend = backend
        self._monitor_interval = monitor_interval
        try:
            self._core = self._new_core()
        except BaseException:
            self._events.close()  # a backend that cannot start must not leak the event thread
            raise
        # A backend samples its own workers (they are not our children); locally, the Monitor does.
        self._monitor: Any
        if backend is not None:
            self._monitor = backend.make_monitor(self)
        elif monitor_interval is None:
            self._monitor = _NoMonitor()
        else:
            self._monitor = Monitor(lambda: self._core, limits, float(monitor_interval))
        self._monitor.start()
        _LIVE_POOLS.add(self)

    # --- construction of cores (also on rebuild) ----------------------------------------

    def _new_core(self) -> _exec.Core:
        b = self._breaker
        make: Any = _exec.Core if self._backend is None else self._backend.make_core
        return make(  # type: ignore[no-any-return]
            max_workers=self._max_workers,
            mp_context=self._ctx,
            initializer=self._initializer,
            initargs=self._initargs,
            max_tasks_per_worker=self._limits.max_tasks,
            soft_max_rss=self._limits.soft_max_rss,
            max_startup_failures=b.max_failures if b.max_failures is not None else max(3, 2 * self._max_workers),
            startup_window_s=b.window,
            quarantine_after=b.quarantine_after,
            emit=self._events.emit,
            on_broken=_rebuild_hook(weakref.ref(self)),
            **({} if self._backend is None else {"limits": self._limits, "serializer": self._serializer}),
        )

    def _rebuild(self, old: _exec.Core, exc: BaseException) -> None:
        # Runs on the failed core's manager thread.
        if self._rebuild_breaker.record_failure(time.monotonic()):
            raise RuntimeError("the core broke more than 5 times within 60s; not rebuilding again") from exc
        with self._core_lock:
            new = self._new_core()
            unstarted, interrupted = old.salvage()
            self._carried.update(old.stats)
            self._carried_recycled.update(old.recycled)
            new.adopt(unstarted, interrupted)
            if self._shutdown:
                new.shutdown(cancel_futures=False)
            self._core = new
            self._rebuilds += 1
            self._core_lock.notify_all()
        failed = sum(1 for t in interrupted if t.retry is None)
        log.error("resilpool rebuilt its core after %s: %d tasks carried over", type(exc).__name__, len(unstarted) + len(interrupted) - failed)
        self._events.emit(CoreRebuilt(cause=f"{type(exc).__name__}: {exc}", carried_over=len(unstarted) + len(interrupted) - failed, failed=failed))

    # --- Executor API -----------------------------------------------------------------

    def submit(self, fn: Callable[..., R], /, *args: Any, retry: RetrySpec = None, **kwargs: Any) -> Future[R]:  # type: ignore[override]
        """Schedule ``fn(*args, **kwargs)``; return its future.

        Args:
            retry: retries after a failure (int >= 0 or :class:`RetryPolicy`); marks the task
                idempotent. None: the pool's default. ``submit`` consumes this keyword: wrap a
                function with its own ``retry`` parameter in ``functools.partial``.

        Raises:
            RuntimeError: after :meth:`shutdown`.
            CrashLoopError: the crash-loop breaker has broken the pool.
        """
        policy = self._retry if retry is None else RetryPolicy.coerce(retry)
        return self._submit(fn, args, kwargs, policy, None)

    def _make_task(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], policy: RetryPolicy | None, timeout: float | None) -> tuple[Future[Any], _exec.Task | None]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        task_id = next(self._ids)
        fut: Future[Any] = Future()
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
                raise _exec._copy_error(core.broken)
            for t in tasks:
                if t.timeout is not None:
                    core.task_timeouts[t.id] = t.timeout
            try:
                if len(tasks) == 1:
                    core.submit(tasks[0])
                else:
                    core.submit_many(tasks)
                return
            except _exec.CoreGone:
                if core.broken is not None:
                    raise _exec._copy_error(core.broken) from None
                if self._shutdown and core is self._core:
                    raise RuntimeError("cannot schedule new futures after shutdown") from None
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

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; finish (or with ``cancel_futures`` cancel) the queued ones.

        With ``wait`` it returns once every worker and thread of the pool has exited.
        Called from a done-callback (the manager thread) it does not wait.
        """
        with self._shutdown_lock:
            self._shutdown = True
            core = self._core
        core.shutdown(cancel_futures=cancel_futures)
        if not wait:
            return
        while True:
            core = self._core
            if not core.join(timeout=1.0):
                if threading.current_thread() is core.thread:
                    return  # a done-callback: the pool finishes by itself
                continue
            if core is self._core:
                break
        self._monitor.stop()
        self._events.close()
        _LIVE_POOLS.discard(self)

    # --- observability ---------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's counters."""
        core = self._core
        c = self._carried + core.stats
        recycled = self._carried_recycled + core.recycled
        pending, running = core.counts()
        submitted = _last_id(self._ids)
        return PoolStats(
            workers=sum(1 for v in core.worker_views() if v.ready and not v.retiring),
            max_workers=self._max_workers,
            submitted=submitted,
            pending=pending,
            running=running,
            completed=c["completed"],
            failed=c["failed"] + self._rejected,
            cancelled=c["cancelled"],
            retried=c["retried"],
            quarantined=c["quarantined"],
            worker_crashes=c["worker_crashes"],
            workers_started=c["workers_started"],
            recycled=dict(recycled),
            peak_worker_rss=self._monitor.peak_rss,
            rebuilds=self._rebuilds,
            broken=core.broken is not None,
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

    def _break_core_for_test(self) -> None:
        """Test hook: make the current core fail from inside (see the rebuild path)."""
        self._core.inject_break()

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

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        return self._pool._submit(fn, args, kwargs, self._retry, self._timeout)

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1) -> Iterator[R]:
        return _start_map(self._pool, fn, iterables, timeout, chunksize, self._retry, self._timeout)


class _MapState:
    """The inputs and in-flight futures of one lazy ``map``; owned by the consuming thread."""

    def __init__(self, pool: ResilientPool, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], timeout: float | None, chunksize: int, policy: RetryPolicy | None, task_timeout: float | None) -> None:
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        if pool._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        self.pool = pool
        self.fn = fn
        self.star = len(iterables) != 1
        self.inputs: Iterator[Any] | None = zip(*iterables) if self.star else iter(iterables[0])
        self.chunksize = chunksize
        self.policy = policy
        self.task_timeout = task_timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.futures: deque[Future[Any]] = deque()
        self.window = max(2 * pool.max_workers, _MAP_WINDOW_ITEMS // chunksize)

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
        for _ in range(room):
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
            self.futures.append(fut)
            if task is not None:
                tasks.append(task)
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

    def close(self) -> None:
        """Stop reading inputs and cancel the work not yet started."""
        self.inputs = None
        futures = self.futures
        while futures:
            futures.pop().cancel()


def _map_results(state: _MapState) -> Iterator[Any]:
    """Yield a lazy map's results in order; closing the generator cancels what has not started."""
    futures = state.futures
    chunked = state.chunksize > 1
    try:
        while True:
            if not futures:
                state.fill()
                if not futures:
                    return
            fut = futures.popleft()
            state.fill()
            value = state.wait(fut)
            del fut
            if chunked:
                yield from value
            else:
                yield value
    finally:
        state.close()


def _start_map(pool: ResilientPool, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], timeout: float | None, chunksize: int, policy: RetryPolicy | None, task_timeout: float | None) -> Iterator[Any]:
    state = _MapState(pool, fn, iterables, timeout, chunksize, policy, task_timeout)
    state.fill()  # work starts now, as with the stdlib, not at the first next()
    results = _map_results(state)
    # A generator dropped before its first next() never runs its finally: cancel from here.
    weakref.finalize(results, state.close)
    return results


def _rebuild_hook(pool_ref: weakref.ref[ResilientPool]) -> Callable[[_exec.Core, BaseException], None]:
    def hook(core: _exec.Core, exc: BaseException) -> None:
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


@atexit.register
def _shutdown_live_pools() -> None:
    # Interpreter exit without shutdown(): finish the work, then stop every worker.
    for pool in list(_LIVE_POOLS):
        try:
            pool.shutdown(wait=True)
        except Exception:
            log.error("resilpool: shutdown at exit failed", exc_info=True)
