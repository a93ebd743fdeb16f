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
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from .._pool import ResilientPool
from ..events import Event, ExitReason, TaskQuarantined, TaskRetried, WorkerExited

__all__ = [
    "Counts",
    "LiveView",
    "LogFormatter",
    "PlainView",
    "RateWindow",
    "Say",
    "Tally",
    "View",
    "fit",
    "format_eta",
    "have_rich",
    "human_bytes",
    "humanize",
    "make_view",
]

#: ``() -> (done, failed, total)``: what the progress bar shows.
Counts = Callable[[], tuple[int, int, int]]


def human_bytes(n: float) -> str:
    """``n`` bytes for a person: ``812 B``, ``4.0 KiB``, ``156 MiB``, ``1.50 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.2f} {unit}" if unit == "GiB" else f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{int(n)} B"


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
                self.recent.append(humanize(f"{stamp} worker {event.pid} left: {event.reason.value} ({event.detail})"))
        elif isinstance(event, TaskRetried):
            self.recent.append(humanize(f"{stamp} {self.describe(event.task_id)} retried after attempt {event.attempt}: {event.error[:300]}"))
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


class Say:
    """Lines for a person or, with ``json=True``, one JSON object per line for a log collector.

    Each line has an ``event`` (``run.start``, ``progress``, ``run.end``, ``note``, ``log``...)
    and the fields it is made of; in text mode only its ``text`` is printed.
    """

    def __init__(self, stream: IO[str], *, json_lines: bool = False) -> None:
        self.stream = stream
        self.json_lines = json_lines

    def __call__(self, event: str, text: str, *, level: str = "INFO", **fields: Any) -> None:
        if self.json_lines:
            record = {"time": iso_now(), "level": level, "event": event, "message": text, **fields}
            line = json.dumps(record, ensure_ascii=False, default=str)
        else:
            line = text
        print(line, file=self.stream, flush=True)


def iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}" + time.strftime("%z")


_BYTES = re.compile(r"\b(\d{4,}) bytes\b|\b((?:soft_)?max_rss) (\d{4,})\b")


def humanize(text: str) -> str:
    """``uses 656515072 bytes, over max_rss 419430400`` -> ``uses 626 MiB, over max_rss 400 MiB``."""

    def repl(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return human_bytes(int(m.group(1)))
        return f"{m.group(2)} {human_bytes(int(m.group(3)))}"

    return _BYTES.sub(repl, text)


class LogFormatter(logging.Formatter):
    """The pool's log records for people (sizes humanized) or as JSON lines (exact values)."""

    def __init__(self, *, json_lines: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        if not self.json_lines:
            return humanize(super().format(record))
        out: dict[str, Any] = {
            "time": iso_now(),
            "level": record.levelname,
            "event": "log",
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class RateWindow:
    """Items per second over the last ``window_s`` seconds, and the ETA it gives."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_s
        self._clock = clock
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, resolved: int) -> None:
        now = self._clock()
        self._samples.append((now, resolved))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, r0), (t1, r1) = self._samples[0], self._samples[-1]
        return (r1 - r0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_s(self, remaining: int) -> float | None:
        rate = self.rate()
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate > 0 else None


def format_eta(eta: float | None) -> str:
    if eta is None:
        return "--:--"
    eta = int(round(eta))
    h, rest = divmod(eta, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


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
    say: Say | None = None,
) -> View:
    """A live view when ``stream`` is a terminal and rich is installed, else plain lines every ``interval`` s."""
    stream = stream if stream is not None else sys.stdout
    counts = counts or _pool_counts(pool, total)
    if not plain and stream.isatty() and have_rich():
        return LiveView(pool, tally, counts, stream=stream, label=label)
    return PlainView(pool, counts, say=say or Say(stream), interval=interval)


class PlainView:
    """A progress line every ``interval`` seconds (and one at the end): done/total, failed, rate, ETA."""

    def __init__(self, pool: ResilientPool, counts: Counts, *, say: Say, interval: float) -> None:
        self._pool = pool
        self._counts = counts
        self._say = say
        self._interval = interval
        self._t0 = time.monotonic()
        self._next = self._t0 + interval
        self._closed = False
        self._rate = RateWindow(window_s=max(60.0, 3 * interval))
        self._rate.add(sum(counts()[:2]))

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._interval
        done, failed, total = self._counts()
        self._rate.add(done + failed)
        s = self._pool.stats()
        rate = self._rate.rate()
        eta = self._rate.eta_s(total - done - failed)
        recycled = sum(v for k, v in s.recycled.items() if k != "shutdown")
        text = (
            f"{now - self._t0:6.1f}s  done {done}/{total}  failed {failed}  {rate:.1f}/s  ETA {format_eta(eta)}"
            f"  running {s.running}  retried {s.retried}  workers {s.workers}  crashes {s.worker_crashes}  recycled {recycled}"
        )
        self._say(
            "progress",
            text,
            elapsed_s=round(now - self._t0, 3),
            done=done,
            total=total,
            failed=failed,
            rate_per_s=round(rate, 3),
            eta_s=None if eta is None else round(eta, 1),
            running=s.running,
            retried=s.retried,
            workers=s.workers,
            crashes=s.worker_crashes,
            recycled=recycled,
        )

    def note(self, text: str) -> None:
        self._say("note", text)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.update(force=True)


def fit(text: str, width: int) -> str:
    """``text`` in ``width`` columns, elided at a word boundary with ``…`` (never mid-word)."""
    if len(text) <= width:
        return text
    cut = text.rfind(" ", 0, width - 1)
    if cut <= width // 3:
        cut = width - 1  # one long word: cut it, there is no boundary to keep
    return text[:cut].rstrip() + "…"


class LiveView:
    """A rich live view that fits the terminal: progress bar, workers, counters and recent events.

    The progress bar and the counters come first and always fit; the worker table and
    the recent events share the rows left (a "+N more" row stands for workers not
    shown); event lines are elided at a word boundary.  The ETA comes from the rate
    over the last 30 s.  ``close`` leaves one final bar on the screen.
    """

    def __init__(self, pool: ResilientPool, tally: Tally, counts: Counts, *, stream: IO[str], label: str, console: Any = None) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._pool = pool
        self._tally = tally
        self._counts = counts
        self._notes: collections.deque[str] = collections.deque(maxlen=3)
        self._label = label
        self._console = console if console is not None else Console(file=stream)
        self._progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>6.1f}/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self._console,
            expand=True,
        )
        _, _, total = counts()
        self._bar = self._progress.add_task(label, total=total, rate=0.0, eta="--:--")
        self._rate = RateWindow(window_s=30.0)
        self._next = 0.0
        self._live = Live(self._render(), console=self._console, refresh_per_second=4, transient=True, redirect_stdout=False, redirect_stderr=False)
        self._live.start()
        self._closed = False

    def _render(self) -> Any:
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        pool = self._pool
        s = pool.stats()
        done, failed, total = self._counts()
        resolved = done + failed
        self._rate.add(resolved)
        rate = self._rate.rate()
        self._progress.update(self._bar, completed=resolved, total=total, rate=rate, eta=format_eta(self._rate.eta_s(total - resolved)))
        width, height = self._console.size
        recycled = ", ".join(f"{k} {v}" for k, v in sorted(self._tally.recycled.items()) if k != "shutdown") or "none"
        summary = fit(
            f"done {done}  failed {failed}  running {s.running}  retried {s.retried}  crashes {s.worker_crashes}  recycled: {recycled}",
            width,
        )
        notes = [fit(n, width) for n in self._notes]
        # Rows: bar 1, summary 1, notes, table title+header+rule 3, "recent events" rule 1.
        free = max(0, height - 1 - 1 - len(notes) - 3 - 1 - 1)
        workers = pool.workers()
        events = list(self._tally.recent)
        n_events = min(len(events), max(1, free // 3)) if events else 0
        n_rows = min(len(workers), max(0, free - n_events))
        if n_rows < len(workers) and n_rows > 0:
            n_rows -= 1  # room for the "+N more" row
        table = Table(title="workers", expand=True, box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False, pad_edge=False)
        item = self._label[:-1] if self._label.endswith("s") else self._label
        for col in ("pid", "RSS", "CPU %", item, "running s", self._label, "age s"):
            table.add_column(col, justify="right", no_wrap=True)
        now = time.monotonic()
        for w in workers[:n_rows]:
            table.add_row(
                str(w.pid),
                "-" if w.rss is None else human_bytes(w.rss),
                "-" if w.cpu_percent is None else f"{w.cpu_percent:.0f}",
                "-" if w.task_id is None else self._tally.describe(w.task_id).split()[-1],
                "-" if w.running_since is None else f"{now - w.running_since:.1f}",
                str(w.tasks_done),
                f"{w.age_s:.0f}",
            )
        if len(workers) > n_rows:
            table.add_row(f"+{len(workers) - n_rows} more", "", "", "", "", "", "")
        lines = [fit(humanize(e), width) for e in events[-n_events:]] if n_events else []
        parts: list[Any] = [self._progress, Text(summary, no_wrap=True, overflow="crop")]
        parts.extend(Text(n, no_wrap=True, overflow="crop") for n in notes)
        parts.append(table)
        title = "── recent events "
        parts.append(Text(title + "─" * max(0, width - len(title)), style="dim", no_wrap=True, overflow="crop"))
        parts.extend(Text(line, no_wrap=True, overflow="crop") for line in (lines or ["(none yet)"]))
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
        """Stop the live display (it is erased) and print one final bar and the counters."""
        if not self._closed:
            self._closed = True
            self._render()
            self._live.stop()
            self._console.print(self._progress.get_renderable())
