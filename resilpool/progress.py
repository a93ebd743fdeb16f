"""A progress display for a long ``map`` or a set of futures (``pip install 'resilpool[cli]'``: rich).

What it owns: wrapping an iterable of results, or a set of futures, in a rich progress
bar that also shows the pool's health (workers, retries, failures, crashes)::

    from resilpool import ResilientPool
    from resilpool.progress import as_completed, progress

    with ResilientPool(4) as pool:
        for row in progress(pool.map(work, items), total=len(items), pool=pool):
            ...
        futures = [pool.submit(work, x) for x in items]
        for fut in as_completed(futures, pool=pool, description="fits"):
            ...

Off by default: the pool never draws anything, and nothing here runs unless you wrap
your loop.  ``disable=True`` returns the iterable itself (no cost at all), so a flag can
switch the display off.  The display runs in the consuming thread plus rich's refresh
thread, which stops when the loop ends (or the generator is closed).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any, Final, TypeVar, cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ._pool import ResilientPool

__all__ = ["as_completed", "progress"]

T = TypeVar("T")
F = TypeVar("F", bound="Future[Any]")

#: Seconds between two reads of the pool's stats: the display needs no more.
_STATS_EVERY_S: Final = 0.25


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    description: str = "tasks",
    pool: ResilientPool | None = None,
    console: Console | None = None,
    disable: bool = False,
) -> Iterable[T]:
    """Yield ``iterable``'s items while a progress bar counts them.

    Args:
        iterable: what to consume, e.g. ``pool.map(fn, items)``.
        total: the number of items, when ``len()`` cannot tell; None: a bar without an end.
        description: the label before the bar.
        pool: show this pool's workers, retries, failures and crashes beside the bar.
        console: a ``rich.console.Console`` to draw on (default: rich's, stderr on a terminal).
        disable: return ``iterable`` unchanged and draw nothing.
    """
    if disable:
        return iterable
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return _progress(iterable, total, description, pool, console)


def as_completed(
    futures: Iterable[F],
    *,
    timeout: float | None = None,
    description: str = "tasks",
    pool: ResilientPool | None = None,
    console: Console | None = None,
    disable: bool = False,
) -> Iterator[F]:
    """:func:`concurrent.futures.as_completed` with a progress bar of the futures done.

    Raises ``TimeoutError`` as the stdlib does when ``timeout`` passes first.
    """
    fs = list(futures)
    done = cast("Iterator[F]", concurrent.futures.as_completed(fs, timeout=timeout))
    if disable:
        return done
    return _progress(done, len(fs), description, pool, console)


def _progress(iterable: Iterable[T], total: int | None, description: str, pool: ResilientPool | None, console: Console | None) -> Iterator[T]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[pool]}"),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, pool=_pool_text(pool))
        last = time.monotonic()
        for item in iterable:
            now = time.monotonic()
            if pool is not None and now - last >= _STATS_EVERY_S:
                last = now
                bar.update(task, advance=1, pool=_pool_text(pool))
            else:
                bar.update(task, advance=1)
            yield item
        bar.update(task, pool=_pool_text(pool))  # the final figures stay on screen


def _pool_text(pool: ResilientPool | None) -> str:
    if pool is None:
        return ""
    s = pool.stats()
    parts = [f"workers {s.workers}/{s.max_workers}"]
    if s.retried:
        parts.append(f"retried {s.retried}")
    if s.failed:
        parts.append(f"failed {s.failed}")
    if s.worker_crashes:
        parts.append(f"crashes {s.worker_crashes}")
    if s.broken:
        parts.append("[red]broken")
    return " · ".join(parts)
