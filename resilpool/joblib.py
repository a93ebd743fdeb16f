"""The joblib parallel backend ``"resilpool"``: joblib's batches run on a :class:`ResilientPool`.

Importing this module registers the backend (``pip install 'resilpool[joblib]'``)::

    import joblib
    import resilpool.joblib  # registers "resilpool"
    from resilpool import Limits

    with joblib.parallel_config(backend="resilpool", n_jobs=4, limits=Limits(soft_max_rss="2GiB"), retry=1):
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

Data flow::

    Parallel (caller's thread) ── submit(batch) ──> ResilientPool ──> workers run BatchedCalls
         ^                                              │ futures resolved on the pool's manager thread
         │ results, next batch                          v
    joblib's batch callback <── callback thread <── done-callback (only enqueues)

One joblib *batch* (a ``BatchedCalls`` of one or more ``delayed`` calls, sized by
joblib's auto-batching) is one pool task: ``retry=``, limits and timeouts apply
to a batch as a whole.  joblib's callbacks (which consume the caller's input
iterator and pickle the next batch) run on the backend's own callback thread,
never on the pool's manager thread.

Ownership: the backend's ``_lock`` guards ``_run``, ``_generation``, ``_users``,
``_closed`` and ``_callbacks``; a :class:`_Run` (one pool and the futures submitted
to it) is shared by the caller's thread and the callback thread under its own lock.
Pools are started and shut down outside ``_lock``.

Invariant: a pool the backend created is shut down, its workers and threads joined,
by ``abort_everything()`` or by the ``terminate()`` that ends the last Parallel call
using it; no pool is created after that ``terminate()`` (``_users`` is 0).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import pickle
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Final, final

import tenacity
from joblib import cpu_count, register_parallel_backend  # type: ignore[import-untyped]
from joblib.parallel import (  # type: ignore[import-untyped]
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from . import errors
from ._core.serialization import Serializer, _needs_by_value, _unpicklable_part
from ._pool import ResilientPool
from .events import Event, ExitReason, PoolStats
from .retry import RetryPolicy
from .supervisor.breaker import Breaker
from .supervisor.limits import Limits

# Imported here, never lazily: a worker forked while another thread of ours is importing a
# module inherits that module's import lock held, and deadlocks on its own first import of it.
try:
    import cloudpickle
except ImportError:  # pragma: no cover - a dependency of the joblib extra
    cloudpickle = None

__all__ = ["ResilpoolBackend", "register"]

log = logging.getLogger("resilpool")

#: Name of resilpool's worker processes (``multiprocessing.current_process().name``).
_WORKER_NAME: Final = "resilpool-worker"
#: How long an abort keeps killing workers until every batch it submitted is resolved.
_ABORT_TIMEOUT_S: Final = 10.0
_JOIN_S: Final = 5.0
#: How long terminate() waits for an owned pool's workers and threads to exit.
_SHUTDOWN_TIMEOUT_S: Final = 30.0
#: A protocol >= 4 pickle that refers to a global of ``__main__`` holds this string.
_MAIN_REF: Final = b"\x8c\x08__main__"
_HIGHEST: Final = pickle.HIGHEST_PROTOCOL
#: Keyword arguments joblib passes to every backend's ``configure``; resilpool does not use them.
_JOBLIB_ARGS: Final = frozenset({"max_nbytes", "temp_folder", "mmap_mode", "verbose", "context", "prefer", "require"})


# --- options ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Options:
    """What the backend builds a pool from; equal options share a pool."""

    pool: ResilientPool | None = None
    mp_context: multiprocessing.context.BaseContext | str | None = None
    initializer: Callable[..., object] | None = None
    initargs: tuple[Any, ...] = ()
    limits: Limits | None = None
    retry: RetryPolicy | None = None
    breaker: Breaker | None = None
    monitor_interval: float | None = None
    serializer: Serializer = "auto"
    listeners: tuple[Callable[[Event], object], ...] = ()

    def __post_init__(self) -> None:
        owned = ("mp_context", "initializer", "limits", "breaker", "monitor_interval", "listeners")
        if self.pool is not None:
            if not isinstance(self.pool, ResilientPool):
                raise TypeError(f"pool must be a resilpool.ResilientPool, got {self.pool!r}")
            given = [n for n in owned if getattr(self, n) not in (None, ())]
            if given or self.initargs or self.serializer != "auto":
                raise ValueError(
                    f"pool= is a pool you built and configured yourself; {', '.join(given) or 'serializer/initargs'}"
                    " cannot be given with it (only retry= applies, per batch)"
                )
        if self.limits is not None and not isinstance(self.limits, Limits):
            raise TypeError(f"limits must be a resilpool.Limits, got {self.limits!r}")
        if self.breaker is not None and not isinstance(self.breaker, Breaker):
            raise TypeError(f"breaker must be a resilpool.Breaker, got {self.breaker!r}")
        if self.initializer is not None and not callable(self.initializer):
            raise TypeError(f"initializer must be callable, got {self.initializer!r}")
        if not isinstance(self.initargs, tuple):
            raise TypeError(f"initargs must be a tuple, got {self.initargs!r}")
        if self.serializer not in ("auto", "pickle", "cloudpickle"):
            raise ValueError(f"serializer must be 'auto', 'pickle' or 'cloudpickle', got {self.serializer!r}")
        if isinstance(self.mp_context, str):
            multiprocessing.get_context(self.mp_context)  # ValueError for an unknown start method
        for fn in self.listeners:
            if not callable(fn):
                raise TypeError(f"listeners must be callables taking an event, got {fn!r}")


def _options(base: _Options | None, kwargs: dict[str, Any]) -> _Options:
    """``base`` updated with the backend options in ``kwargs``; ValueError/TypeError on a bad one."""
    kw = dict(kwargs)
    if "retry" in kw:
        kw["retry"] = RetryPolicy.coerce(kw["retry"])
    if "initargs" in kw:
        kw["initargs"] = tuple(kw["initargs"])
    if "listeners" in kw:
        kw["listeners"] = tuple(kw["listeners"])
    max_tasks = kw.pop("max_tasks", None)
    known = {f.name for f in dataclasses.fields(_Options)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise TypeError(
            f"the resilpool joblib backend got unknown option(s) {', '.join(unknown)};"
            f" it takes {', '.join(sorted(known | {'max_tasks'}))}"
        )
    opts = dataclasses.replace(base, **kw) if base is not None else _Options(**kw)
    if max_tasks is not None:
        limits = opts.limits or Limits()
        if limits.max_tasks is not None and limits.max_tasks != max_tasks:
            raise ValueError(
                f"max_tasks={max_tasks!r} contradicts limits.max_tasks={limits.max_tasks!r}; give it once"
            )
        opts = dataclasses.replace(opts, limits=dataclasses.replace(limits, max_tasks=max_tasks))
    return opts


# --- one pool and what was submitted to it -----------------------------------------


class _Run:
    """One pool (owned or borrowed) and the futures this backend submitted to it."""

    def __init__(self, pool: ResilientPool, owned: bool, key: tuple[Any, ...], retry: RetryPolicy | None, aborting: threading.Event) -> None:
        self.pool = pool
        self.owned = owned
        self.key = key
        self.retry = retry  # per task on a borrowed pool; an owned pool has it as its default
        self.aborting = aborting
        self.fork = bool(getattr(pool, "_fork", False))
        self.serializer: Serializer = getattr(pool, "_serializer", "auto")
        self.lock = threading.Lock()
        self.futures: set[Future[Any]] = set()

    def unresolved(self) -> list[Future[Any]]:
        with self.lock:
            return [f for f in self.futures if not f.done()]

    def forget(self, fut: Future[Any]) -> None:
        with self.lock:
            self.futures.discard(fut)


class _UnlessAborting(tenacity.retry_base):
    """A retry predicate that says no once the Parallel call is being aborted."""

    def __init__(self, aborting: threading.Event) -> None:
        self.aborting = aborting

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return not self.aborting.is_set()


def _abortable(policy: RetryPolicy | None, aborting: threading.Event) -> RetryPolicy | None:
    # A batch killed by an abort must not be retried: its result is never read.
    if policy is None:
        return None
    return RetryPolicy(stop=policy.stop, wait=policy.wait, retry=tenacity.retry_all(policy.retry, _UnlessAborting(aborting)))


class _CallbackThread:
    """Runs joblib's batch callbacks, in completion order, off the pool's manager thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], object], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="resilpool-joblib-callbacks", daemon=True)
        self._thread.start()

    def put(self, callback: Callable[[Any], object], fut: Future[Any]) -> None:
        self._queue.put((callback, fut))

    def stop(self, timeout: float = _JOIN_S) -> None:
        """Run the callbacks already queued, then stop."""
        self._queue.put(None)
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("resilpool joblib callback thread still busy after %.0fs; leaving it (daemon)", timeout)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, fut = item
            try:
                callback(fut)
            except Exception:
                log.error("resilpool: joblib batch callback raised", exc_info=True)


# --- what travels to a worker -----------------------------------------------------


def _unwrap(fn: Any) -> Any:
    """The user's function under joblib/scikit-learn wrappers (partial, sklearn's _FuncWrapper)."""
    for _ in range(8):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif type(fn).__name__ == "_FuncWrapper" and hasattr(fn, "function"):
            fn = fn.function
        else:
            break
    return fn


def _describe(items: list[Any]) -> str:
    names = {getattr(_unwrap(f), "__qualname__", None) or type(f).__qualname__ for f, _, _ in items[:64]}
    name = names.pop() if len(names) == 1 else "mixed functions"
    name = name.replace("<", "").replace(">", "")  # keeps the pool's by-value test off our label
    return f"joblib batch of {len(items)} call{'s' if len(items) != 1 else ''} to {name}"


def _identity(obj: Any) -> Any:
    return obj


def _loads_by_value(data: bytes) -> Any:
    return pickle.loads(data)


class _Batch:
    """A joblib batch as the pool sees it: a named callable that unpickles to the batch itself.

    ``data`` holds the batch pickled ahead (stdlib, or cloudpickle when it must go by
    value); without it the batch is pickled where the pool pickles the task.  Once the
    pool holds the task's bytes, :meth:`release` drops ``data`` (no second copy of a
    large batch) but remembers how to pickle it again.
    """

    def __init__(self, batch: Any, data: bytes | None) -> None:
        self.batch = batch
        self.data = data
        self.by_value = False
        self.__qualname__ = _describe(list(getattr(batch, "items", ())) or [(batch, (), {})])

    def __call__(self) -> Any:
        return self.batch()

    def __reduce__(self) -> tuple[Any, ...]:
        data = self.data
        if data is None and self.by_value and cloudpickle is not None:
            data = bytes(cloudpickle.dumps(self.batch, protocol=_HIGHEST))
        if data is not None:
            return (_loads_by_value, (data,))
        return (_identity, (self.batch,))

    def release(self) -> None:
        if self.data is not None:
            self.data = None
            self.by_value = True

    def __repr__(self) -> str:
        return f"<{self.__qualname__}>"


def _interactive_main() -> bool:
    """True when ``__main__`` is a notebook, the REPL or ``python -c``: a worker cannot import it."""
    return getattr(sys.modules.get("__main__"), "__file__", None) is None


def _prepare(batch: Any, run: _Run) -> _Batch:
    """Wrap a batch; decide, for ``serializer="auto"``, whether it must go by value.

    By value (cloudpickle) when a call's function is a lambda or a local function, or when
    a worker not forked from this process could not import something the batch refers to
    in an interactive ``__main__`` (a function, a class of an argument).  Otherwise the
    pool's stdlib fast path.
    """
    if run.serializer != "auto":
        return _Batch(batch, None)
    items = getattr(batch, "items", None) or [(batch, (), {})]
    if any(_needs_by_value(_unwrap(f), run.fork) for f, _, _ in items):
        return _Batch(batch, _cloudpickle_dumps(batch))
    if run.fork or not _interactive_main():
        return _Batch(batch, None)
    try:
        data = pickle.dumps(batch, _HIGHEST)
    except Exception:
        return _Batch(batch, None)  # the pool's own fallback to cloudpickle, and its error
    if _MAIN_REF in data:
        return _Batch(batch, _cloudpickle_dumps(batch))
    return _Batch(batch, data)


def _cloudpickle_dumps(batch: Any) -> bytes | None:
    if cloudpickle is None:
        return None  # the pool says what to install
    try:
        return bytes(cloudpickle.dumps(batch, protocol=_HIGHEST))
    except Exception:
        return None  # the pool pickles it again and reports; _explain names the part


def _explain(batch: Any, err: errors.SerializationError, serializer: Serializer) -> errors.SerializationError:
    """A SerializationError naming the joblib call and the part of it that cannot be pickled."""
    items = list(getattr(batch, "items", ()))
    dumps: Callable[..., Any] = pickle.dumps
    if serializer != "pickle" and cloudpickle is not None:
        dumps = cloudpickle.dumps
    for i, (fn, args, kwargs) in enumerate(items):
        try:
            dumps((fn, args, kwargs), protocol=_HIGHEST)
        except Exception as exc:
            part = _unpicklable_part(dumps, fn, args, kwargs)
            name = getattr(_unwrap(fn), "__qualname__", None) or repr(fn)
            new = errors.SerializationError(
                f"cannot pickle the {part} of the joblib call {name}(...) (call {i + 1} of a batch of {len(items)}):"
                f" {type(exc).__name__}: {exc}",
                part=part,
                task_id=err.task_id,
            )
            new.__cause__ = exc
            return new
    return err


# --- worker side ----------------------------------------------------------------


def _init_worker(env: dict[str, str], initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    """Worker initializer: limit native thread pools (as loky does), then the user's initializer."""
    os.environ.update(env)
    if initializer is not None:
        initializer(*initargs)


def _n_workers(n_jobs: int, pool: ResilientPool | None) -> int:
    if pool is not None:
        size = pool.max_workers
        return max(size + 1 + n_jobs, 1) if n_jobs < 0 else min(n_jobs, size)
    if n_jobs < 0:
        return max(int(cpu_count()) + 1 + n_jobs, 1)
    return int(n_jobs)


def _in_worker() -> bool:
    return multiprocessing.current_process().name.startswith(_WORKER_NAME)


def _aborted_error(pid: int) -> Callable[[Any, float], BaseException]:
    def make(task: Any, elapsed: float) -> BaseException:
        return errors.WorkerCrashedError(
            f"worker {pid} was killed after {elapsed:.2f}s: joblib aborted the call (another batch failed)",
            pid=pid,
            exitcode=-signal.SIGKILL,
            task_id=task.id,
            fn_name=task.fn_name,
        )

    return make


def _kill_busy_workers(pool: ResilientPool) -> None:
    """SIGKILL the workers of ``pool`` that are running a task (the supervisor's kill seam)."""
    core = getattr(pool, "_core", None)
    if core is None or not hasattr(core, "kill_worker"):  # pragma: no cover - the seam moved
        return
    for w in pool.workers():
        if w.task_id is not None:
            core.kill_worker(w.pid, ExitReason.SHUTDOWN, _aborted_error(w.pid))


def _shutdown(pool: ResilientPool, timeout: float) -> None:
    """``pool.shutdown(wait=True, cancel_futures=True)``, but give up (and log) after ``timeout``.

    ``shutdown(wait=True)`` has no timeout of its own; a pool that cannot finish (a task
    left without a worker while it drains) must not hang the caller's Parallel call.
    """
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + timeout
    while True:
        core = getattr(pool, "_core", None)
        if core is None or not hasattr(core, "join"):  # pragma: no cover - the seam moved
            break
        if core.join(timeout=1.0) and core is pool._core:
            break
        if time.monotonic() > deadline:
            log.error("resilpool joblib: the pool did not shut down within %.0fs; leaving it: %r", timeout, pool)
            return
    pool.shutdown(wait=True)  # the core is done: this only stops the monitor and event threads


# --- the backend ----------------------------------------------------------------


@final
class ResilpoolBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib backend running each batch as a task of a supervised :class:`ResilientPool`.

    Options (``parallel_config(backend="resilpool", **options)``, ``ResilpoolBackend(**options)``
    or, with joblib >= 1.5, ``Parallel(backend="resilpool", **options)``):

    Args:
        mp_context: start method name or context; default the pool's (forkserver on Linux).
        initializer, initargs: run in each worker before its first batch.
        limits: :class:`Limits` for each worker (memory, batches per worker, lifetime,
            timeouts); timeouts and ``max_tasks`` count *batches*.
        max_tasks: shortcut for ``limits.max_tasks``: batches a worker runs before it is replaced.
        retry: retries of a failed *batch* (int or :class:`RetryPolicy`): the whole batch runs
            again, so the calls must be idempotent.  None: a failure fails the Parallel call.
        breaker: :class:`Breaker` settings.
        monitor_interval: seconds between two samples of the workers.
        serializer: ``"auto"``, ``"pickle"`` or ``"cloudpickle"``, as for the pool.
        listeners: callables given every pool event (``pool.add_listener``).
        pool: run on this pool, which you own (it stays open; nothing is killed on an
            abort); exclusive with the options above but ``retry``.

    ``n_jobs`` is the number of workers (-1: the CPUs this process may use); ``n_jobs=1``
    runs the calls in the calling process, as with every joblib backend, unsupervised.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    uses_threads = False
    supports_sharedmem = False
    default_n_jobs = 1

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None, **options: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self._options = _options(None, options)
        if self._options.pool is not None:
            self.default_n_jobs = -1  # n_jobs unset: the whole pool you gave
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._generation = 0  # bumped whenever _run is dropped: a pool built meanwhile is stale
        self._key: tuple[Any, ...] | None = None
        self._opts_in_use = self._options
        self._env: dict[str, str] = {}
        self._n_jobs = 1
        self._users = 0  # configure() calls not yet ended by terminate()
        self._closed = False  # aborted without ensure_ready: no new pool until configure()
        self._callbacks: _CallbackThread | None = None
        self._last_stats: PoolStats | None = None
        self.parallel: Any = None

    # --- joblib's backend API -------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """Workers for ``n_jobs``: -1 is every CPU this process may use; 1 inside a resilpool worker.

        With ``pool=``: at most the pool's size, and -1 is the whole pool.
        """
        return self._effective(n_jobs, self._opts_in_use.pool)

    @staticmethod
    def _effective(n_jobs: int | None, pool: ResilientPool | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if _in_worker():
            if n_jobs != 1:
                warnings.warn(
                    "resilpool-backed parallel loops cannot be nested inside a resilpool worker, setting n_jobs=1",
                    stacklevel=4,
                )
            return 1
        return _n_workers(n_jobs, pool)

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **kwargs: Any) -> int:
        """Check the options for this Parallel call; return the number of workers.

        The pool itself starts with the first batch, and is shared with the other
        Parallel calls configured (and not yet terminated) with the same options.
        """
        opts = _options(self._options, {k: v for k, v in kwargs.items() if k not in _JOBLIB_ARGS})
        n = self._effective(n_jobs, opts.pool)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        env = self._prepare_worker_env(n_jobs=n) if opts.pool is None else {}
        key = (n, opts, tuple(sorted(env.items())))
        with self._lock:
            if self._users and self._key != key:
                raise RuntimeError(
                    "this resilpool backend is still running another Parallel call with other settings"
                    f" (n_jobs={self._key[0] if self._key else '?'}); exhaust or close that call's generator first"
                )
            self._key = key
            self._opts_in_use = opts
            self._env = env
            self._n_jobs = n
            self._users += 1
            self._closed = False
        self.parallel = parallel
        return n

    def submit(self, func: Any, callback: Callable[[Any], object] | None = None) -> Future[Any]:
        """Run one batch on the pool; ``callback(future)`` runs on the callback thread when it is done.

        Never raises: an error (pool broken or shut down, batch not picklable) is the returned
        future's exception, so joblib reports it from any thread, as it reports a failed batch.
        """
        callbacks: _CallbackThread | None = None
        run: _Run | None = None
        try:
            run, callbacks = self._ensure_run()
            call = _prepare(func, run)
            fut = run.pool.submit(call, retry=run.retry)
            call.release()
            exc = fut.exception() if fut.done() else None
            if isinstance(exc, errors.SerializationError):
                err = _explain(func, exc, run.serializer)
                if err is not exc:
                    fut = Future()
                    fut.set_exception(err)
        except Exception as exc:
            fut = Future()
            fut.set_exception(exc)
        if run is not None:
            with run.lock:
                run.futures.add(fut)
        deliver = callbacks or self._callbacks

        def done(f: Future[Any]) -> None:  # on the pool's manager thread: enqueue only
            if run is not None:
                run.forget(f)
            if callback is not None and deliver is not None:
                deliver.put(callback, f)

        fut.add_done_callback(done)
        return fut

    apply_async = submit  # joblib < 1.5 calls apply_async

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's results, or its exception (the worker's traceback is its ``__cause__``)."""
        return out.result(timeout=0)  # done: joblib calls this from the batch's done-callback

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches not started; kill the workers running ours (only in a pool we own).

        Killed batches are not retried.  With ``ensure_ready`` the next batch starts a new pool.
        """
        with self._lock:
            run, self._run = self._run, None
            self._generation += 1
            if not ensure_ready:
                self._closed = True
        if run is not None:
            self._stop(run, kill=True)

    def terminate(self) -> None:
        """End of a Parallel call: the last user of an owned pool shuts it down and joins it."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users:
                return
            run, self._run = self._run, None
            self._generation += 1
            callbacks, self._callbacks = self._callbacks, None
        if run is not None:
            self._stop(run, kill=bool(run.unresolved()))
        if callbacks is not None:
            callbacks.stop()
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[Any, int | None]:
        """joblib calls inside a task run sequentially in its worker."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    # --- observability ----------------------------------------------------------------

    @property
    def pool(self) -> ResilientPool | None:
        """The pool running this backend's batches now; None between Parallel calls."""
        run = self._run
        return run.pool if run is not None else None

    def stats(self) -> PoolStats | None:
        """Counters of the current pool, or of the last one when it has been shut down."""
        run = self._run
        if run is not None:
            return run.pool.stats()
        return self._last_stats

    # --- internals ------------------------------------------------------------------

    def _ensure_run(self) -> tuple[_Run, _CallbackThread]:
        for _ in range(3):
            with self._lock:
                if self._closed or not self._users:
                    raise RuntimeError("the resilpool backend was terminated; no more batches can be submitted")
                if self._callbacks is None:
                    self._callbacks = _CallbackThread()
                callbacks = self._callbacks
                if self._run is not None:
                    return self._run, callbacks
                generation = self._generation
                opts, key, env, n_jobs = self._opts_in_use, self._key, self._env, self._n_jobs
            run = self._new_run(opts, key, env, n_jobs)  # starts processes: not under the lock
            with self._lock:
                if self._run is None and self._generation == generation and self._users and not self._closed:
                    self._run = run
                    return run, callbacks
            self._stop(run, kill=False)  # lost a race with another submitter, an abort or terminate
        raise RuntimeError("the resilpool backend is being reconfigured or terminated concurrently")

    @staticmethod
    def _new_run(opts: _Options, key: tuple[Any, ...] | None, env: dict[str, str], n_jobs: int) -> _Run:
        aborting = threading.Event()
        retry = _abortable(opts.retry, aborting)
        if opts.pool is not None:
            return _Run(opts.pool, False, key or (), retry, aborting)
        pool = ResilientPool(
            n_jobs,
            mp_context=opts.mp_context,
            initializer=_init_worker,
            initargs=(env, opts.initializer, opts.initargs),
            limits=opts.limits,
            retry=retry,
            breaker=opts.breaker,
            serializer=opts.serializer,
            **({} if opts.monitor_interval is None else {"monitor_interval": opts.monitor_interval}),
        )
        for fn in opts.listeners:
            pool.add_listener(fn)
        return _Run(pool, True, key or (), None, aborting)

    def _stop(self, run: _Run, *, kill: bool) -> None:
        """Stop using ``run``: on abort cancel its batches and kill its workers; shut an owned pool down."""
        if kill:
            run.aborting.set()
            for f in run.unresolved():
                f.cancel()  # those not started yet
            pending = run.unresolved()
            if run.owned:
                # Kill before shutting down: while the pool drains it starts no replacement, and a
                # batch queued behind a killed one would wait for a worker forever.  Each round
                # kills the workers busy now; a batch still queued runs on a replacement, is
                # killed in a later round or finishes.
                deadline = time.monotonic() + _ABORT_TIMEOUT_S
                while pending and time.monotonic() < deadline:
                    _kill_busy_workers(run.pool)
                    _, not_done = wait_futures(pending, timeout=1.0)
                    pending = list(not_done)
                if pending:
                    log.warning("resilpool joblib abort: %d batches still unresolved after %.0fs", len(pending), _ABORT_TIMEOUT_S)
        if run.owned:
            _shutdown(run.pool, _SHUTDOWN_TIMEOUT_S)
            self._last_stats = run.pool.stats()

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (inside a task, say) it travels without its pool; in a worker it runs sequentially.
        return (ResilpoolBackend, ())


def register(name: str = "resilpool", *, make_default: bool = False) -> None:
    """Register :class:`ResilpoolBackend` with joblib as ``name`` (done on import as "resilpool")."""
    register_parallel_backend(name, ResilpoolBackend, make_default=make_default)


register()
