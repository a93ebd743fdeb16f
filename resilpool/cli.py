"""Command line: ``resilpool demo``.

``demo`` runs, in under a minute and with nothing to set up, the kind of job
resilpool is for: leaky tasks recycled under ``soft_max_rss``, tasks that crash
their worker and are retried, tasks that hang or run over time and are killed,
one poison task quarantined.  On a terminal it draws a live view (rich, when
installed: ``pip install 'resilpool[cli]'``); otherwise it prints plain log
lines.  It ends with a summary whose last figure is the one that matters:
lost = 0.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from . import _demo
from ._pool import ResilientPool
from .events import Event, ExitReason, TaskQuarantined, TaskRetried, WorkerExited
from .supervisor.limits import Limits

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resilpool`` command."""
    parser = argparse.ArgumentParser(prog="resilpool", description="A supervised, self-healing process pool.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show crash isolation, recycling, timeouts and retries in under a minute")
    demo.add_argument("--tasks", type=int, default=240, help="number of tasks (default 240)")
    demo.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPUs available, at least 2)")
    demo.add_argument("--plain", action="store_true", help="plain log lines even on a terminal")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.tasks < 1:
            parser.error("--tasks must be >= 1")
        if args.workers is not None and args.workers < 1:
            parser.error("--workers must be >= 1")
        return run_demo(args.tasks, args.workers, plain=args.plain)
    return 2  # pragma: no cover - argparse rejects unknown commands


class _Tally:
    """Counts events for the demo's view (called on the pool's event thread)."""

    def __init__(self) -> None:
        self.recent: collections.deque[str] = collections.deque(maxlen=8)
        self.recycled: collections.Counter[str] = collections.Counter()

    def __call__(self, event: Event) -> None:
        stamp = time.strftime("%H:%M:%S")
        if isinstance(event, WorkerExited):
            self.recycled[event.reason.value] += 1
            if event.reason is not ExitReason.SHUTDOWN:
                self.recent.append(f"{stamp} worker {event.pid} left: {event.reason.value} ({event.detail})")
        elif isinstance(event, TaskRetried):
            self.recent.append(f"{stamp} task {event.task_id} retried after attempt {event.attempt}: {event.error[:70]}")
        elif isinstance(event, TaskQuarantined):
            self.recent.append(f"{stamp} task {event.task_id} ({event.fn_name}) quarantined after {event.crashes} crashes")


def _workload(n: int, marker_dir: str) -> list[tuple[str, Any, tuple[Any, ...], int | None]]:
    """(kind, fn, args, retry) for each task: mostly leaky work, a few crashes, hangs and one poison."""
    jobs: list[tuple[str, Any, tuple[Any, ...], int | None]] = []
    for i in range(n):
        if i % 40 == 7:
            jobs.append(("crash, retried", _demo.flaky_crash, (i, marker_dir), 2))
        elif i % 80 == 23:
            jobs.append(("hang", _demo.hang, (i,), None))
        elif i % 80 == 63:
            jobs.append(("over time", _demo.slow, (i,), None))
        else:
            jobs.append(("leaky", _demo.simulate, (i,), 1))
    if n >= 20:
        jobs[n // 2] = ("poison", _demo.poison, (n // 2,), 5)
    return jobs


def run_demo(n_tasks: int = 240, workers: int | None = None, *, plain: bool = False) -> int:
    """Run the demo workload; return 0 when no task was lost."""
    workers = workers or max(2, min(4, os.cpu_count() or 2))
    limits = Limits(soft_max_rss="120MiB", max_rss="1GiB", task_timeout=4.0, stall_timeout=1.5)
    tally = _Tally()
    use_rich = not plain and sys.stdout.isatty() and _have_rich()
    if not use_rich:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        logging.getLogger("resilpool").setLevel(logging.CRITICAL)  # the live view shows events
    print(
        f"resilpool demo: {n_tasks} tasks on {workers} workers; limits: soft_max_rss 120MiB (recycle),"
        " task_timeout 4s, stall_timeout 1.5s; crashing tasks have retry=2; one poison task",
        flush=True,
    )
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="resilpool-demo-") as marker_dir, ResilientPool(workers, limits=limits) as pool:
        pool.add_listener(tally)
        jobs = _workload(n_tasks, marker_dir)
        futures = {pool.submit(fn, *a, retry=r): kind for kind, fn, a, r in jobs}
        if use_rich:
            _live_view(pool, futures, tally)
        else:
            _plain_view(pool, futures, t0)
        outcomes: collections.Counter[str] = collections.Counter()
        for fut, kind in futures.items():
            exc = fut.exception(timeout=120)
            outcomes["done" if exc is None else f"failed: {type(exc).__name__}"] += 1
        stats = pool.stats()
    lost = n_tasks - sum(outcomes.values())
    elapsed = time.monotonic() - t0
    print(f"\nSummary after {elapsed:.1f}s")
    print(f"  done:      {outcomes.pop('done', 0)}")
    print(f"  retried:   {stats.retried} attempts")
    for what, count in sorted(outcomes.items()):
        print(f"  {what}: {count}")
    recycled = {k: v for k, v in stats.recycled.items() if k != "shutdown"}
    print(f"  recycled:  {', '.join(f'{k} {v}' for k, v in sorted(recycled.items())) or 'none'}")
    print(f"  workers started: {stats.workers_started}; peak worker RSS {stats.peak_worker_rss / 2**20:.0f} MiB")
    print(f"  lost:      {lost}")
    return 0 if lost == 0 else 1


def _have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_view(pool: ResilientPool, futures: dict[cf.Future[Any], str], t0: float) -> None:
    pending = set(futures)
    while pending:
        done, pending = cf.wait(pending, timeout=2.0)
        s = pool.stats()
        print(
            f"{time.monotonic() - t0:6.1f}s  done {s.completed}  failed {s.failed}  running {s.running}"
            f"  retried {s.retried}  workers {s.workers}  crashes {s.worker_crashes}"
            f"  recycled {sum(v for k, v in s.recycled.items() if k != 'shutdown')}",
            flush=True,
        )


def _live_view(pool: ResilientPool, futures: dict[cf.Future[Any], str], tally: _Tally) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    progress = Progress(
        TextColumn("[bold]tasks"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>6.1f}/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    bar = progress.add_task("tasks", total=len(futures), rate=0.0)
    t0 = time.monotonic()

    def render() -> Group:
        s = pool.stats()
        resolved = s.completed + s.failed
        progress.update(bar, completed=resolved, rate=resolved / max(1e-9, time.monotonic() - t0))
        table = Table(title="workers", expand=True)
        for col in ("pid", "RSS MiB", "CPU %", "task", "running s", "tasks", "age s"):
            table.add_column(col, justify="right")
        now = time.monotonic()
        for w in pool.workers():
            table.add_row(
                str(w.pid),
                "-" if w.rss is None else f"{w.rss / 2**20:.0f}",
                "-" if w.cpu_percent is None else f"{w.cpu_percent:.0f}",
                "-" if w.task_id is None else str(w.task_id),
                "-" if w.running_since is None else f"{now - w.running_since:.1f}",
                str(w.tasks_done),
                f"{w.age_s:.0f}",
            )
        recycled = ", ".join(f"{k} {v}" for k, v in sorted(tally.recycled.items())) or "none"
        summary = f"done {s.completed}  failed {s.failed}  retried {s.retried}  crashes {s.worker_crashes}  recycled: {recycled}"
        events = Panel("\n".join(tally.recent) or "(none yet)", title="recent events")
        return Group(progress, table, summary, events)

    pending = set(futures)
    with Live(render(), refresh_per_second=4, transient=False) as live:
        while pending:
            _, pending = cf.wait(pending, timeout=0.25)
            live.update(render())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
