"""``resilpool run``: a function over every item of a file, unattended, resumable.

Data flow::

    input file ──items──> main thread ──submit(item_call(fn), item)──> ResilientPool ──> workers
                             ^   │                                         │
          done callbacks,    │   ├─ result lines ──> output (flushed at once; fsync per commit)
          pool events,       │   ├─ error lines ───> errors file
          signals ──> queue ─┘   └─ rows ──> Journal (one transaction per commit interval,
                                             after the output's fsync: see _journal)

The main thread owns everything here: the input iterator, the in-flight table,
the output files, the journal and the view.  Other threads (the pool's manager
thread running done callbacks, its event thread, signal handlers) only put
messages in ``_Runner.queue``.

Invariant: an item is recorded done in the journal only in a commit that follows
the fsync of the output holding its line; ``output_offset`` in that commit ends
exactly after the last line written, so the journal's done items are the output's
lines before ``output_offset``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import json
import logging
import os
import pickle
import queue
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import IO, Any, Final

from . import errors
from ._inputs import InputError, InputFile, Item, Malformed, Sink, open_input
from ._journal import Journal, JournalError, check_identity, open_readonly
from ._pool import ResilientPool
from ._task import ItemResult, item_call
from ._view import Tally, View, make_view
from .events import (
    CoreRebuilt,
    CrashLoopTripped,
    DispatchPaused,
    DispatchResumed,
    Event,
    TaskQuarantined,
    TaskRetried,
    WorkerExited,
)
from .supervisor.limits import Limits

__all__ = ["EXIT_BROKEN", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "RunOptions", "UsageError", "dry_run", "resolve_target", "run"]

log = logging.getLogger("resilpool")

EXIT_OK: Final = 0  #: every item done
EXIT_FAILED: Final = 1  #: the run finished; some items failed
EXIT_USAGE: Final = 2  #: bad arguments or inputs; nothing ran
EXIT_BROKEN: Final = 3  #: the pool broke (crash loop) or an output could not be written
# Interrupted: 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells do.

COMMIT_INTERVAL_S: Final = 0.5  #: longest time between two journal commits
COMMIT_MAX_ROWS: Final = 20_000  #: ... or this many queued rows, whichever comes first
COMMIT_IDLE_ROWS: Final = 1000  #: ... or this many when nothing else is waiting
_WINDOW_PER_WORKER: Final = 512  #: items handed to the pool ahead of the workers, per worker
_WINDOW_MAX: Final = 4096


class UsageError(Exception):
    """Bad arguments or inputs: the command prints this one line and exits with EXIT_USAGE."""


class RunOptions:
    """What ``resilpool run`` was asked to do (the parsed command line; see ``resilpool run --help``)."""

    def __init__(
        self,
        *,
        target: str,
        input: str,
        output: str | None = None,
        format: str | None = None,
        workers: int | None = None,
        max_rss: str | None = None,
        soft_max_rss: str | None = None,
        task_timeout: float | None = None,
        stall_timeout: float | None = None,
        max_tasks: int | None = None,
        retry: int = 0,
        journal: str | None = None,
        errors: str | None = None,
        report: str | None = None,
        ordered: bool = False,
        scheduler: str | None = None,
        dry_run: bool = False,
        plain: bool = False,
        log_interval: float = 10.0,
        argv: list[str] | None = None,
    ) -> None:
        self.target = target
        self.input = input
        self.output = output
        self.format = format
        self.workers = workers
        self.max_rss = max_rss
        self.soft_max_rss = soft_max_rss
        self.task_timeout = task_timeout
        self.stall_timeout = stall_timeout
        self.max_tasks = max_tasks
        self.retry = retry
        self.journal = journal
        self.errors = errors
        self.report = report
        self.ordered = ordered
        self.scheduler = scheduler
        self.dry_run = dry_run
        self.plain = plain
        self.log_interval = log_interval
        self.argv = list(argv or ())


# --- checking the arguments ------------------------------------------------------


def resolve_target(spec: str) -> Callable[[Any], ItemResult]:
    """Import ``MODULE:FUNCTION`` (``MODULE`` may be a ``path/to/file.py``) as ``python -m`` would.

    The current directory (or the file's directory) goes first on ``sys.path``, so
    ``mymod:f`` finds ``./mymod.py``; workers started by forkserver or spawn get the
    parent's ``sys.path`` and import it the same way.  Returns the call to submit
    for each item (see ``resilpool._task``).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise UsageError(f"bad target {spec!r}: expected MODULE:FUNCTION, for example mymodule:process")
    search = os.getcwd()
    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise UsageError(f"cannot import {module_name}: no such file")
        search, module_name = os.path.dirname(path), os.path.basename(path)[:-3]
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise UsageError(f"bad target {spec!r}: {module_name!r} is not a module name")
    if search not in sys.path:
        sys.path.insert(0, search)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"cannot import module {module_name!r}: no such module (looked in {search} and sys.path)") from None
        raise UsageError(f"importing module {module_name!r} failed: ModuleNotFoundError: {exc}") from None
    except BaseException as exc:  # SyntaxError, an error at import, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"importing module {module_name!r} failed: {type(exc).__name__}: {_one_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no function {attr!r}") from None
    if not callable(obj):
        raise UsageError(f"{module_name}:{attr} is not callable (it is a {type(obj).__name__})")
    call = item_call(f"{module_name}:{attr}", obj)
    try:
        pickle.dumps(call)
    except Exception as exc:  # pragma: no cover - the wrapper pickles by reference
        raise UsageError(f"{module_name}:{attr} cannot be sent to a worker: {type(exc).__name__}: {_one_line(exc)}") from None
    return call


_LIMIT_OPTIONS: Final = {
    "max_rss": "--max-rss",
    "soft_max_rss": "--soft-max-rss",
    "task_timeout": "--task-timeout",
    "stall_timeout": "--stall-timeout",
    "max_tasks": "--max-tasks",
}


def make_limits(opts: RunOptions) -> Limits:
    """The Limits of the options; UsageError naming the option (and Limits' own message)."""
    kwargs = {name: getattr(opts, name) for name in _LIMIT_OPTIONS if getattr(opts, name) is not None}
    try:
        return Limits(**kwargs)
    except (ValueError, TypeError) as exc:
        m = re.search(r"Limits\.(\w+)", str(exc))
        option = _LIMIT_OPTIONS.get(m.group(1), "") if m else ""
        raise UsageError(f"{option + ': ' if option else ''}{exc}") from None


def _check_counts(opts: RunOptions) -> None:
    if opts.workers is not None and opts.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {opts.workers}")
    if opts.retry < 0:
        raise UsageError(f"--retry must be >= 0, got {opts.retry}")
    if not opts.log_interval > 0:
        raise UsageError(f"--log-interval must be > 0 seconds, got {opts.log_interval}")


def _errors_path(opts: RunOptions) -> str:
    if opts.errors:
        return opts.errors
    assert opts.output is not None
    root, ext = os.path.splitext(opts.output)
    return f"{root}.errors{ext or '.jsonl'}"


def _check_paths(opts: RunOptions, inp: InputFile) -> None:
    paths = {"--output": opts.output, "--errors": _errors_path(opts), "--journal": opts.journal, "--report": opts.report}
    seen: dict[str, str] = {os.path.realpath(inp.path): "the input"}
    for option, path in paths.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{option} {path} is also {seen[real]}")
        seen[real] = option
        if os.path.isdir(path):
            raise UsageError(f"cannot write {option} {path}: it is a directory")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"cannot write {option} {path}: no directory {folder}")
        if os.path.exists(path):
            if not os.access(path, os.W_OK):
                raise UsageError(f"cannot write {option} {path}: permission denied")
            continue
        try:  # a file we may create there (os.access says yes to root even where nobody may)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            raise UsageError(f"cannot write {option} {path}: {exc.strerror or exc}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


# --- the run -----------------------------------------------------------------------


def run(opts: RunOptions, *, stderr: IO[str] | None = None) -> int:
    """Run ``opts.target`` over the input; the exit status (see the EXIT_* constants)."""
    stderr = stderr if stderr is not None else sys.stderr
    if opts.dry_run:
        return dry_run(opts, stdout=sys.stdout, stderr=stderr)
    if opts.output is None:
        raise UsageError("--output is required (except with --dry-run)")
    _check_counts(opts)
    fn = resolve_target(opts.target)
    limits = make_limits(opts)
    try:
        inp = open_input(opts.input, opts.format)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    _check_paths(opts, inp)
    identity = {"function": opts.target, "output_path": os.path.abspath(opts.output), **inp.identity()}
    try:
        journal = Journal(opts.journal)
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    try:
        try:
            new = journal.is_new()
            if not new:
                journal.bind(identity)  # checks; raises before the output is touched
            keep = 0 if new else _resumable_length(journal, opts.output)
        except JournalError as exc:
            raise UsageError(str(exc)) from None
        sinks: list[Sink] = []
        try:
            for path in (opts.output, _errors_path(opts)):
                try:
                    sinks.append(Sink(path, keep=keep if path == opts.output else 0))
                except OSError as exc:
                    raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
            if new:
                journal.bind(identity)
            runner = _Runner(opts, fn, inp, limits, journal, sinks[0], sinks[1], stderr)
            return runner.run()
        finally:
            for s in sinks:
                with contextlib.suppress(OSError):
                    s.close()
    finally:
        journal.close()


def _resumable_length(journal: Journal, output: str) -> int:
    """How much of the output the journal accounts for; JournalError if the output lost some of it."""
    keep = journal.output_offset()
    if keep == 0:
        return 0
    try:
        with open(output, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size >= keep:
                f.seek(keep - 1)
                if f.read(1) == b"\n":
                    return keep
    except FileNotFoundError:
        size = -1
    except OSError as exc:
        raise JournalError(f"cannot read output {output}: {exc.strerror or exc}") from exc
    done = journal.counts().get("done", 0)
    what = "is missing" if size < 0 else f"holds {size} bytes"
    raise JournalError(
        f"output {output} {what}, but journal {journal.path} records {done} results in its first {keep} bytes:"
        " restore the output file, or use a new journal to start over"
    )


class _Signal:
    __slots__ = ("signum",)

    def __init__(self, signum: int) -> None:
        self.signum = signum


def _error_record(exc: BaseException) -> dict[str, Any]:
    notes = [str(n) for n in getattr(exc, "__notes__", None) or ()]
    record: dict[str, Any] = {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": _safe_str(exc),
        "notes": notes,
    }
    cause = exc.__cause__
    if cause is not None and type(cause).__name__ == "RemoteTraceback":
        record["traceback"] = str(cause).strip().strip('"').strip()
    return record


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _attempts(exc: BaseException) -> int:
    """Attempts a failed item had: the pool notes each earlier one (a quarantine notes the last too)."""
    notes = getattr(exc, "__notes__", None) or ()
    noted = sum(1 for n in notes if isinstance(n, str) and n.startswith("attempt "))
    return max(1, noted) if isinstance(exc, errors.PoisonTaskError) else 1 + noted


class _Runner:
    """One ``resilpool run`` invocation; see the module docstring for who owns what."""

    def __init__(self, opts: RunOptions, fn: Callable[[Any], ItemResult], inp: InputFile, limits: Limits, journal: Journal, out: Sink, err: Sink, stderr: IO[str]) -> None:
        self.opts = opts
        self.call = fn
        self.inp = inp
        self.limits = limits
        self.journal = journal
        self.out = out
        self.err = err
        self.stderr = stderr
        self.total = inp.count
        self.done_before = journal.done_indices()
        self.items: Iterator[Item] = inp.items(skip=self.done_before)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.inflight: dict[cf.Future[ItemResult], tuple[Item, int]] = {}
        self.by_task: dict[int, Item] = {}  # pool task id -> item (ids count our submits: we are the only submitter)
        self.task_ids_ok = True
        self.task_seq = 0
        self.retries: Counter[int] = Counter()
        self.ordered = opts.ordered
        self.order: deque[int] = deque()  # --ordered: indices handed out, not yet written
        self.ready: dict[int, tuple[bytes, tuple[Any, ...]] | None] = {}  # --ordered: resolved, waiting for their turn
        self.done_run = 0
        self.cancelled = False  # a second signal
        self.committed = (0, 0)  # (done, failed) of this run recorded in the journal
        self.failed_run = 0
        self.exhausted = False
        self.draining: int | None = None  # the signal that started the drain
        self.broken: BaseException | None = None
        self.fatal: str | None = None
        self.window = 0
        self.run_id = 0
        self.add_resolved = journal.add_resolved
        self.add_done = journal.add_done

    # --- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.queue.put(_Signal(signum))  # SimpleQueue.put is reentrant: safe in a handler

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # --- the run ---------------------------------------------------------------------

    def run(self) -> int:
        opts = self.opts
        todo = self.total - len(self.done_before)
        tally = Tally(self._describe)
        use_live = not opts.plain and self.stderr.isatty()
        if use_live:
            logging.getLogger("resilpool").setLevel(logging.CRITICAL)  # the live view shows the events
        elif not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING, stream=self.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        earlier = f", {len(self.done_before)} done earlier" if self.done_before else ""
        t0 = time.monotonic()
        with self._signals(), ResilientPool(opts.workers, limits=self.limits, retry=opts.retry or None, backend=_backend(opts)) as pool:
            self.pool = pool
            run_id = self.run_id = self.journal.begin_run(opts.argv, pool.max_workers)
            journal = f"journal {opts.journal} (run {run_id})" if opts.journal else "no journal"
            self.window = min(_WINDOW_MAX, _WINDOW_PER_WORKER * pool.max_workers)
            print(
                f"resilpool run: {opts.target} over {self.total} items of {opts.input} ({todo} to run{earlier})"
                f" on {pool.max_workers} workers; results to {opts.output}; {journal}",
                file=self.stderr,
                flush=True,
            )
            pool.add_listener(tally)
            pool.add_listener(self.queue.put)
            view = make_view(
                pool,
                tally,
                total=self.total,
                counts=lambda: (len(self.done_before) + self.done_run, self.failed_run, self.total),
                stream=self.stderr,
                plain=not use_live,
                interval=opts.log_interval,
                label="items",
            )
            self.view = view
            try:
                self._loop()
            except BaseException as exc:
                self.fatal = f"{type(exc).__name__}: {_one_line(exc)}"
                log.error("resilpool run failed", exc_info=True)
            if self.fatal is not None:  # cancelled, or an error of the runner itself
                self._abandon(view)  # never returns
            self._take_messages()  # the last events
            view.close()
            status = self._status()
            self._commit()
            stats = pool.stats()
        self._take_messages()  # events of the shutdown
        self.journal.commit(None)
        self.journal.end_run(status, self.done_run, self.failed_run, _stats_dict(stats))
        if opts.report:
            self._write_report()
        return self._summary(status, time.monotonic() - t0)

    def _status(self) -> str:
        if self.broken is not None:
            return "broken"
        if self.draining is not None and self._not_done() > self.failed_run:
            return "interrupted"  # some items were not run
        return "failed" if self.failed_run or self._not_done() else "completed"

    def _not_done(self) -> int:
        return max(0, self.total - len(self.done_before) - self.done_run)

    def _loop(self) -> None:
        get = self.queue.get
        next_commit = time.monotonic() + COMMIT_INTERVAL_S
        while True:
            if self.draining is None and self.broken is None and not self.exhausted:
                self._fill()
            if not self.inflight and (self.exhausted or self.draining is not None or self.broken is not None):
                return
            now = time.monotonic()
            try:
                msg = get(timeout=max(0.0, min(next_commit - now, 0.25)))
            except queue.Empty:
                msg = None
            wrote = False
            while msg is not None:
                if type(msg) is cf.Future:
                    self._resolved(msg)
                    wrote = True
                else:
                    self._message(msg)
                    if self.cancelled:
                        return
                try:
                    msg = self.queue.get_nowait()
                except queue.Empty:
                    msg = None
            if wrote:
                self.out.flush()
                self.err.flush()
            now = time.monotonic()
            rows = self.journal.pending_rows()
            # Commit every COMMIT_INTERVAL_S, or earlier when many rows wait and no message does
            # (the main thread would only wait: the commit then costs the run nothing).
            if now >= next_commit or rows >= COMMIT_MAX_ROWS or (rows >= COMMIT_IDLE_ROWS and self.queue.empty()):
                self._commit()
                next_commit = now + COMMIT_INTERVAL_S
            self.view.update()

    def _fill(self) -> None:
        call, pool, window = self.call, self.pool, self.window
        inflight = self.inflight
        put = self.queue.put
        while len(inflight) + len(self.ready) < window:
            item = next(self.items, None)
            if item is None:
                self.exhausted = True
                return
            if self.ordered:
                self.order.append(item.index)
            if type(item.value) is Malformed:
                self._malformed(item)
                continue
            try:
                fut = pool.submit(call, item.value)
            except (errors.CrashLoopError, RuntimeError) as exc:
                self.broken = exc
                return
            self.task_seq += 1
            if self.task_seq == 1 and pool.stats().submitted != 1:
                self.task_ids_ok = False  # not our counter: no task id -> item mapping
            self.by_task[self.task_seq] = item
            inflight[fut] = (item, self.task_seq)
            fut.add_done_callback(put)

    # --- outcomes ----------------------------------------------------------------------

    def _resolved(self, fut: cf.Future[ItemResult]) -> None:
        item, task_id = self.inflight.pop(fut)
        del self.by_task[task_id]
        try:
            text, pid, started, elapsed, peak = fut.result(timeout=0)  # done: never waits
        except cf.CancelledError:
            if self.ordered:
                self.order.remove(item.index)
            return  # never started: stays pending
        except BaseException as exc:
            if isinstance(exc, errors.CrashLoopError):
                self.broken = self.broken or exc
                if self.ordered:
                    self.order.remove(item.index)
                return  # not the item's fault: stays pending
            self.retries.pop(item.index, None)
            self._failed(item, exc)
            return
        idx = item.index
        line = f'{{"index": {idx}, "input": {item.input_json}, "result": {text}}}\n'.encode()
        retries = self.retries.pop(idx, 0) if self.retries else 0
        row: tuple[Any, ...]
        if retries:
            row = (idx, "done", 1 + retries, self.run_id, item.line, pid, started, elapsed, started + elapsed, peak, None, None)
        else:
            row = (idx, pid, started, elapsed, peak)
        if self.ordered:
            self.ready[idx] = (line, row)
            self._write_ready()
        else:
            self.out.write(line)
            if retries:
                self.add_resolved(row)
            else:
                self.add_done(row)  # type: ignore[arg-type]
            self.done_run += 1

    def _failed(self, item: Item, exc: BaseException) -> None:
        pid = getattr(exc, "pid", None) or getattr(exc, "_resilpool_pid", None)
        elapsed = getattr(exc, "elapsed", None) or getattr(exc, "_resilpool_elapsed", None)
        rss = getattr(exc, "rss", None)
        record = _error_record(exc)
        attempts = _attempts(exc)
        self._write_error(item, record, attempts, pid)
        row = (item.index, "failed", attempts, self.journal.run_id, item.line, pid, None, elapsed, time.time(), rss, record["type"], record["message"][:2000])
        self._resolve_failed(item, row)

    def _malformed(self, item: Item) -> None:
        m = item.value
        assert isinstance(m, Malformed)
        record = {"type": "InputError", "module": "resilpool", "message": f"{m.error_type}: {m.message}", "notes": []}
        self._write_error(item, record, 0, None)
        row = (item.index, "failed", 0, self.journal.run_id, item.line, None, None, None, time.time(), None, "InputError", record["message"][:2000])
        self._resolve_failed(item, row)

    def _write_error(self, item: Item, record: dict[str, Any], attempts: int, pid: int | None) -> None:
        rest = json.dumps({"line": item.line, "attempts": attempts, "pid": pid, "error": record}, ensure_ascii=False)
        # item.input_json is the input as the reader gave it (valid JSON): spliced in, not re-encoded.
        self.err.write(f'{{"index": {item.index}, "input": {item.input_json}, {rest[1:]}\n'.encode())

    def _resolve_failed(self, item: Item, row: tuple[Any, ...]) -> None:
        self.failed_run += 1
        if self.ordered:
            self.journal.add_resolved(row)
            self.ready[item.index] = None
            self._write_ready()
        else:
            self.journal.add_resolved(row)

    def _write_ready(self) -> None:
        order, ready = self.order, self.ready
        while order and order[0] in ready:
            entry = ready.pop(order.popleft())
            if entry is not None:
                line, row = entry
                self.out.write(line)
                if len(row) == 5:
                    self.add_done(row)
                else:
                    self.add_resolved(row)
                self.done_run += 1

    # --- messages: events and signals ----------------------------------------------------

    def _message(self, msg: Any) -> None:
        if isinstance(msg, _Signal):
            self._signal(msg.signum)
            return
        self._event(msg)

    def _signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.draining is None:
            self.draining = signum
            for fut in list(self.inflight):
                fut.cancel()  # not started yet: never will; started ones finish
            running = sum(1 for f in self.inflight if not f.cancelled())
            self.view.note(
                f"{name}: draining: {running} running items finish, nothing new starts; {name} again cancels them"
            )
        else:
            self.cancelled = True
            self.fatal = f"cancelled by a second {name}"

    def _event(self, ev: Event) -> None:
        item: Item | None
        if isinstance(ev, TaskRetried):
            item = self._item_of(ev.task_id)
            if item is not None:
                self.retries[item.index] += 1
            self.journal.add_event("retried", idx=None if item is None else item.index, detail=f"attempt {ev.attempt}: {ev.error}"[:500])
        elif isinstance(ev, WorkerExited):
            item = self._item_of(ev.task_id)
            self.journal.add_event("worker_exited", pid=ev.pid, reason=ev.reason.value, idx=None if item is None else item.index, detail=ev.detail[:500])
        elif isinstance(ev, TaskQuarantined):
            item = self._item_of(ev.task_id)
            self.journal.add_event("quarantined", idx=None if item is None else item.index, detail=f"{ev.crashes} crashes")
        elif isinstance(ev, CoreRebuilt):
            self.journal.add_event("rebuilt", detail=ev.cause[:500])
        elif isinstance(ev, CrashLoopTripped):
            self.journal.add_event("crash_loop", detail=ev.cause[:500])
        elif isinstance(ev, DispatchPaused):
            self.journal.add_event("paused", detail=ev.reason)
        elif isinstance(ev, DispatchResumed):
            self.journal.add_event("resumed", detail=ev.reason)

    def _describe(self, task_id: int) -> str:
        # Called on the pool's event thread (and by the view): one dict read, atomic under the GIL.
        item = self.by_task.get(task_id) if self.task_ids_ok else None
        return f"task {task_id}" if item is None else f"item {item.index}"

    def _item_of(self, task_id: int | None) -> Item | None:
        if task_id is None or not self.task_ids_ok:
            return None
        return self.by_task.get(task_id)

    def _take_messages(self) -> None:
        while True:
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                return
            if type(msg) is cf.Future:
                if msg in self.inflight:
                    self._resolved(msg)
            elif not isinstance(msg, _Signal):
                self._event(msg)

    # --- the journal ---------------------------------------------------------------------

    def _commit(self) -> None:
        """fsync the outputs, then commit the rows of what they hold (the invariant)."""
        if self.task_ids_ok:
            now_wall, now = time.time(), time.monotonic()
            for w in self.pool.workers():
                item = self.by_task.get(w.task_id) if w.task_id is not None else None
                if item is not None:
                    started = now_wall - (now - w.running_since) if w.running_since is not None else now_wall
                    self.journal.add_running(item.index, item.line, w.pid, started)
        self.err.sync()
        offset = self.out.sync()
        self.journal.commit(offset)
        self.committed = (self.done_run, self.failed_run)

    def _abandon(self, view: View) -> None:
        """Cancel (a second signal) or a fatal error: record what is consistent, exit; the workers die with us."""
        cancel = self.cancelled
        try:
            if cancel:
                self._commit()  # every line written is whole: fsync, then record it
            else:
                # A fatal error (an output that cannot be written...) may have left a line half
                # written: record nothing more; a rerun cuts the output back to the last commit.
                self.journal.discard()
                self.journal.commit(None)
            self.journal.end_run("cancelled" if cancel else "broken", self.committed[0], self.committed[1], _stats_dict(self.pool.stats()))
        except Exception:
            log.error("resilpool run: could not record the end of the run", exc_info=True)
        view.close()
        resume = f"rerun the same command to resume (journal {self.opts.journal})" if self.opts.journal else "no --journal: a rerun starts over"
        what = "running items" if cancel else "items in flight"
        print(
            f"resilpool run: {self.fatal}: {len(self.done_before) + self.committed[0]} of {self.total} items done,"
            f" {len(self.inflight)} {what} abandoned; {resume}",
            file=self.stderr,
            flush=True,
        )
        self.journal.close()
        # The workers (and what their items started) die with us: their lifeline pipe closes.
        os._exit(128 + self.draining if cancel and self.draining is not None else EXIT_BROKEN)

    def _write_report(self) -> None:
        assert self.opts.report is not None
        from ._report import build_report, write_report

        try:
            write_report(self.opts.report, build_report(self.journal._conn, self.opts.journal))
        except OSError as exc:
            print(f"resilpool run: cannot write report {self.opts.report}: {exc.strerror or exc}", file=self.stderr)

    def _summary(self, status: str, elapsed: float) -> int:
        done = len(self.done_before) + self.done_run
        earlier = f", {len(self.done_before)} earlier" if self.done_before else ""
        s = self.stats_line()
        head = f"resilpool run: {done} of {self.total} items done ({self.done_run} in this run{earlier}), {self.failed_run} failed in {elapsed:.1f}s"
        print(f"{head}; {s}", file=self.stderr)
        resume = f"rerun the same command to resume (journal {self.opts.journal})" if self.opts.journal else "no --journal: a rerun starts over"
        if status == "interrupted":
            assert self.draining is not None
            name = signal.Signals(self.draining).name
            print(f"resilpool run: interrupted by {name}: the running items finished, {self._not_done()} items not done; {resume}", file=self.stderr)
            return 128 + self.draining
        if status == "broken":
            print(f"resilpool run: the pool broke ({type(self.broken).__name__}: {_one_line(self.broken or Exception())}); {self._not_done()} items not done; fix the cause and {resume}", file=self.stderr)
            return EXIT_BROKEN
        if self.failed_run:
            retry = f"; {resume} and retry them" if self.opts.journal else ""
            print(f"resilpool run: {self.failed_run} of {self.total} items failed; details in {self.err.path}{retry}", file=self.stderr)
            return EXIT_FAILED
        print(f"resilpool run: all {self.total} items done; results in {self.opts.output}", file=self.stderr)
        return EXIT_OK

    def stats_line(self) -> str:
        s = self.pool.stats()
        recycled = ", ".join(f"{k} {v}" for k, v in sorted(s.recycled.items()) if k != "shutdown") or "none"
        peak = f"; peak worker RSS {s.peak_worker_rss / 2**20:.0f} MiB" if s.peak_worker_rss else ""
        return f"retried {s.retried} attempts; crashes {s.worker_crashes}; recycled: {recycled}{peak}"


def _wait_exception(fut: cf.Future[Any]) -> BaseException | None:
    """The future's exception once it is done (a short timeout at a time, so Ctrl-C works)."""
    while True:
        try:
            return fut.exception(timeout=1.0)
        except cf.TimeoutError:
            continue


def _stats_dict(stats: Any) -> dict[str, Any]:
    return {k: getattr(stats, k) for k in stats.__dataclass_fields__}


# --- dry run ------------------------------------------------------------------------


def dry_run(opts: RunOptions, *, stdout: IO[str], stderr: IO[str]) -> int:
    """Import the function and run the first item in a worker; print the result; write nothing."""
    _check_counts(opts)
    fn = resolve_target(opts.target)
    limits = make_limits(opts)
    try:
        inp = open_input(opts.input, opts.format)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    if opts.output is not None:
        _check_paths(opts, inp)
    resume = ""
    if opts.journal is not None and os.path.exists(opts.journal):
        try:
            conn = open_readonly(opts.journal)
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                identity = {"function": opts.target, **inp.identity()}
                if opts.output is not None:
                    identity["output_path"] = os.path.abspath(opts.output)
                check_identity(opts.journal, meta, identity)
                done = conn.execute("SELECT COUNT(*) FROM items WHERE state = 'done'").fetchone()[0]
            finally:
                conn.close()
        except JournalError as exc:
            raise UsageError(str(exc)) from None
        resume = f"; journal {opts.journal}: {done} done, a run would resume with {inp.count - done}"
    item = next(inp.items(), None)
    if item is None:
        raise UsageError(f"input {opts.input} has no items")
    print(f"resilpool run --dry-run: {opts.target} on item 0 of {inp.count} ({inp.format}){resume}", file=stderr, flush=True)
    if isinstance(item.value, Malformed):
        print(f"resilpool run --dry-run: item 0 (line {item.line}) is malformed: {item.value.error_type}: {item.value.message}", file=stderr)
        return EXIT_FAILED
    with ResilientPool(1, limits=limits, retry=opts.retry or None, backend=_backend(opts)) as pool:
        fut = pool.submit(fn, item.value)
        error = _wait_exception(fut)
    if error is not None:
        rec = _error_record(error)
        print(f"resilpool run --dry-run: item 0 failed: {rec['type']}: {_one_line(error)}", file=stderr)
        for note in rec["notes"]:
            print(f"  {note}", file=stderr)
        if "traceback" in rec:
            print(rec["traceback"], file=stderr)
        return EXIT_FAILED
    text, pid, _, elapsed, peak = fut.result()
    print(f'{{"index": 0, "input": {item.input_json}, "result": {text}}}', file=stdout, flush=True)
    print(f"resilpool run --dry-run: done in worker {pid} in {elapsed:.3f}s (peak RSS {peak / 2**20:.0f} MiB); nothing written", file=stderr)
    return EXIT_OK


def _backend(opts: RunOptions) -> Any:
    """The Dask backend for ``--scheduler`` (an address, or ``local``), else None (local workers)."""
    if opts.scheduler is None:
        return None
    try:
        from .dask import DaskBackend

        return DaskBackend(None if opts.scheduler == "local" else opts.scheduler)
    except ImportError as exc:
        raise UsageError(f"--scheduler needs the Dask extra: pip install 'resilpool[dask]' ({exc})") from None
