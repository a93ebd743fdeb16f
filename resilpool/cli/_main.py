"""Command line: ``resilpool demo``, ``resilpool run`` and ``resilpool report``.

- ``demo`` runs, in under a minute and with nothing to set up, the kind of job
  resilpool is for: leaky tasks recycled under ``soft_max_rss``, tasks that crash
  their worker and are retried, tasks that hang or run over time and are killed,
  one poison task quarantined.  It ends with a summary whose last figure is the
  one that matters: lost = 0.
- ``run MODULE:FUNCTION --input F --output F`` calls a function on every item of a
  file, unattended, with a journal to resume after a crash (``resilpool.cli._run``).
- ``report JOURNAL`` summarizes a journal (``resilpool.cli._report``).

On a terminal the commands draw a live view (rich, when installed:
``pip install 'resilpool[cli]'``); otherwise they print plain log lines
(``resilpool.cli._view``).  This module only parses arguments: a bad one is a
one-line error and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from . import _demo
from .._pool import ResilientPool
from ._view import Tally, have_rich, make_view
from ..supervisor.limits import Limits

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``resilpool run: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="resilpool", description="A supervised, self-healing process pool.")
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="show crash isolation, recycling, timeouts and retries in under a minute")
    demo.add_argument("--tasks", type=int, default=240, help="number of tasks (default 240)")
    demo.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPUs available, at least 2)")
    demo.add_argument("--plain", action="store_true", help="plain log lines even on a terminal")

    run = sub.add_parser(
        "run",
        help="call MODULE:FUNCTION on every item of a file, resumably",
        description="Call MODULE:FUNCTION on every item of the input, in supervised workers; write each"
        " result as a JSON line as soon as it is done. With --journal, rerunning the same command after a"
        " crash, kill or reboot runs only the items not done. See docs/cli.md.",
    )
    run.add_argument("target", metavar="MODULE:FUNCTION", help="the function to call with each item (MODULE may be path/to/file.py)")
    run.add_argument("--input", "-i", required=True, metavar="FILE", help="items: .jsonl/.json (JSON lines or an array), .csv (rows as dicts), .txt (lines); - or a pipe is read to its end first")
    run.add_argument("--output", "-o", metavar="FILE", help="results, one JSON line per item: {\"index\", \"input\", \"result\"}; - for standard output")
    run.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (and errors file) that no journal accounts for")
    run.add_argument("--format", choices=("jsonl", "json", "csv", "txt"), help="input format (default: from the extension)")
    run.add_argument("--encoding", default="utf-8", metavar="CODEC", help="the input's text encoding (default utf-8; e.g. latin-1, cp1252, utf-16)")
    run.add_argument("--workers", "-w", type=int, metavar="N", help="worker processes (default: the CPUs available)")
    run.add_argument("--max-rss", metavar="SIZE", help="kill a worker above this memory (e.g. 2GiB); its item fails (or is retried)")
    run.add_argument("--soft-max-rss", metavar="SIZE", help="recycle a worker above this memory after its item")
    run.add_argument("--task-timeout", type=float, metavar="SECONDS", help="kill an item running longer than this")
    run.add_argument("--stall-timeout", type=float, metavar="SECONDS", help="kill an item whose worker used no CPU for this long")
    run.add_argument("--max-tasks", type=int, metavar="N", help="replace a worker after N items")
    run.add_argument(
        "--chunk-size",
        type=int,
        metavar="N",
        help="items per task (default: sized from the items' measured time, about 20 ms of work, at most 256; always 1 with --retry, time limits, --max-tasks or --scheduler)",
    )
    run.add_argument("--retry", type=int, default=0, metavar="N", help="run a failed item up to N more times (default 0)")
    run.add_argument("--retry-wait", metavar="MIN:MAX", help="back off before each retry: MIN*2**(k-1) seconds before retry k, at most MAX, plus jitter (e.g. 1:60); or SECONDS")
    run.add_argument("--halt", metavar="WHEN,fail=N", help="stop after N failed items (or P%%): soon,fail=N lets running items finish, now,fail=N kills them; GNU parallel's --halt")
    run.add_argument("--skip-failed", action="store_true", help="on resume, do not retry the items that failed earlier (only pending and interrupted ones run)")
    run.add_argument("--retry-quarantined", action="store_true", help="on resume, retry quarantined items too (they killed their worker every time; skipped by default)")
    run.add_argument("--journal", "-j", metavar="FILE", help="SQLite journal: rerunning with it resumes (default: none)")
    run.add_argument("--errors", metavar="FILE", help="failed items, one JSON line each (default: OUTPUT with .errors before the extension; standard error with -o -); - for standard error")
    run.add_argument("--report", metavar="FILE", help="write a JSON report of the journal at the end")
    run.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run items on a Dask cluster: a scheduler address, or 'local' for a LocalCluster (needs resilpool[dask]); the journal stays here",
    )
    run.add_argument("--ordered", action="store_true", help="write results in input order (completed items wait for earlier ones)")
    run.add_argument("--dry-run", action="store_true", help="run the first item in a worker, print its result, write nothing")
    run.add_argument("--plain", action="store_true", help="plain log lines even on a terminal")
    run.add_argument("--progress-interval", type=float, default=60.0, metavar="SECONDS", help="seconds between progress lines off a terminal (default 60)")
    run.add_argument("--log-interval", type=float, dest="progress_interval", help=argparse.SUPPRESS)  # the old name
    run.add_argument("--log-format", choices=("text", "json"), default="text", help="text lines, or one JSON object per line (time, level, event, fields) on standard error")
    run.add_argument("--verbose", "-v", action="store_true", help="log at INFO (the pool's and Dask's), not only warnings")
    run.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics at http://ADDR:PORT/metrics while the run lasts (needs resilpool[metrics]; 0 picks a free port)")
    run.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR", help="the address --metrics-port binds (default 127.0.0.1: this machine only)")

    report = sub.add_parser("report", help="summarize a run journal", description="Summarize a resilpool run journal.")
    report.add_argument("journal", metavar="JOURNAL", help="the --journal file of a run")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


class _VersionAction(argparse.Action):
    """``--version``: looks the version up only when asked (importlib.metadata costs every run ~20 ms)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        print(f"resilpool {_version()}", flush=True)  # on standard output, as argparse's own action
        parser.exit()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("resilpool")
    except Exception:  # not installed (run from a checkout)
        from .. import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resilpool`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.tasks < 1:
            parser.error("--tasks must be >= 1")
        if args.workers is not None and args.workers < 1:
            parser.error("--workers must be >= 1")
        return run_demo(args.tasks, args.workers, plain=args.plain)
    if args.command == "run":
        return _run_command(args, argv)
    if args.command == "report":
        return _report_command(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _run_command(args: argparse.Namespace, argv: list[str]) -> int:
    from ._run import EXIT_USAGE, RunOptions, UsageError, run

    opts = RunOptions(
        target=args.target,
        input=args.input,
        output=args.output,
        format=args.format,
        workers=args.workers,
        max_rss=args.max_rss,
        soft_max_rss=args.soft_max_rss,
        task_timeout=args.task_timeout,
        stall_timeout=args.stall_timeout,
        max_tasks=args.max_tasks,
        retry=args.retry,
        journal=args.journal,
        errors=args.errors,
        report=args.report,
        overwrite=args.overwrite,
        ordered=args.ordered,
        encoding=args.encoding,
        retry_wait=args.retry_wait,
        halt=args.halt,
        skip_failed=args.skip_failed,
        retry_quarantined=args.retry_quarantined,
        scheduler=args.scheduler,
        dry_run=args.dry_run,
        plain=args.plain,
        progress_interval=args.progress_interval,
        log_format=args.log_format,
        verbose=args.verbose,
        metrics_port=args.metrics_port,
        chunk_size=args.chunk_size,
        metrics_addr=args.metrics_addr,
        argv=["resilpool", *argv],
    )
    try:
        return run(opts)
    except UsageError as exc:
        print(f"resilpool run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("resilpool run: interrupted before the run started; nothing was run", file=sys.stderr)
        return 130


def _report_command(args: argparse.Namespace) -> int:
    from ._journal import JournalError, open_readonly
    from ._report import build_report, render_report

    try:
        conn = open_readonly(args.journal)
    except JournalError as exc:
        print(f"resilpool report: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = build_report(conn, os.path.abspath(args.journal))
    finally:
        conn.close()
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(render_report(report))
    return 0


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
    tally = Tally()
    use_rich = not plain and sys.stdout.isatty() and have_rich()
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
        view = make_view(pool, tally, total=n_tasks, plain=not use_rich, interval=2.0)
        pending = set(futures)
        while pending:
            _, pending = cf.wait(pending, timeout=0.25)
            view.update()
        view.close()
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

