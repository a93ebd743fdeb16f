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

Pools: the backend does not build a pool per Parallel call.  It takes the process-wide
*reusable* pool for its configuration (see :class:`_Reusable`; like loky's
``get_reusable_executor``), keeps it while a Parallel call (or a ``with Parallel()``
block) runs, and gives it back at the end, so the next call finds its workers warm.
An abort cancels and kills only that call's batches; the pool stays.

Ownership: the backend's ``_lock`` guards ``_call``, ``_generation``, ``_users``,
``_closed`` and ``_callbacks``; a :class:`_Call` (the pool and the futures submitted
to it) is shared by the caller's thread and the callback thread under its own lock.
Pools are started and shut down outside every lock.

Invariant: when ``terminate()`` ends the last Parallel call of a backend, none of its
batches is left running, its memory-mapping folder is removed, and it holds no pool.
"""

from __future__ import annotations

import atexit
import copyreg
import dataclasses
import functools
import io
import logging
import multiprocessing
import multiprocessing.context
import os
import pickle
import queue
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Final, final

from joblib import _memmapping_reducer, cpu_count, register_parallel_backend  # type: ignore[import-untyped]
from joblib.disk import memstr_to_bytes  # type: ignore[import-untyped]
from joblib.parallel import (  # type: ignore[import-untyped]
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from . import errors
from ._core.serialization import Serializer, _needs_by_value, _unpicklable_part
from ._pool import ResilientPool
from .events import Event, PoolStats
from .retry import RetryPolicy
from .supervisor.breaker import Breaker
from .supervisor.limits import Limits

# Imported here, never lazily: a worker forked while another thread of ours is importing a
# module inherits that module's import lock held, and deadlocks on its own first import of it.
try:
    import cloudpickle
except ImportError:  # pragma: no cover - a dependency of the joblib extra
    cloudpickle = None

__all__ = ["ResilpoolBackend", "get_reusable_pool", "register", "shutdown_reusable_pool"]

log = logging.getLogger("resilpool")

#: Name of resilpool's worker processes (``multiprocessing.current_process().name``).
_WORKER_NAME: Final = "resilpool-worker"
#: How long an abort waits for the batches it cancelled or killed to resolve.
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


# --- the reusable pool ------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Shared:
    """A pool the backend built, shared by the Parallel calls configured the same way."""

    pool: ResilientPool
    key: tuple[Any, ...]
    users: int = 0  # Parallel calls holding it; guarded by _Reusable._lock


class _Reusable:
    """The process-wide reusable pool, as loky's ``get_reusable_executor`` keeps one executor.

    One *current* pool, built for one configuration (workers, limits, start method,
    initializer, serializer, breaker, worker environment).  A call with the same
    configuration reuses it; another configuration replaces it: the old pool is shut down
    at once when idle, or by the release of its last user.

    Ownership: ``_lock`` guards ``_current`` and every ``_Shared.users``; pools are built
    and shut down outside it.  Invariant: a pool that is not current and has no user is
    shut down (or being shut down) by the thread that made it so.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: _Shared | None = None

    def acquire(self, key: tuple[Any, ...], build: Callable[[], ResilientPool]) -> _Shared:
        with self._lock:
            cur = self._current
            if cur is not None and cur.key == key and not cur.pool.stats().broken:
                cur.users += 1
                return cur
            self._current = None
            stale = cur if cur is not None and cur.users == 0 else None
        if stale is not None:
            _close(stale.pool)
        new = _Shared(build(), key, users=1)
        with self._lock:
            lost, self._current = self._current, new  # a concurrent acquire built one too
            stale = lost if lost is not None and lost.users == 0 else None
        if stale is not None:
            _close(stale.pool)
        return new

    def release(self, shared: _Shared) -> None:
        with self._lock:
            shared.users -= 1
            stop = shared.users == 0 and shared is not self._current
        if stop:
            _close(shared.pool)

    def current(self) -> ResilientPool | None:
        cur = self._current
        return cur.pool if cur is not None else None

    def shutdown(self) -> None:
        with self._lock:
            cur, self._current = self._current, None
        if cur is not None:
            _close(cur.pool)


_REUSABLE: Final = _Reusable()


def get_reusable_pool() -> ResilientPool | None:
    """The pool the ``"resilpool"`` backend keeps between Parallel calls, if one is alive."""
    return _REUSABLE.current()


def shutdown_reusable_pool() -> None:
    """Shut the backend's reusable pool down now (it is also shut down at interpreter exit).

    The next Parallel call starts a new one.  A call still running on it fails.
    """
    _REUSABLE.shutdown()


atexit.register(shutdown_reusable_pool)


def _close(pool: ResilientPool) -> None:
    try:
        pool.shutdown(wait=True, cancel_futures=True, kill_running=True)
    except Exception:
        log.error("resilpool joblib: shutting a pool down failed", exc_info=True)


# --- one Parallel call -------------------------------------------------------------


class _Call:
    """The pool one Parallel call (or one managed ``with Parallel()`` block) submits to, and its futures.

    Shared by the caller's thread and the callback thread under ``lock``.
    """

    def __init__(
        self, pool: ResilientPool, shared: _Shared | None, retry: RetryPolicy | None, memmap: _Memmap | None, opts: _Options
    ) -> None:
        self.pool = pool
        self.shared = shared  # None: a pool the user passed (pool=)
        self.retry = retry  # per batch: calls with other retry= share the pool
        self.memmap = memmap
        # How batches are pickled: from the options the pool was built with. A pool you pass
        # (pool=) is taken as not forking, with serializer "auto": by value when in doubt.
        self.fork = shared is not None and _start_method(opts.mp_context) == "fork"
        self.serializer: Serializer = opts.serializer
        self.lock = threading.Lock()
        self.futures: set[Future[Any]] = set()

    def unresolved(self) -> list[Future[Any]]:
        with self.lock:
            return [f for f in self.futures if not f.done()]

    def forget(self, fut: Future[Any]) -> None:
        with self.lock:
            self.futures.discard(fut)


class _Memmap:
    """joblib's automatic memory-mapping for one Parallel call (``max_nbytes``, ``mmap_mode``, ``temp_folder``).

    joblib's own forward reducer (``joblib._memmapping_reducer``, as its loky backend uses
    it) dumps each array over ``max_nbytes`` once into a per-call folder and sends a
    reference; the worker maps the file.  The folder (and joblib's resource manager,
    which starts a tracker process) is made only when the first such array is pickled, so
    a call without large arrays pays nothing.  :meth:`clean` deletes the folder at the
    end of the call, whatever happened to the workers (a killed worker's maps die with it).

    Pickling runs on the caller's thread and on the callback thread: ``_lock`` guards ``_reduce``.
    """

    def __init__(self, max_nbytes: int, mmap_mode: str, temp_folder: str | None, context_id: Any, verbose: int) -> None:
        self._settings = (max_nbytes, mmap_mode, temp_folder, context_id, verbose)
        self._max_nbytes = max_nbytes
        self._lock = threading.Lock()
        self._manager: Any = None
        self._reduce: Callable[[Any], Any] | None = None
        np = _memmapping_reducer.np
        self._forward: dict[Any, Any] = {np.ndarray: self._reduce_array, np.memmap: self._reduce_array}

    def _reduce_array(self, a: Any) -> Any:
        if a.nbytes <= self._max_nbytes and not _memmapping_reducer.has_shareable_memory(a):
            return a.__reduce_ex__(_HIGHEST)  # small and in memory: pickled as usual
        with self._lock:
            if self._reduce is None:
                max_nbytes, mmap_mode, temp_folder, context_id, verbose = self._settings
                self._manager = _memmapping_reducer.TemporaryResourcesManager(temp_folder, context_id=context_id)
                # unlink_on_gc_collect=False: joblib's per-file reference counting needs loky's
                # resource tracker in the workers; ours are not loky's, so the call's end removes the files.
                forward, _ = _memmapping_reducer.get_memmapping_reducers(
                    temp_folder_resolver=self._manager.resolve_temp_folder_name,
                    max_nbytes=max_nbytes,
                    mmap_mode=mmap_mode,
                    unlink_on_gc_collect=False,
                    verbose=verbose,
                    prewarm=False,
                )
                self._reduce = forward[_memmapping_reducer.np.ndarray]
            reduce = self._reduce
        return reduce(a)

    def dumps(self, batch: Any, by_value: bool) -> bytes:
        buf = io.BytesIO()
        pickler: pickle.Pickler
        if by_value and cloudpickle is not None:
            pickler = cloudpickle.CloudPickler(buf, protocol=_HIGHEST)
            pickler.dispatch_table = {**pickler.dispatch_table, **self._forward}
        else:
            pickler = pickle.Pickler(buf, protocol=_HIGHEST)
            pickler.dispatch_table = {**copyreg.dispatch_table, **self._forward}
        pickler.dump(batch)
        return buf.getvalue()

    def clean(self) -> None:
        with self._lock:
            manager, self._manager, self._reduce = self._manager, None, None
        if manager is None:
            return
        try:
            # force: workers may have been killed holding a map; every file goes with its folder.
            manager._clean_temporary_resources(force=True, allow_non_empty=True)
        except Exception:
            log.error("resilpool joblib: could not remove the memmapping folder", exc_info=True)


def _memmap_for(kwargs: dict[str, Any], parallel: Any) -> tuple[Any, ...] | None:
    """The memory-mapping settings of this call, or None when nothing would be mapped."""
    max_nbytes = kwargs.get("max_nbytes")
    if max_nbytes is None or _memmapping_reducer.np is None:  # off, or no numpy: no array to map
        return None
    if isinstance(max_nbytes, str):
        max_nbytes = memstr_to_bytes(max_nbytes)
    mmap_mode = kwargs.get("mmap_mode") or "r"
    return (int(max_nbytes), "r+" if mmap_mode == "w+" else mmap_mode, kwargs.get("temp_folder"),
            getattr(parallel, "_id", None), int(kwargs.get("verbose") or 0))


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


def _prepare(batch: Any, call: _Call) -> _Batch:
    """Wrap a batch; decide, for ``serializer="auto"``, whether it must go by value.

    By value (cloudpickle) when a call's function is a lambda or a local function, or when
    a worker not forked from this process could not import something the batch refers to
    in an interactive ``__main__`` (a function, a class of an argument).  Otherwise the
    pool's stdlib fast path.  With memory-mapping on, the batch is pickled here, through
    joblib's array reducers.
    """
    items = getattr(batch, "items", None) or [(batch, (), {})]
    auto = call.serializer == "auto"
    by_value = call.serializer == "cloudpickle" or (auto and any(_needs_by_value(_unwrap(f), call.fork) for f, _, _ in items))
    check_main = auto and not by_value and not call.fork and _interactive_main()
    if call.memmap is not None:
        try:
            data = call.memmap.dumps(batch, by_value)
            if check_main and _MAIN_REF in data:
                data = call.memmap.dumps(batch, True)
        except Exception:
            return _Batch(batch, None)  # the pool pickles it again and reports; _explain names the part
        return _Batch(batch, data)
    if not auto:
        return _Batch(batch, None)
    if by_value:
        return _Batch(batch, _cloudpickle_dumps(batch))
    if not check_main:
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


def _start_method(mp_context: multiprocessing.context.BaseContext | str | None) -> str:
    """The start method of a pool built with ``mp_context`` (ResilientPool's default: forkserver on Linux)."""
    if mp_context is None:
        return "forkserver" if sys.platform.startswith("linux") else "spawn"
    return mp_context if isinstance(mp_context, str) else mp_context.get_start_method()


def _nested_reason(nesting_level: int | None) -> str | None:
    """Why a Parallel call here cannot start worker processes, in the words of joblib's own warnings."""
    if multiprocessing.current_process().daemon:
        return "cannot be called in a daemonic process (a multiprocessing worker)"
    if multiprocessing.current_process().name.startswith(_WORKER_NAME):
        return "cannot be nested inside a resilpool worker"
    if _in_loky_worker():
        # loky sets its own default start method in its workers, which no pool started there can use.
        return "cannot be nested inside a loky worker"
    if nesting_level and threading.current_thread() is not threading.main_thread():
        return "cannot be nested below threads"
    return None


def _in_loky_worker() -> bool:
    executor = sys.modules.get("joblib.externals.loky.process_executor")
    return bool(getattr(executor, "_CURRENT_DEPTH", 0))  # joblib's multiprocessing backend reads it too


def _aborted(reason: str) -> str:
    return f"joblib aborted the Parallel call ({reason})"


def _abort(pool: ResilientPool, futures: list[Future[Any]], reason: str) -> None:
    """Cancel ``futures`` not started; kill the workers running the others (no retry); the pool stays.

    Returns once every one is resolved (or after ``_ABORT_TIMEOUT_S``, logged): joblib
    raises the call's error after this, and no batch of the call may still run then.
    """
    pool.abort(futures, reason=_aborted(reason))
    _, not_done = wait_futures(futures, timeout=_ABORT_TIMEOUT_S)
    if not_done:
        log.warning("resilpool joblib abort: %d batches still unresolved after %.0fs", len(not_done), _ABORT_TIMEOUT_S)


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
        pool: run on this pool, which you own (it stays open; an abort kills only the
            call's batches); exclusive with the options above but ``retry``.

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
        self._call: _Call | None = None
        self._memmap_settings: tuple[Any, ...] | None = None
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
        """Workers for ``n_jobs``: -1 is every CPU this process may use.

        1, with a warning as loky gives, where no pool can start: in a daemonic process,
        inside a resilpool or loky worker, or in a thread below another Parallel call.
        With ``pool=``: at most the pool's size, and -1 is the whole pool.
        """
        return self._effective(n_jobs, self._opts_in_use.pool)

    def _effective(self, n_jobs: int | None, pool: ResilientPool | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        reason = _nested_reason(self.nesting_level)
        if reason is not None:
            if n_jobs != 1:
                warnings.warn(f"Resilpool-backed parallel loops {reason}, setting n_jobs=1", stacklevel=4)
            return 1
        return _n_workers(n_jobs, pool)

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **kwargs: Any) -> int:
        """Check the options for this Parallel call; return the number of workers.

        The pool is the process-wide reusable one for these options (see :func:`get_reusable_pool`),
        taken with the first batch and kept for the next Parallel call.
        """
        opts = _options(self._options, {k: v for k, v in kwargs.items() if k not in _JOBLIB_ARGS})
        n = self._effective(n_jobs, opts.pool)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        env = self._prepare_worker_env(n_jobs=n) if opts.pool is None else {}
        key = (n, dataclasses.replace(opts, retry=None), tuple(sorted(env.items())))
        memmap = _memmap_for(kwargs, parallel)
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
            self._memmap_settings = memmap
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
        call: _Call | None = None
        try:
            call, callbacks = self._ensure_call()
            batch = _prepare(func, call)
            fut = call.pool.submit(batch, retry=call.retry)
            batch.release()
            exc = fut.exception() if fut.done() else None
            if isinstance(exc, errors.SerializationError):
                err = _explain(func, exc, call.serializer)
                if err is not exc:
                    fut = Future()
                    fut.set_exception(err)
        except Exception as exc:
            fut = Future()
            fut.set_exception(exc)
        if call is not None:
            with call.lock:
                call.futures.add(fut)
        deliver = callbacks or self._callbacks

        def done(f: Future[Any]) -> None:  # on the pool's manager thread: enqueue only
            if call is not None:
                call.forget(f)
            if callback is not None and deliver is not None:
                deliver.put(callback, f)

        fut.add_done_callback(done)
        return fut

    apply_async = submit  # joblib < 1.5 calls apply_async

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's results, or its exception (the worker's traceback is its ``__cause__``)."""
        return out.result(timeout=0)  # done: joblib calls this from the batch's done-callback

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel this call's batches not started; kill the workers running the others (no retry).

        The pool itself stays (it is reused); only this call's batches are touched.
        """
        with self._lock:
            call, self._call = self._call, None
            self._generation += 1
            if not ensure_ready:
                self._closed = True
        if call is not None:
            self._end(call, reason="a batch failed")

    def terminate(self) -> None:
        """End of a Parallel call: give the pool back (it stays for the next call), clean temp files."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users:
                return
            call, self._call = self._call, None
            self._generation += 1
            callbacks, self._callbacks = self._callbacks, None
        if call is not None:
            self._end(call, reason="its results are no longer wanted")
        if callbacks is not None:
            callbacks.stop()
        self.reset_batch_stats()

    # --- observability ----------------------------------------------------------------

    @property
    def pool(self) -> ResilientPool | None:
        """The pool running this backend's batches now; None between Parallel calls."""
        call = self._call
        return call.pool if call is not None else None

    def stats(self) -> PoolStats | None:
        """Counters of the pool in use, or of the last one this backend used (a reused pool counts every call)."""
        call = self._call
        if call is not None:
            return call.pool.stats()
        return self._last_stats

    # --- internals ------------------------------------------------------------------

    def _ensure_call(self) -> tuple[_Call, _CallbackThread]:
        for _ in range(3):
            with self._lock:
                if self._closed or not self._users:
                    raise RuntimeError("the resilpool backend was terminated; no more batches can be submitted")
                if self._callbacks is None:
                    self._callbacks = _CallbackThread()
                callbacks = self._callbacks
                if self._call is not None:
                    return self._call, callbacks
                generation = self._generation
                opts, key, env, n_jobs, memmap = self._opts_in_use, self._key, self._env, self._n_jobs, self._memmap_settings
            call = self._new_call(opts, key or (), env, n_jobs, memmap)  # may start processes: not under the lock
            with self._lock:
                if self._call is None and self._generation == generation and self._users and not self._closed:
                    self._call = call
                    return call, callbacks
            self._end(call, reason="it was reconfigured")  # lost a race with another submitter, an abort or terminate
        raise RuntimeError("the resilpool backend is being reconfigured or terminated concurrently")

    @staticmethod
    def _new_call(opts: _Options, key: tuple[Any, ...], env: dict[str, str], n_jobs: int, memmap: tuple[Any, ...] | None) -> _Call:
        mm = _Memmap(*memmap) if memmap is not None else None
        if opts.pool is not None:
            return _Call(opts.pool, None, opts.retry, mm, opts)

        def build() -> ResilientPool:
            extra: dict[str, Any] = {} if opts.monitor_interval is None else {"monitor_interval": opts.monitor_interval}
            pool = ResilientPool(
                n_jobs,
                mp_context=opts.mp_context,
                initializer=_init_worker,
                initargs=(env, opts.initializer, opts.initargs),
                limits=opts.limits,
                breaker=opts.breaker,
                serializer=opts.serializer,
                **extra,
            )
            # Listeners are part of the configuration: they stay for the pool's life, so the
            # events of a call's last moments (an abort's kills) still reach them after it.
            for fn in opts.listeners:
                pool.add_listener(fn)
            return pool

        shared = _REUSABLE.acquire(key, build)
        return _Call(shared.pool, shared, opts.retry, mm, opts)

    def _end(self, call: _Call, *, reason: str) -> None:
        """Stop using ``call``'s pool: abort its unfinished batches, give the pool back, remove its temp files."""
        unresolved = call.unresolved()
        if unresolved:
            _abort(call.pool, unresolved, reason)
        self._last_stats = call.pool.stats()
        if call.memmap is not None:
            call.memmap.clean()
        if call.shared is not None:
            _REUSABLE.release(call.shared)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (inside a task, say) it travels without its pool; in a worker it runs sequentially.
        return (ResilpoolBackend, ())



def register(name: str = "resilpool", *, make_default: bool = False) -> None:
    """Register :class:`ResilpoolBackend` with joblib as ``name`` (done on import as "resilpool")."""
    register_parallel_backend(name, ResilpoolBackend, make_default=make_default)


register()
