"""One small adapter per pool library, so every figure is written once.

Each adapter wraps a library's own idiom behind the same few calls: ``submit``
(its ``submit``/``schedule``/``apply_async``), ``result``, ``map`` (its lazy,
ordered map), ``worker_pids`` (the library's own list of live workers, read
from private attributes where there is no public one), ``broken`` and
``close``.  Libraries are imported only when their adapter opens a pool, so a
missing or broken library costs one row, not the run.

The resilpool adapter also backs onto ``bench/standin.py`` when the driver
asks for the stand-in (``--standin``), so the harness can be exercised before
the library works.  Features resilpool may not have yet (``Limits``,
``retry=``, ``monitor_interval=``) raise :class:`Unsupported`, which the
figures turn into an ``n/a: <reason>`` row.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

#: Library keys in table order; resilpool first so its row is easy to find.
LIBS = ("resilpool", "cf", "mp", "loky", "pebble", "billiard", "mpire")
#: Extra rows the driver adds, not chosen with --libs: resilpool with mp_context="fork" (figures with
#: ``fork_variant``) or "spawn" (``spawn_variant``), and resilpool at a baseline git revision
#: (``--baseline REV``, its own venv).
EXTRA = ("resilpool-fork", "resilpool-spawn", "baseline")
#: The rows that are resilpool's own (marked in tables; never a peer).
SUBJECTS = ("resilpool", "resilpool-fork", "resilpool-spawn")
#: Environment variable that tells a baseline child which revision it runs (for its label).
BASELINE_ENV = "RESILPOOL_BENCH_BASELINE"

LABELS = {
    "resilpool": "resilpool",
    "cf": "concurrent.futures",
    "mp": "multiprocessing.Pool",
    "loky": "loky",
    "pebble": "pebble",
    "billiard": "billiard",
    "mpire": "mpire",
    "resilpool-fork": "resilpool [fork]",
    "resilpool-spawn": "resilpool [spawn]",
    "baseline": "resilpool (baseline)",
}

#: Recycling setting of the leaky figure: a task count, as every peer offers one.
RECYCLE_TASKS = 10
#: resilpool's memory-based recycling threshold in the leaky figure.
SOFT_MAX_RSS = "200MiB"


class Unsupported(Exception):
    """The library (so far) lacks what a figure needs; the row says ``n/a``."""


def make(key: str, *, standin: bool = False, start_method: str | None = None) -> Adapter:
    """Build the adapter for library ``key`` (one of :data:`LIBS` or :data:`EXTRA`)."""
    if key == "resilpool":
        return Resilpool(standin=standin, start_method=start_method)
    if key in ("resilpool-fork", "resilpool-spawn"):
        return ResilpoolVariant(key.removeprefix("resilpool-"), standin=standin)
    if key == "baseline":
        return Baseline(start_method=start_method)
    return _ADAPTERS[key](start_method=start_method)


class Adapter:
    """The common face of a pool library; subclasses fill in the idiom.

    Attributes:
        key: short name used on the command line (``--libs``).
        label: name shown in tables.
        pool: the library's pool object while open.
        workers: number of worker processes asked for.
    """

    key = ""
    dist = ""  # distribution name, for the version column
    has_initializer = True  # takes a per-worker initializer when the pool is made

    def __init__(self, *, start_method: str | None = None) -> None:
        self.start_method = start_method
        self.pool: Any = None
        self.workers = 0
        self.variant_note = ""
        self.initializer: tuple[Callable[..., Any], tuple[Any, ...]] | None = None

    @property
    def label(self) -> str:
        return LABELS[self.key]

    def version(self) -> str:
        """Installed version of the library (Python's own for the stdlib)."""
        if not self.dist:
            import platform

            return "stdlib " + platform.python_version()
        return metadata.version(self.dist)

    def open(
        self,
        workers: int,
        *,
        recycle: str | None = None,
        monitor: bool = True,
        initializer: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
    ) -> None:
        """Create the pool with ``workers`` processes.

        ``recycle`` asks for the library's best offer against a leaking task:
        ``"tasks"`` (restart after :data:`RECYCLE_TASKS` tasks) or ``"rss"``
        (resilpool's memory threshold).  ``monitor=False`` asks resilpool for a
        pool without its monitor; peers have none and ignore it.
        ``initializer`` is ``(fn, args)`` for the library's worker initializer
        (ignored by a library that has none: mpire).
        """
        self.workers = workers
        self.initializer = initializer
        self.pool = self._create(workers, recycle, monitor)

    def _init_kwargs(self) -> dict[str, Any]:
        """``initializer=`` and ``initargs=`` for libraries that spell them that way."""
        if self.initializer is None:
            return {}
        fn, args = self.initializer
        return {"initializer": fn, "initargs": args}

    def _create(self, workers: int, recycle: str | None, monitor: bool) -> Any:
        raise NotImplementedError

    def _mp_context(self) -> Any:
        """The ``multiprocessing`` context for ``--start-method``, or None for the default."""
        return multiprocessing.get_context(self.start_method) if self.start_method else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Queue one call; return the library's handle (future or async result)."""
        return self.pool.submit(fn, *args)

    def result(self, handle: Any, timeout: float | None = None) -> Any:
        """Wait for a handle from :meth:`submit`."""
        return handle.result(timeout)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int) -> Iterator[Any]:
        """The library's ordered map, as an iterator of results."""
        return iter(self.pool.map(fn, items, chunksize=chunksize))

    def worker_pids(self) -> list[int]:
        """Pids of the live workers, as the library itself counts them."""
        raise Unsupported(f"{self.label}: no way to list its workers")

    def full_strength(self, before: set[int], victim: int) -> bool:
        """True once the pool has its full worker count again, without ``victim``."""
        pids = set(self.worker_pids())
        return len(pids) >= self.workers and victim not in pids

    def broken(self) -> str | None:
        """The library's own word that the pool is broken (None: not broken, or cannot tell)."""
        return None

    def close(self) -> None:
        """Shut the pool down, waiting for its workers."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.pool = None


def _alive(procs: Iterable[Any]) -> list[int]:
    return [p.pid for p in procs if p is not None and p.pid is not None and p.is_alive()]


class StdlibExecutor(Adapter):
    """``concurrent.futures.ProcessPoolExecutor``."""

    key = "cf"

    def _create(self, workers: int, recycle: str | None, monitor: bool) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        kwargs: dict[str, Any] = {"mp_context": self._mp_context(), **self._init_kwargs()}
        if recycle:
            # 3.11+: without an explicit context this switches to "spawn" (fork is refused).
            kwargs["max_tasks_per_child"] = RECYCLE_TASKS
            self.variant_note = f"max_tasks_per_child={RECYCLE_TASKS}"
        return ProcessPoolExecutor(workers, **kwargs)

    def worker_pids(self) -> list[int]:
        return _alive(list((self.pool._processes or {}).values()))

    def broken(self) -> str | None:
        return self.pool._broken or None


class MpPool(Adapter):
    """``multiprocessing.Pool`` (``apply_async`` / ``imap``)."""

    key = "mp"

    def _module(self) -> Any:
        return multiprocessing

    def _create(self, workers: int, recycle: str | None, monitor: bool) -> Any:
        mod = self._module()
        ctx = mod.get_context(self.start_method) if self.start_method else mod
        tasks = RECYCLE_TASKS if recycle else None
        if tasks:
            self.variant_note = f"maxtasksperchild={tasks}"
        return ctx.Pool(workers, maxtasksperchild=tasks, **self._init_kwargs())

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply_async(fn, args)

    def result(self, handle: Any, timeout: float | None = None) -> Any:
        return handle.get(timeout)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int) -> Iterator[Any]:
        return iter(self.pool.imap(fn, items, chunksize))

    def worker_pids(self) -> list[int]:
        return _alive(list(self.pool._pool))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
        self.pool = None


class Billiard(MpPool):
    """``billiard.Pool``, Celery's fork of ``multiprocessing.Pool``."""

    key = "billiard"
    dist = "billiard"

    def _module(self) -> Any:
        return importlib.import_module("billiard")

    def close(self) -> None:
        if self.pool is not None:
            # billiard's close()+join() can wait on a lost worker forever; terminate is its sure stop.
            self.pool.terminate()
            self.pool.join()
        self.pool = None


class Loky(Adapter):
    """``loky.get_reusable_executor`` (leak detection is built in and automatic)."""

    key = "loky"
    dist = "loky"

    def _create(self, workers: int, recycle: str | None, monitor: bool) -> Any:
        import loky

        if recycle:
            self.variant_note = "automatic leak detection"
        # timeout: keep idle workers for the whole figure (loky's default reaps them after 10 s).
        return loky.get_reusable_executor(
            max_workers=workers, context=self.start_method, timeout=600, **self._init_kwargs()
        )

    def worker_pids(self) -> list[int]:
        return _alive(list((self.pool._processes or {}).values()))

    def broken(self) -> str | None:
        flags = getattr(self.pool, "_flags", None)
        err = getattr(flags, "broken", None)
        return first_sentence(err) if err else None


class Pebble(Adapter):
    """``pebble.ProcessPool`` (``schedule`` / ``map``)."""

    key = "pebble"
    dist = "pebble"

    def _create(self, workers: int, recycle: str | None, monitor: bool) -> Any:
        import pebble

        tasks = RECYCLE_TASKS if recycle else 0
        if tasks:
            self.variant_note = f"max_tasks={tasks}"
        ctx = self._mp_context() or multiprocessing
        return pebble.ProcessPool(max_workers=workers, max_tasks=tasks, context=ctx, **self._init_kwargs())

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.schedule(fn, args=args)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int) -> Iterator[Any]:
        return iter(self.pool.map(fn, items, chunksize=chunksize).result())

    def worker_pids(self) -> list[int]:
        return _alive(list(self.pool._pool_manager.worker_manager.workers.values()))

    def broken(self) -> str | None:
        status = self.pool._context.status
        return f"pool status {status.name}" if status.name == "ERROR" else None

    def close(self) -> None:
        if self.pool is not None:
            if self.broken():
                self.pool.stop()
            else:
                self.pool.close()
            self.pool.join()
        self.pool = None


class Mpire(Adapter):
    """``mpire.WorkerPool`` (``apply_async`` / ``imap``; kept alive between calls)."""

    key = "mpire"
    dist = "mpire"
    has_initializer = False  # mpire's worker_init is per map call, not per pool

    def _create(self, workers: int, recycle: str | None, monitor: bool) -> Any:
        import mpire

        self._lifespan = RECYCLE_TASKS if recycle else None
        if recycle:
            self.variant_note = f"worker_lifespan={RECYCLE_TASKS}"
        kwargs: dict[str, Any] = {"keep_alive": True}
        if self.start_method:
            kwargs["start_method"] = self.start_method
        return mpire.WorkerPool(n_jobs=workers, **kwargs)  # type: ignore[attr-defined]

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply_async(fn, args)

    def result(self, handle: Any, timeout: float | None = None) -> Any:
        return handle.get(timeout)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int) -> Iterator[Any]:
        items = list(items)  # mpire needs the length to chunk without warnings
        return iter(
            self.pool.imap(fn, items, iterable_len=len(items), chunk_size=chunksize, worker_lifespan=self._lifespan)
        )

    def worker_pids(self) -> list[int]:
        return _alive(list(self.pool._workers))

    def broken(self) -> str | None:
        return "a worker died; pool shut down" if self.pool._worker_comms.exception_thrown() else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
        self.pool = None


class Resilpool(Adapter):
    """``resilpool.ResilientPool`` — the library under test (or its stand-in)."""

    key = "resilpool"
    dist = "resilpool"

    def __init__(self, *, standin: bool = False, start_method: str | None = None) -> None:
        super().__init__(start_method=start_method)
        self.standin = standin
        self._retry = 0  # retry= passed on every submit (0: not passed)
        self._mod: Any = None

    @property
    def label(self) -> str:
        return "resilpool (STAND-IN)" if self.standin else "resilpool"

    def module(self) -> Any:
        """The ``resilpool`` package, or ``bench/standin.py``; Unsupported if it won't import."""
        if self._mod is None:
            name = "standin" if self.standin else "resilpool"
            try:
                self._mod = importlib.import_module(name)
                self._mod.ResilientPool  # noqa: B018 - the attribute is the check
            except Exception as exc:  # an unfinished package can fail in any way
                raise Unsupported(f"cannot import ResilientPool: {type(exc).__name__}: {exc}") from exc
        return self._mod

    def version(self) -> str:
        if self.standin:
            return "stand-in (stdlib ProcessPoolExecutor, forkserver)"
        try:
            return metadata.version(self.dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    def _create(self, workers: int, recycle: str | None, monitor: bool) -> Any:
        mod = self.module()
        kwargs: dict[str, Any] = {"max_workers": workers, "mp_context": self._mp_context(), **self._init_kwargs()}
        if recycle:
            kwargs["limits"] = self._limits(mod, recycle)
        if not monitor:
            kwargs["monitor_interval"] = None
        options = [k for k in kwargs if k not in ("max_workers", "mp_context", "initializer", "initargs")]
        try:
            return mod.ResilientPool(**kwargs)
        except (TypeError, ValueError) as exc:
            if not options:
                raise
            shown = ", ".join(f"{k}={kwargs[k]!r}" for k in options)
            raise Unsupported(f"ResilientPool({shown}) refused: {type(exc).__name__}: {exc}") from exc

    def _limits(self, mod: Any, recycle: str) -> Any:
        if not hasattr(mod, "Limits"):
            raise Unsupported("no resilpool.Limits yet")
        option = {"soft_max_rss": SOFT_MAX_RSS} if recycle == "rss" else {"max_tasks": RECYCLE_TASKS}
        try:
            limits = mod.Limits(**option)
        except Exception as exc:
            raise Unsupported(f"Limits({option}) refused: {type(exc).__name__}: {exc}") from exc
        self.variant_note = ", ".join(f"{k}={v}" for k, v in option.items())
        return limits

    def enable_retry(self, times: int) -> None:
        """Make :meth:`submit` pass ``retry=times``; Unsupported if submit() refuses it."""
        from tasks import add_one

        try:
            value = self.pool.submit(add_one, 1, retry=times).result(30)
        except TypeError as exc:
            raise Unsupported(f"submit(retry=...) refused: {exc}") from exc
        if value != 2:
            raise Unsupported(f"submit(retry=...) returned {value!r}, expected 2")
        self._retry = times

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._retry:
            return self.pool.submit(fn, *args, retry=self._retry)
        return self.pool.submit(fn, *args)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int) -> Iterator[Any]:
        return iter(self.pool.map(fn, items, chunksize=chunksize))

    def worker_pids(self) -> list[int]:
        if not hasattr(self.pool, "workers"):
            raise Unsupported("no ResilientPool.workers() yet")
        return [w.pid for w in self.pool.workers()]

    def ready_workers(self) -> int:
        """``pool.stats().workers``: live, ready workers as resilpool counts them."""
        if not hasattr(self.pool, "stats"):
            raise Unsupported("no ResilientPool.stats() yet")
        return int(self.pool.stats().workers)

    def broken(self) -> str | None:
        stats = self.pool.stats() if hasattr(self.pool, "stats") else None
        return "stats().broken" if getattr(stats, "broken", False) else None

    def full_strength(self, before: set[int], victim: int) -> bool:
        """resilpool is whole when stats() counts every worker ready and the pid set changed."""
        if self.ready_workers() < self.workers:
            return False
        pids = set(self.worker_pids())
        return victim not in pids and pids != before and len(pids) >= self.workers


class ResilpoolVariant(Resilpool):
    """resilpool with a start method of its own: ``resilpool [fork]`` (level with the
    fork-based peers on start-up?) and ``resilpool [spawn]``."""

    def __init__(self, method: str, *, standin: bool = False) -> None:
        super().__init__(standin=standin, start_method=method)

    @property
    def label(self) -> str:
        return f"{super().label} [{self.start_method}]"


class Baseline(Resilpool):
    """resilpool at an earlier git revision (``bench/run --baseline REV``), from a venv of its own.

    The driver runs this adapter's children with that venv's interpreter, so
    ``import resilpool`` finds the old version; the bench code is this
    checkout's.  Not a peer: its rows count neither as resilpool's nor for
    "best peer"; the before/after table compares them with resilpool's.
    """

    key = "baseline"

    @property
    def label(self) -> str:
        return f"resilpool@{os.environ.get(BASELINE_ENV, 'baseline')}"

    def version(self) -> str:
        return f"{super().version()} at {os.environ.get(BASELINE_ENV, '?')}"


_ADAPTERS: dict[str, type[Adapter]] = {
    "resilpool": Resilpool,
    "cf": StdlibExecutor,
    "mp": MpPool,
    "loky": Loky,
    "pebble": Pebble,
    "billiard": Billiard,
    "mpire": Mpire,
}


def first_sentence(exc: BaseException) -> str:
    """``Type: first sentence of the message`` - enough for a table cell."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text.split('. ')[0]}".rstrip(": ")


def describe_start_method(pid: int) -> str:
    """Say how worker ``pid`` was started, read from the process tree (not from config).

    A worker whose parent is a forkserver was forked by it; one whose command
    line carries ``--multiprocessing-fork`` was spawned; loky's workers run
    ``loky.backend.popen_loky_posix``; a child of this process running this
    very command line was forked from it.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline())
        parent = proc.parent()
        parent_cmd = " ".join(parent.cmdline()) if parent else ""
    except (psutil.Error, OSError) as exc:
        return f"unknown ({type(exc).__name__})"
    if "forkserver" in parent_cmd:
        return "forkserver"
    if "popen_loky" in cmd:
        return "loky (fork+exec)"
    if "--multiprocessing-fork" in cmd or "spawn_main" in cmd:
        return "spawn"
    if parent and parent.pid == os.getpid() and proc.cmdline() == psutil.Process().cmdline():
        return "fork"
    if parent and parent.pid != os.getpid():
        return f"child of {parent.name()} (pid {parent.pid})"
    return "unknown"
