"""Progress views of the command line: a live rich view on a terminal, plain log lines otherwise.

``resilpool demo`` and ``resilpool run`` share them.  A view reads the pool's
snapshots (:meth:`ResilientPool.stats`, :meth:`ResilientPool.workers`) and a
:class:`Tally` of its events; the caller's loop calls :meth:`update` whenever it
wakes (a view limits its own refresh rate), and ``close`` at the end.

Owners: the caller's thread owns the view; :class:`Tally` is written on the
pool's event thread and read by the caller's (its counters and deque are
updated by single, GIL-atomic operations).
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from ._pool import ResilientPool
from .events import Event, ExitReason, TaskQuarantined, TaskRetried, WorkerExited

__all__ = ["Counts", "LiveView", "PlainView", "Tally", "View", "have_rich", "make_view"]

#: ``() -> (done, failed, total)``: what the progress bar shows.
Counts = Callable[[], tuple[int, int, int]]


def _task_label(task_id: int) -> str:
    return f"task {task_id}"


class Tally:
    """Counts events for a view (called on the pool's event thread).

    ``describe`` names a task in the event lines (``resilpool run`` names the item).
    """

    def __init__(self, describe: Callable[[int], str] = _task_label) -> None:
        self.recent: collections.deque[str] = collections.deque(maxlen=8)
        self.recycled: collections.Counter[str] = collections.Counter()
        self.describe = describe

    def __call__(self, event: Event) -> None:
        stamp = time.strftime("%H:%M:%S")
        if isinstance(event, WorkerExited):
            self.recycled[event.reason.value] += 1
            if event.reason is not ExitReason.SHUTDOWN:
                self.recent.append(f"{stamp} worker {event.pid} left: {event.reason.value} ({event.detail})")
        elif isinstance(event, TaskRetried):
            self.recent.append(f"{stamp} {self.describe(event.task_id)} retried after attempt {event.attempt}: {event.error[:70]}")
        elif isinstance(event, TaskQuarantined):
            self.recent.append(f"{stamp} {self.describe(event.task_id)} ({event.fn_name}) quarantined after {event.crashes} crashes")


class View(Protocol):
    def update(self, force: bool = False) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _pool_counts(pool: ResilientPool, total: int) -> Counts:
    def counts() -> tuple[int, int, int]:
        s = pool.stats()
        return s.completed, s.failed, total

    return counts


def make_view(
    pool: ResilientPool,
    tally: Tally,
    *,
    total: int,
    counts: Counts | None = None,
    stream: IO[str] | None = None,
    plain: bool = False,
    interval: float = 2.0,
    label: str = "tasks",
) -> View:
    """A live view when ``stream`` is a terminal and rich is installed, else plain lines every ``interval`` s."""
    stream = stream if stream is not None else sys.stdout
    counts = counts or _pool_counts(pool, total)
    if not plain and stream.isatty() and have_rich():
        return LiveView(pool, tally, counts, stream=stream, label=label)
    return PlainView(pool, counts, stream=stream, interval=interval)


class PlainView:
    """One log line every ``interval`` seconds (and one at the end)."""

    def __init__(self, pool: ResilientPool, counts: Counts, *, stream: IO[str], interval: float) -> None:
        self._pool = pool
        self._counts = counts
        self._stream = stream
        self._interval = interval
        self._t0 = time.monotonic()
        self._next = self._t0 + interval
        self._closed = False

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._interval
        done, failed, total = self._counts()
        s = self._pool.stats()
        print(
            f"{now - self._t0:6.1f}s  done {done}/{total}  failed {failed}  running {s.running}"
            f"  retried {s.retried}  workers {s.workers}  crashes {s.worker_crashes}"
            f"  recycled {sum(v for k, v in s.recycled.items() if k != 'shutdown')}",
            file=self._stream,
            flush=True,
        )

    def note(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.update(force=True)


class LiveView:
    """A rich live view: progress bar, a table of workers, counters and recent events."""

    def __init__(self, pool: ResilientPool, tally: Tally, counts: Counts, *, stream: IO[str], label: str) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._pool = pool
        self._tally = tally
        self._counts = counts
        self._notes: collections.deque[str] = collections.deque(maxlen=3)
        self._label = label
        self._progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>6.1f}/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        _, _, total = counts()
        self._bar = self._progress.add_task(label, total=total, rate=0.0)
        self._t0 = time.monotonic()
        self._first: int | None = None  # resolved count at start (a resumed run), for the rate
        self._next = 0.0
        self._live = Live(self._render(), console=Console(file=stream), refresh_per_second=4, transient=False)
        self._live.start()
        self._closed = False

    def _render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        pool = self._pool
        s = pool.stats()
        done, failed, total = self._counts()
        resolved = done + failed
        if self._first is None:
            self._first = resolved
        rate = (resolved - self._first) / max(1e-9, time.monotonic() - self._t0)
        self._progress.update(self._bar, completed=resolved, total=total, rate=rate)
        table = Table(title="workers", expand=True)
        for col in ("pid", "RSS MiB", "CPU %", self._label[:-1] if self._label.endswith("s") else self._label, "running s", "tasks", "age s"):
            table.add_column(col, justify="right")
        now = time.monotonic()
        for w in pool.workers():
            table.add_row(
                str(w.pid),
                "-" if w.rss is None else f"{w.rss / 2**20:.0f}",
                "-" if w.cpu_percent is None else f"{w.cpu_percent:.0f}",
                "-" if w.task_id is None else self._tally.describe(w.task_id).split()[-1],
                "-" if w.running_since is None else f"{now - w.running_since:.1f}",
                str(w.tasks_done),
                f"{w.age_s:.0f}",
            )
        recycled = ", ".join(f"{k} {v}" for k, v in sorted(self._tally.recycled.items())) or "none"
        summary = (
            f"done {done}  failed {failed}  running {s.running}  retried {s.retried}"
            f"  crashes {s.worker_crashes}  recycled: {recycled}"
        )
        events = Panel("\n".join(self._tally.recent) or "(none yet)", title="recent events")
        parts: list[Any] = [self._progress, table, summary, events]
        if self._notes:
            parts.append("\n".join(self._notes))
        return Group(*parts)

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + 0.25
        self._live.update(self._render(), refresh=force)

    def note(self, text: str) -> None:
        self._notes.append(text)
        self.update(force=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._live.update(self._render(), refresh=True)
            self._live.stop()
