"""``resilpool run``: a function over every item of a file, unattended, resumable.

Data flow::

    input file ──items──> main thread ──submit(item_call(fn), chunk)──> ResilientPool ──> workers
                             ^   │                                                      │
          done callbacks,    │   ├─ result lines ──> output (flushed at once;           │ each finished
          pool events,       │   │                   fsync per commit)                  │ item's line
          signals ──> queue ─┘   ├─ error lines ───> errors file                        v
                                 ├─ rows ──> Journal (one transaction per commit   transit files
                                 │           interval, after the output's fsync)   (JOURNAL.transit/)
                                 └─ at each commit: remove the transit files whose lines are all committed

A task carries a chunk: one item, or several fast ones (see ``_Runner._chunk_size``).

The main thread owns everything here: the input iterator, the in-flight table,
the output files, the journal, the transit generation and the view.  Other threads
(the pool's manager thread running done callbacks, its event thread, signal
handlers) only put messages in ``_Runner.queue``.  Workers only append to their own
transit files (``resilpool.cli._task``).

Invariants:

- an item is recorded done in the journal only in a commit that follows the fsync
  of the output holding its line; ``output_offset`` in that commit ends exactly
  after the last line written, so the journal's done items are the output's lines
  before ``output_offset``;
- an item a worker has finished has its line in the output or in a transit file:
  the worker appends it before it starts its next item, and a transit generation
  is removed only after a commit, once no task in flight (nor an ``--ordered`` line
  waiting) belongs to it.  So after a kill -9 only the items the workers were
  running are lost, and a rerun runs only those again.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import pickle
import queue
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Container, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, Final

import tenacity

from .. import errors
from ._inputs import (
    InputError,
    InputFile,
    Item,
    Malformed,
    Sink,
    check_encoding_name,
    file_id,
    is_stream_input,
    line_digest,
    open_input,
    open_output,
    spool,
)
from ._locks import InUseError
from ._journal import Journal, JournalError, check_identity, done_count, open_readonly, read_meta
from .._pool import ResilientPool
from ._task import ChunkCall, ChunkItem, ChunkResult, error_record, item_call
from ._view import LogFormatter, Say, Tally, View, human_bytes, make_view
from ..events import (
    CoreRebuilt,
    CrashLoopTripped,
    DispatchPaused,
    DispatchResumed,
    Event,
    TaskQuarantined,
    TaskRetried,
    WorkerExited,
)
from ..retry import RetryPolicy
from ..supervisor.limits import Limits

if TYPE_CHECKING:
    from ..metrics import MetricsServer

__all__ = ["EXIT_BROKEN", "EXIT_FAILED", "EXIT_HALTED", "Halt", "EXIT_OK", "EXIT_USAGE", "RunOptions", "UsageError", "dry_run", "parse_halt", "resolve_target", "retry_policy", "run"]

log = logging.getLogger("resilpool")

EXIT_OK: Final = 0  #: every item done
EXIT_FAILED: Final = 1  #: the run finished; some items failed
EXIT_USAGE: Final = 2  #: bad arguments or inputs; nothing ran
EXIT_BROKEN: Final = 3  #: the pool broke (crash loop) or an output could not be written
EXIT_HALTED: Final = 4  #: --halt stopped the run after too many failures
# Interrupted: 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells do.

COMMIT_INTERVAL_S: Final = 0.5  #: longest time between two journal commits
COMMIT_MAX_ROWS: Final = 20_000  #: ... or this many queued rows, whichever comes first
COMMIT_IDLE_ROWS: Final = 1000  #: ... or this many when nothing else is waiting
_WINDOW_PER_WORKER: Final = 512  #: items handed to the pool ahead of the workers, per worker
_WINDOW_MAX: Final = 4096
CHUNK_TARGET_S: Final = 0.02  #: a chunk holds about this much work (by the items' measured time)
CHUNK_MAX: Final = 256  #: items in one task, at most


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
        overwrite: bool = False,
        ordered: bool = False,
        encoding: str = "utf-8",
        retry_wait: str | None = None,
        halt: str | None = None,
        skip_failed: bool = False,
        retry_quarantined: bool = False,
        scheduler: str | None = None,
        dry_run: bool = False,
        plain: bool = False,
        progress_interval: float = 60.0,
        log_format: str = "text",
        verbose: bool = False,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        chunk_size: int | None = None,
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
        self.overwrite = overwrite
        self.ordered = ordered
        self.encoding = encoding
        self.retry_wait = retry_wait
        self.halt = halt
        self.skip_failed = skip_failed
        self.retry_quarantined = retry_quarantined
        self.scheduler = scheduler
        self.dry_run = dry_run
        self.plain = plain
        self.progress_interval = progress_interval
        self.log_format = log_format
        self.verbose = verbose
        self.metrics_port = metrics_port
        self.metrics_addr = metrics_addr
        self.chunk_size = chunk_size
        self.argv = list(argv or ())


# --- checking the arguments ------------------------------------------------------


def resolve_target(spec: str) -> ChunkCall:
    """Import ``MODULE:FUNCTION`` (``MODULE`` may be a ``path/to/file.py``) as ``python -m`` would.

    The current directory (or the file's directory) goes first on ``sys.path``, so
    ``mymod:f`` finds ``./mymod.py``; workers started by forkserver or spawn get the
    parent's ``sys.path`` and import it the same way.  Returns the call to submit
    for each item (see ``resilpool.cli._task``).
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
            hint = _did_you_mean(exc.name.rpartition(".")[2], _module_names(search, exc.name))
            raise UsageError(f"cannot import module {module_name!r}: no such module (looked in {search} and sys.path){hint}") from None
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
            names = [n for n in dir(obj) if not n.startswith("__")]
            raise UsageError(f"module {module_name!r} has no function {attr!r}{_did_you_mean(part, names)}") from None
    if not callable(obj):
        raise UsageError(f"{module_name}:{attr} is not callable (it is a {type(obj).__name__})")
    call = item_call(f"{module_name}:{attr}", obj)
    try:
        pickle.dumps(call)
    except Exception as exc:  # pragma: no cover - the wrapper pickles by reference
        raise UsageError(f"{module_name}:{attr} cannot be sent to a worker: {type(exc).__name__}: {_one_line(exc)}") from None
    return call


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    import difflib  # only on this error path: the run's start-up stays lean

    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _module_names(search: str, missing: str) -> list[str]:
    """Module names beside the one that is missing: in ``search`` (a top-level name) or its package."""
    import pkgutil
    parent = missing.rpartition(".")[0]
    if parent:
        try:
            pkg = importlib.import_module(parent)
        except Exception:
            return []
        paths = list(getattr(pkg, "__path__", []))
    else:
        paths = [search, *[p for p in sys.path if p and p != search]]
    return sorted({m.name for m in pkgutil.iter_modules(paths)})


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


@dataclasses.dataclass(frozen=True, slots=True)
class Halt:
    """``--halt WHEN,fail=N`` or ``fail=P%``: stop after that many failed items in this run."""

    now: bool  #: kill the running items (else: let them finish, start no more)
    count: int | None  #: failures that halt the run
    percent: float | None  #: ... or this share of the items resolved in this run (once 10 are)

    def reached(self, failed: int, resolved: int) -> bool:
        if self.count is not None:
            return failed >= self.count
        assert self.percent is not None
        return resolved >= HALT_MIN_RESOLVED and failed * 100 >= self.percent * resolved

    def __str__(self) -> str:
        what = f"fail={self.count}" if self.count is not None else f"fail={self.percent:g}%"
        return f"{'now' if self.now else 'soon'},{what}"


HALT_MIN_RESOLVED: Final = 10  #: a percentage halts only once this many items resolved in the run


def parse_halt(spec: str | None) -> Halt | None:
    """``soon,fail=3``, ``now,fail=10%`` or ``never``; UsageError naming the form otherwise."""
    if spec is None or spec == "never":
        return None
    when, _, cond = spec.partition(",")
    m = re.fullmatch(r"fail=(\d+)(%?)", cond)
    if when not in ("soon", "now") or m is None:
        raise UsageError(f"bad --halt {spec!r}: expected soon,fail=N or soon,fail=P% (now instead of soon kills the running items), or never")
    value = int(m.group(1))
    if m.group(2):
        if not 0 < value <= 100:
            raise UsageError(f"bad --halt {spec!r}: the percentage must be in 1..100")
        return Halt(now=when == "now", count=None, percent=float(value))
    if value < 1:
        raise UsageError(f"bad --halt {spec!r}: fail=N needs N >= 1")
    return Halt(now=when == "now", count=value, percent=None)


def retry_policy(opts: RunOptions) -> RetryPolicy | None:
    """``--retry N [--retry-wait MIN:MAX]``: N retries; exponential backoff with jitter.

    ``MIN:MAX`` waits MIN * 2**(k-1) seconds before retry k, at most MAX, plus a random
    0..MIN/2 (jitter: retries of many items do not fire together); a single number
    waits that long (plus the same jitter) before each retry.
    """
    if opts.retry_wait is None:
        return RetryPolicy.attempts(opts.retry) if opts.retry else None
    if not opts.retry:
        raise UsageError("--retry-wait needs --retry N (how many times to retry)")
    first, sep, last = opts.retry_wait.partition(":")
    try:
        low = float(first)
        high = float(last) if sep else low
    except ValueError:
        raise UsageError(f"bad --retry-wait {opts.retry_wait!r}: expected seconds, or MIN:MAX seconds such as 1:60") from None
    if not (0 < low <= high and math.isfinite(high)):
        raise UsageError(f"bad --retry-wait {opts.retry_wait!r}: need 0 < MIN <= MAX")
    jitter = tenacity.wait_random(0, low / 2)
    wait = (tenacity.wait_exponential(multiplier=low, min=low, max=high) if sep else tenacity.wait_fixed(low)) + jitter
    return RetryPolicy(stop=tenacity.stop_after_attempt(opts.retry + 1), wait=wait)


def _check_counts(opts: RunOptions) -> None:
    if opts.workers is not None and opts.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {opts.workers}")
    if opts.retry < 0:
        raise UsageError(f"--retry must be >= 0, got {opts.retry}")
    if opts.chunk_size is not None:
        if not 1 <= opts.chunk_size <= CHUNK_MAX:
            raise UsageError(f"--chunk-size must be from 1 to {CHUNK_MAX}, got {opts.chunk_size}")
        per_item = [name for name, on in (("--retry", opts.retry), ("--task-timeout", opts.task_timeout), ("--stall-timeout", opts.stall_timeout), ("--max-tasks", opts.max_tasks), ("--scheduler", opts.scheduler)) if on]
        if opts.chunk_size > 1 and per_item:
            raise UsageError(
                f"--chunk-size {opts.chunk_size} cannot go with {', '.join(per_item)}: those act per task, so items run one per task;"
                " drop --chunk-size (or set it to 1)"
            )
    parse_halt(opts.halt)
    retry_policy(opts)
    if not opts.progress_interval > 0:
        raise UsageError(f"--progress-interval must be > 0 seconds, got {opts.progress_interval}")
    if opts.metrics_port is not None:
        if not 0 <= opts.metrics_port <= 65535:
            raise UsageError(f"--metrics-port must be a TCP port from 0 to 65535, got {opts.metrics_port}")
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise UsageError("--metrics-port needs the metrics extra: pip install 'resilpool[metrics]'") from None
    if opts.log_format not in ("text", "json"):
        raise UsageError(f"--log-format must be text or json, got {opts.log_format!r}")


def _errors_path(opts: RunOptions) -> str:
    if opts.errors:
        return opts.errors
    assert opts.output is not None
    if opts.output == "-":
        return "-"  # standard error, beside the progress lines
    root, ext = os.path.splitext(opts.output)
    return f"{root}.errors{ext or '.jsonl'}"


def _check_paths(opts: RunOptions, inp: InputFile) -> None:
    paths = {"--output": opts.output, "--errors": _errors_path(opts), "--journal": opts.journal, "--report": opts.report}
    seen: dict[str, str] = {os.path.realpath(inp.path): "the input"}
    for option, path in paths.items():
        if path is None or path == "-" or is_stream_input(path):
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


def _shown(path: str | None) -> str:
    return "standard output" if path == "-" else str(path)


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
        raise UsageError("--output is required (except with --dry-run): a file, or - for standard output")
    _check_counts(opts)
    fn = resolve_target(opts.target)
    limits = make_limits(opts)
    with _run_input(opts) as (inp, keep_spool):
        return _run(opts, fn, limits, inp, keep_spool, stderr)


@contextlib.contextmanager
def _run_input(opts: RunOptions) -> Iterator[tuple[InputFile, Callable[[], None]]]:
    """The input; a stream (``-``, a pipe, ``/dev/stdin``, ``<(...)``) is spooled to a file first.

    With ``--journal`` the spool is kept as ``JOURNAL.input`` once the journal accepts it
    (call the second value), so that a rerun can resume from it; otherwise it is a
    temporary file, removed at the end.
    """
    encoding = opts.encoding
    try:
        check_encoding_name(encoding)
        if not is_stream_input(opts.input):
            yield open_input(opts.input, opts.format, encoding=encoding), lambda: None
            return
        if opts.journal is not None:
            dest = os.path.abspath(f"{opts.journal}.input")
        else:
            dest = os.path.join(tempfile.gettempdir(), f"resilpool-input-{os.getpid()}")
        tmp = spool(opts.input, dest)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    try:
        try:
            inp = open_input(tmp, opts.format, encoding=encoding, name=opts.input)
        except InputError as exc:
            raise UsageError(str(exc)) from None

        def keep() -> None:
            if opts.journal is not None:
                os.replace(tmp, dest)
                inp.path = dest

        yield inp, keep
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _run(opts: RunOptions, fn: ChunkCall, limits: Limits, inp: InputFile, keep_spool: Callable[[], None], stderr: IO[str]) -> int:
    assert opts.output is not None  # checked by run()
    _check_paths(opts, inp)
    say = Say(stderr, json_lines=opts.log_format == "json")
    if inp.count == 0:
        say("warning", f"resilpool run: warning: input {opts.input} has no items: nothing to run", level="WARNING", input=opts.input)
    if opts.journal is not None and is_stream_input(opts.output):
        raise UsageError(
            f"--output {opts.output} is a stream, and a journal resumes by appending to the output it wrote:"
            " write the results to a file (-o FILE), or run without --journal"
        )
    identity = {"function": opts.target, "output_path": os.path.abspath(opts.output), **inp.identity()}
    if opts.journal is not None and is_stream_input(opts.input):
        identity["input_path"] = os.path.abspath(f"{opts.journal}.input")
    try:
        journal = Journal(opts.journal)
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    try:
        with contextlib.ExitStack() as stack:
            try:
                new = journal.is_new()
                if not new:
                    journal.bind(identity)  # checks; raises before the output is touched
            except JournalError as exc:
                raise UsageError(str(exc)) from None
            keep_spool()  # the journal accepts this input: keep a streamed one for a rerun
            errors_path = _errors_path(opts)
            # Whether the output was there before we open (and so create) it: a deleted output's
            # inode number may come back to the new empty file, so the file id cannot tell.
            out_existed = opts.output == "-" or os.path.lexists(opts.output)
            for path in (opts.output, errors_path):
                if path != "-" and not os.path.lexists(path):
                    stack.callback(_remove_if_empty, path)  # made by a run refused below: leave no trace
            out_fd, out_regular = _open_locked(opts.output, "--output", stream_fd=1)
            stack.callback(_close_quietly, out_fd)
            err_fd, err_regular = _open_locked(errors_path, "--errors", stream_fd=2)
            stack.callback(_close_quietly, err_fd)
            if out_regular:
                keep, recovered, tail = _claim_output(opts, journal, new, out_fd, kind="output", existed=out_existed)
            else:
                keep, recovered, tail = None, [], b""
            if err_regular and new:
                _claim_output(opts, journal, new, err_fd, kind="errors")
            stack.pop_all()  # the sinks own the descriptors from here
            sinks: list[Sink] = []
            try:
                sinks.append(Sink(out_fd, opts.output, keep=keep))
                sinks.append(Sink(err_fd, errors_path, keep=0 if err_regular else None))
            except OSError as exc:
                for fd in (out_fd, err_fd)[len(sinks) :]:
                    _close_quietly(fd)
                for s in sinks:
                    s.close()
                raise UsageError(f"cannot write {opts.output}: {exc.strerror or exc}") from None
        transit: str | None = None
        try:
            transit = _transit_dir(opts)
            if new:
                journal.bind(identity)
            if out_regular:
                journal.set_output_file(file_id(out_fd))
            # A killed run's transit files (even if this run, on Dask, writes none).
            left = os.path.abspath(f"{opts.journal}.transit") if opts.journal is not None else None
            if left is not None and not new and out_regular:
                # Lines the killed run's workers had finished but the runner had not written yet.
                extra = transit_lines(left, journal.done_indices() | set(recovered), inp.count)
                if extra:
                    sinks[0].write(b"".join(line for _, line in extra))
                    keep, tail = sinks[0].sync(), extra[-1][1]
                    recovered += [i for i, _ in extra]
            if left is not None:
                _clear_transit(left)  # all recovered (or a new journal: left over from another job)
                if transit is None:
                    _remove_transit(left)
            if recovered:
                assert keep is not None
                journal.recover(recovered, keep, line_digest(tail))
                say(
                    "run.recovered",
                    f"resilpool run: recovered {len(recovered)} results that the killed run wrote after its last journal commit",
                    recovered=len(recovered),
                )
            sinks[0].last_line = tail
            runner = _Runner(opts, fn, inp, limits, journal, sinks[0], sinks[1], stderr, transit)
            return runner.run()
        finally:
            for s in sinks:
                with contextlib.suppress(OSError):
                    s.close()
            if transit is not None and opts.journal is None:
                _remove_transit(transit)
    finally:
        journal.close()


# --- transit files: results finished in a worker, not yet in the output ---------------------


def _transit_dir(opts: RunOptions) -> str | None:
    """Where workers append the lines of the items they finish (``resilpool.cli._task``).

    ``JOURNAL.transit/`` beside the journal, so that a rerun recovers them; without a
    journal a temporary folder (a crashed worker's finished items are still known).
    None with ``--scheduler``: Dask workers may not share this machine's files.
    """
    if opts.scheduler is not None:
        return None
    if opts.journal is None:
        return tempfile.mkdtemp(prefix="resilpool-transit-")
    path = os.path.abspath(f"{opts.journal}.transit")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot make {path} (beside --journal {opts.journal}): {exc.strerror or exc}") from None
    return path


def _clear_transit(path: str, below: int | None = None) -> None:
    """Remove the transit files of ``path`` (only generations below ``below``, if given)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            if below is not None:
                gen, sep, _ = name[1:].partition("-")
                if not (sep and gen.isdigit() and int(gen) < below):
                    continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))


def _remove_transit(path: str) -> None:
    _clear_transit(path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _read_transit(path: str, *, pid: int | None = None) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """``(index, raw line, record)`` of the complete lines of the transit files (of worker ``pid``).

    A transit file is ``gGEN-PID-TOKEN``: its lines, then NUL bytes (``resilpool.cli._task``).
    """
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return
    for name in names:
        if pid is not None and name.split("-")[1:2] != [str(pid)]:
            continue
        try:
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
        except OSError:
            continue
        for body in data.split(b"\0", 1)[0].split(b"\n")[:-1]:  # the last part has no newline: half written
            raw = body + b"\n"
            try:
                record = json.loads(raw)
            except ValueError:
                break
            idx = record.get("index") if type(record) is dict else None
            if type(idx) is int:
                yield idx, raw, record


def transit_lines(path: str, done: Container[int], total: int) -> list[tuple[int, bytes]]:
    """The result lines in the transit files of items in range and not in ``done``, once each, by index."""
    found: dict[int, bytes] = {}
    for idx, raw, record in _read_transit(path):
        if 0 <= idx < total and idx not in done and "result" in record:
            found.setdefault(idx, raw)
    return sorted(found.items())


def _remove_if_empty(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.getsize(path) == 0:
            os.unlink(path)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _open_locked(path: str, option: str, *, stream_fd: int) -> tuple[int, bool]:
    try:
        return open_output(path, stream_fd=stream_fd)
    except InUseError as exc:
        holder = f"pid {exc.pid}" if exc.pid is not None else "another process"
        raise UsageError(
            f"{option} {path} is being written by another resilpool run ({holder}): wait for it to end,"
            " or give this run another file"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot write {option} {path}: {exc.strerror or exc}") from None


def _claim_output(opts: RunOptions, journal: Journal, new: bool, fd: int, *, kind: str, existed: bool = True) -> tuple[int, list[int], bytes]:
    """Where to write in the (locked) output ``fd``: ``(keep, recovered indices, last kept line)``.

    A run never cuts or appends to an output its journal does not account for:
    with no journal or a new one, the output must be empty (or ``--overwrite``); with
    an existing one, it must be the file the journal wrote (its recorded line ends at
    ``output_offset``).  Complete result lines past that offset, of items the journal
    does not have as done, were written by a killed run after its last commit: they
    are recovered (item 3 of the guarantee in docs/cli.md).  UsageError otherwise.
    """
    path = opts.output if kind == "output" else _errors_path(opts)
    option = "--output" if kind == "output" else "--errors"
    assert path is not None
    size = os.fstat(fd).st_size
    if new:
        if size and not opts.overwrite:
            if opts.journal is None:
                why = "and no --journal accounts for it"
            else:
                why = f"and journal {opts.journal} is new (it did not write it)"
            raise UsageError(
                f"{option} {path} already holds {human_bytes(size)} {why}: pass the --journal that wrote it to resume,"
                f" --overwrite to replace it, or another {option}"
            )
        return 0, [], b""
    if opts.overwrite:
        raise UsageError(
            f"--overwrite starts over, but journal {opts.journal} records results in {path}:"
            f" use a new journal (or delete {opts.journal}) to start over, or drop --overwrite to resume"
        )
    try:
        return resume_output(journal, path, fd, existed=existed)
    except JournalError as exc:
        raise UsageError(str(exc)) from None


def resume_output(journal: Journal, path: str, fd: int, *, existed: bool = True) -> tuple[int, list[int], bytes]:
    """``(keep, recovered indices, last kept line)`` of the output a journal wrote; JournalError if it is not that output.

    ``existed``: the output was there before this run opened (and so created) it.
    """
    keep, tail = _resume_point(journal, path, fd, existed=existed)
    recovered, keep, tail = _recover(journal, path, keep, tail)
    return keep, recovered, tail


def _resume_point(journal: Journal, output: str, fd: int, *, existed: bool = True) -> tuple[int, bytes]:
    """``(output_offset, the line ending there)``; JournalError if the output is not the one the journal wrote."""
    keep = journal.output_offset()
    replaced = journal.output_tail()[0] is not None and journal.output_tail()[0] != file_id(fd)
    if keep and (not existed or replaced) and not os.fstat(fd).st_size:
        raise JournalError(
            f"output {output} is missing, but journal {journal.path} records {journal.counts().get('done', 0)} results in it:"
            " restore the output file, or use a new journal to start over"
        )
    recorded_file, recorded_tail = journal.output_tail()
    if keep == 0:
        if recorded_file is not None and recorded_file != file_id(fd) and os.fstat(fd).st_size:
            raise JournalError(
                f"output {output} is not the file journal {journal.path} wrote (another file has its name now):"
                " restore that file, or use a new journal to start over"
            )
        return 0, b""
    size = os.fstat(fd).st_size
    tail = _line_before(output, keep) if size >= keep else None
    if tail is not None and (recorded_tail is None or line_digest(tail) == recorded_tail):
        return keep, tail
    done = journal.counts().get("done", 0)
    if size >= keep and tail is not None:
        raise JournalError(
            f"output {output} is not the one journal {journal.path} wrote: the line that ends at byte {keep} differs"
            f" from the one recorded with its {done} results: restore the output file, or use a new journal to start over"
        )
    raise JournalError(
        f"output {output} holds {size} bytes, but journal {journal.path} records {done} results in its first {keep} bytes:"
        " restore the output file, or use a new journal to start over"
    )


def _line_before(path: str, end: int) -> bytes | None:
    """The complete line of ``path`` that ends at byte ``end`` (with its newline), or None."""
    with open(path, "rb") as f:
        chunk = 1 << 16
        start = end
        data = b""
        while start > 0:
            start = max(0, start - chunk)
            f.seek(start)
            data = f.read(end - start)
            if not data.endswith(b"\n"):
                return None
            cut = data.rfind(b"\n", 0, len(data) - 1)
            if cut >= 0:
                return data[cut + 1 :]
            chunk *= 4
        return data


def _recover(journal: Journal, path: str, keep: int, tail: bytes) -> tuple[list[int], int, bytes]:
    """The complete, well-formed result lines past ``keep`` of items not done: ``(indices, new keep, last line)``."""
    done = journal.done_indices()
    total = int(journal.meta().get("item_count", "0"))
    found: list[int] = []
    seen: set[int] = set()
    with open(path, "rb") as f:
        f.seek(keep)
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # half written: cut off
            try:
                record = json.loads(raw)
            except ValueError:
                break
            idx = record.get("index") if type(record) is dict else None
            if type(idx) is not int or not 0 <= idx < total or idx in done or idx in seen or "result" not in record:
                break
            seen.add(idx)
            found.append(idx)
            keep += len(raw)
            tail = raw
    return found, keep, tail


class _Signal:
    __slots__ = ("signum",)

    def __init__(self, signum: int) -> None:
        self.signum = signum


def _error_record(exc: BaseException) -> dict[str, Any]:
    """The errors file's record of an error the pool delivered (the worker's traceback is its cause)."""
    cause = exc.__cause__
    tb = str(cause).strip().strip('"') if cause is not None and type(cause).__name__ == "RemoteTraceback" else None
    return error_record(exc, tb)


def _attempts(exc: BaseException) -> int:
    """Attempts a failed item had: the pool notes each earlier one (a quarantine notes the last too)."""
    notes = getattr(exc, "__notes__", None) or ()
    noted = sum(1 for n in notes if isinstance(n, str) and n.startswith("attempt "))
    return max(1, noted) if isinstance(exc, errors.PoisonTaskError) else 1 + noted


class _Runner:
    """One ``resilpool run`` invocation; see the module docstring for who owns what."""

    def __init__(self, opts: RunOptions, fn: ChunkCall, inp: InputFile, limits: Limits, journal: Journal, out: Sink, err: Sink, stderr: IO[str], transit: str | None) -> None:
        self.opts = opts
        self.call = fn
        self.inp = inp
        self.limits = limits
        self.journal = journal
        self.out = out
        self.err = err
        self.stderr = stderr
        self.say = Say(stderr, json_lines=opts.log_format == "json")
        self.total = inp.count
        self.done_before = journal.done_indices()
        skip = journal.skipped_indices(failed=opts.skip_failed, quarantined=not opts.retry_quarantined)
        self.skipped = len(skip) - len(self.done_before)  # failed earlier, not retried in this run
        self.items: Iterator[Item] = inp.items(skip=skip)
        self.halt = parse_halt(opts.halt)
        self.halted: str | None = None  # why --halt stopped the run
        self.abort_reason: str | None = None  # --halt now: the reason named by the killed items' errors
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # future -> (its chunk's items, pool task id, transit generation)
        self.inflight: dict[cf.Future[ChunkResult], tuple[list[Item], int, int]] = {}
        self.inflight_items = 0
        self.by_task: dict[int, list[Item]] = {}  # pool task id -> items (ids count our submits: we are the only submitter)
        self.requeue: deque[Item] = deque()  # items of a chunk whose worker died, not run: one per task
        # Chunks (several items per task) only where a task's options do not mean "per item":
        # no pool retries (a retry reruns the whole task), no per-task time limits, no task-count
        # recycling, local workers.  Otherwise one item per task, as before.
        self.chunking = retry_policy(opts) is None and not (limits.task_timeout or limits.stall_timeout or limits.max_tasks) and opts.scheduler is None
        self.item_s: float | None = None  # measured seconds per item (moving average), for the chunk size
        self.fixed_chunk = opts.chunk_size  # --chunk-size: items per task, instead of the measured size
        self.read = 0  # items taken from the input
        self.todo = 0
        self.transit = transit  # the workers' transit files (resilpool.cli._task); None: none
        self.gen = 0  # the transit generation handed to new tasks; older ones are removed once written
        self.task_ids_ok = True
        self.task_seq = 0
        self.retries: Counter[int] = Counter()
        self.ordered = opts.ordered
        self.order: deque[int] = deque()  # --ordered: indices handed out, not yet written
        self.ready: dict[int, tuple[bytes, tuple[Any, ...], int] | None] = {}  # --ordered: resolved, waiting for their turn (line, row, gen)
        self.done_run = 0
        self.cancelled = False  # a second signal
        self.committed = (0, 0)  # (done, failed) of this run recorded in the journal
        self.failed_run = 0
        self.exhausted = False
        self.draining: int | None = None  # the signal that started the drain
        self.broken: BaseException | None = None
        self.fatal: str | None = None
        self.metrics: MetricsServer | None = None  # --metrics-port: serves the pool's figures
        self.window = 0
        self.run_id = 0
        self.committed_offset = out.offset
        self.peak_rss = 0  # the highest worker peak (ru_maxrss) reported at an item's end
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
        todo = self.todo = self.total - len(self.done_before) - self.skipped
        tally = Tally(self._describe)
        use_live = not opts.plain and opts.log_format == "text" and self.stderr.isatty()
        setup_logging(self.stderr, live=use_live, json_lines=opts.log_format == "json", verbose=opts.verbose)
        earlier = f", {len(self.done_before)} done earlier" if self.done_before else ""
        if self.skipped:
            earlier += f", {self.skipped} failed earlier and skipped ({self._skip_reason()})"
        t0 = time.monotonic()
        with self._signals(), ResilientPool(opts.workers, limits=self.limits, retry=retry_policy(opts), backend=_backend(opts)) as pool:
            self.pool = pool
            if opts.metrics_port is not None:  # before the journal records a run: a bad port runs nothing
                from ..metrics import serve

                try:
                    self.metrics = serve(pool, opts.metrics_port, opts.metrics_addr)
                except OSError as exc:
                    raise UsageError(f"--metrics-port {opts.metrics_port}: cannot serve on {opts.metrics_addr}: {exc}") from None
                self.say("run.metrics", f"metrics at {self.metrics.url}", url=self.metrics.url)
            run_id = self.run_id = self.journal.begin_run(opts.argv, pool.max_workers)
            journal = f"journal {opts.journal} (run {run_id})" if opts.journal else "no journal"
            self.window = min(_WINDOW_MAX, _WINDOW_PER_WORKER * pool.max_workers)
            self.say(
                "run.start",
                f"resilpool run: {opts.target} over {self.total} items of {opts.input} ({todo} to run{earlier})"
                f" on {pool.max_workers} workers; results to {_shown(opts.output)}; {journal}",
                run=run_id,
                function=opts.target,
                input=opts.input,
                items=self.total,
                to_run=todo,
                done_earlier=len(self.done_before),
                skipped=self.skipped,
                workers=pool.max_workers,
                output=opts.output,
                journal=opts.journal,
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
                interval=opts.progress_interval,
                say=self.say,
                label="items",
            )
            self.view = view
            try:
                self._loop()
                if self.requeue:  # the run stopped before they ran again: pending
                    self._unorder(list(self.requeue))
                    self.requeue.clear()
            except BaseException as exc:
                self.fatal = f"{type(exc).__name__}: {_one_line(exc)}"
                log.error("resilpool run failed", exc_info=True)
            if self.fatal is not None:  # cancelled, or an error of the runner itself
                self._abandon(view)  # never returns
            self._take_messages()  # the last events
            view.close()
            if self.metrics is not None:
                self.metrics.close()
            status = self._status()
            self._commit()
            stats = pool.stats()
        self._take_messages()  # events of the shutdown
        self.journal.commit(None)
        self.journal.end_run(status, self.done_run, self.failed_run, _stats_dict(stats))
        if self.transit is not None:
            _remove_transit(self.transit)  # every line is in the output, and committed
        if opts.report:
            self._write_report()
        return self._summary(status, time.monotonic() - t0)

    def _skip_reason(self) -> str:
        return "--skip-failed" if self.opts.skip_failed else "quarantined; --retry-quarantined retries them"

    def _status(self) -> str:
        if self.broken is not None:
            return "broken"
        if self.halted is not None:
            return "halted"
        if self.draining is not None and self._not_done() > self.failed_run:
            return "interrupted"  # some items were not run
        return "failed" if self.failed_run or self._not_done() else "completed"

    def _not_done(self) -> int:
        return max(0, self.total - len(self.done_before) - self.done_run)

    def _loop(self) -> None:
        get = self.queue.get
        next_commit = time.monotonic() + COMMIT_INTERVAL_S
        while True:
            stopping = self.draining is not None or self.broken is not None or self.halted is not None
            if not stopping and (not self.exhausted or self.requeue):
                self._fill()
            if not self.inflight and ((self.exhausted and not self.requeue) or stopping):
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

    def _chunk_size(self) -> int:
        """Items in the next task: 0 means wait (the items' time is not measured yet)."""
        if not self.chunking:
            return 1
        if self.fixed_chunk is not None:  # --chunk-size
            return self.fixed_chunk
        workers = self.pool.max_workers
        if self.item_s is None:  # one item per task until the first ones say how long an item takes
            return 1 if len(self.inflight) < 2 * workers else 0
        size = int(CHUNK_TARGET_S / max(self.item_s, 1e-7))
        tail = (self.todo - self.read) // (4 * workers)  # the last chunks shrink: workers end together
        return max(1, min(size, CHUNK_MAX, tail))

    def _fill(self) -> None:
        call, pool, window = self.call, self.pool, self.window
        inflight = self.inflight
        put = self.queue.put
        items = self.items
        while self.inflight_items + len(self.ready) < window:
            chunk: list[Item] = []
            if self.requeue:
                chunk.append(self.requeue.popleft())
            else:
                size = self._chunk_size()
                if size == 0:
                    return
                while len(chunk) < size:
                    item = next(items, None)
                    if item is None:
                        self.exhausted = True
                        break
                    self.read += 1
                    if self.ordered:
                        self.order.append(item.index)
                    if type(item.value) is Malformed:
                        self._malformed(item)
                        continue
                    chunk.append(item)
                if not chunk:
                    if self.exhausted:
                        return
                    continue
            sent: list[ChunkItem] = [(it.index, it.value, it.input_json) for it in chunk]
            transit = None if self.transit is None else f"{self.transit}/g{self.gen}"
            try:
                fut = pool.submit(call, sent, transit, self.chunking)
            except (errors.CrashLoopError, RuntimeError) as exc:
                self.broken = exc
                self.requeue.extendleft(reversed(chunk))  # not run: pending
                return
            self.task_seq += 1
            if self.task_seq == 1 and pool.stats().submitted != 1:
                self.task_ids_ok = False  # not our counter: no task id -> item mapping
            self.by_task[self.task_seq] = chunk
            inflight[fut] = (chunk, self.task_seq, self.gen)
            self.inflight_items += len(chunk)
            fut.add_done_callback(put)

    # --- outcomes ----------------------------------------------------------------------

    def _unorder(self, items: list[Item]) -> None:
        """--ordered: these items will not be written in this run (they stay pending)."""
        if self.ordered:
            for item in items:
                self.order.remove(item.index)
            self._write_ready()  # the lines that waited for these

    def _resolved(self, fut: cf.Future[ChunkResult]) -> None:
        items, task_id, gen = self.inflight.pop(fut)
        self.inflight_items -= len(items)
        del self.by_task[task_id]
        try:
            pid, peak, started, blob, times, failed = fut.result(timeout=0)  # done: never waits
        except cf.CancelledError:
            self._unorder(items)
            return  # never started: stays pending
        except BaseException as exc:
            if self.abort_reason is not None and isinstance(exc, errors.WorkerCrashedError) and self.abort_reason in str(exc):
                # Killed by --halt now, not by its own fault: stays pending (interrupted); what
                # the chunk had finished is done.
                self._chunk_died(items, exc, gen, blame=False)
                return
            if isinstance(exc, errors.CrashLoopError):
                self.broken = self.broken or exc
                self._unorder(items)
                return  # not the item's fault: stays pending
            if len(items) == 1:
                self.retries.pop(items[0].index, None)
                self._failed(items[0], exc)
            else:
                self._chunk_died(items, exc, gen)
            return
        if peak > self.peak_rss:
            self.peak_rss = peak
        if not failed and not self.ordered and not self.retries:
            # The common case, in bulk: every item of the chunk done, first attempt.
            self.out.write(blob)
            add_done, t = self.add_done, started
            for item, elapsed in zip(items, times):
                add_done((item.index, pid, t, elapsed, peak))
                t += elapsed
            self.done_run += len(items)
        else:
            lines = iter(blob.split(b"\n"))
            t = started
            for pos, (item, elapsed) in enumerate(zip(items, times)):
                record = failed.get(pos)
                if record is not None:
                    self._failed_record(item, record, 1, pid, elapsed, None)
                else:
                    self._done(item, next(lines) + b"\n", pid, t, elapsed, peak, gen)
                t += elapsed
        if times and self.chunking:
            # The chunk's median item: a few items stretched by a busy machine do not shrink
            # the chunks for long.
            sample = sorted(times)[len(times) // 2]
            self.item_s = sample if self.item_s is None else 0.5 * (self.item_s + sample)

    def _done(self, item: Item, line: bytes, pid: int | None, started: float | None, elapsed: float | None, peak: int | None, gen: int) -> None:
        idx = item.index
        retries = self.retries.pop(idx, 0) if self.retries else 0
        row: tuple[Any, ...]
        if retries or started is None or elapsed is None or pid is None or peak is None:
            finished = time.time() if started is None or elapsed is None else started + elapsed
            row = (idx, "done", 1 + retries, self.run_id, item.line, pid, started, elapsed, finished, peak, None, None)
        else:
            row = (idx, pid, started, elapsed, peak)
        if self.ordered:
            self.ready[idx] = (line, row, gen)
            self._write_ready()
            return
        self._record(line, row)

    def _record(self, line: bytes, row: tuple[Any, ...]) -> None:
        """Write a finished item's output line and journal its row (5 fields: a plain done)."""
        self.out.write(line)
        if len(row) == 5:
            self.add_done(row)
        else:
            self.add_resolved(row)
        self.done_run += 1

    def _chunk_died(self, items: list[Item], exc: BaseException, gen: int, *, blame: bool = True) -> None:
        """The worker running a chunk died (a crash, a memory limit): what each of its items became.

        The items it had finished are in its transit file (``resilpool.cli._task``): they are
        done (or failed) as it wrote.  The first item not there is the one it was running: it
        fails with ``exc``, as it would have alone (``blame``; else it stays pending).  The rest
        never started: they run again, one per task, unless the run is stopping (then pending).
        """
        pid = getattr(exc, "pid", None)
        wanted = {item.index for item in items}
        finished: dict[int, tuple[bytes, dict[str, Any]]] = {}
        if self.transit is not None and pid is not None:
            for idx, raw, record in _read_transit(self.transit, pid=pid):
                if idx in wanted:
                    finished[idx] = (raw, record)
        culprit = not blame
        stopping = self.draining is not None or self.broken is not None or self.halted is not None
        pending: list[Item] = []
        for item in items:
            got = finished.get(item.index)
            if got is not None:
                raw, record = got
                if "result" in record:
                    self._done(item, raw, pid, None, None, None, gen)
                else:
                    elapsed = record.get("elapsed")
                    self._failed_record(item, record.get("error") or {}, 1, pid, elapsed if isinstance(elapsed, float) else None, None)
            elif not culprit:
                culprit = True
                self._failed(item, exc)
            elif stopping:
                pending.append(item)
            else:
                self.requeue.append(item)
        self._unorder(pending)

    def _failed(self, item: Item, exc: BaseException) -> None:
        pid = getattr(exc, "pid", None) or getattr(exc, "_resilpool_pid", None)
        elapsed = getattr(exc, "elapsed", None) or getattr(exc, "_resilpool_elapsed", None)
        rss = getattr(exc, "rss", None)
        self._failed_record(item, _error_record(exc), _attempts(exc), pid, elapsed, rss)

    def _failed_record(self, item: Item, record: dict[str, Any], attempts: int, pid: int | None, elapsed: float | None, rss: int | None) -> None:
        record = {"type": str(record.get("type", "Exception")), "module": str(record.get("module", "")), "message": str(record.get("message", "")), "notes": record.get("notes", []), **record}
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
        if self.halt is not None and self.halted is None and self.halt.reached(self.failed_run, self.done_run + self.failed_run):
            self._halt()
        self.journal.add_resolved(row)
        if self.ordered:
            self.ready[item.index] = None
            self._write_ready()

    def _write_ready(self) -> None:
        order, ready = self.order, self.ready
        while order and order[0] in ready:
            entry = ready.pop(order.popleft())
            if entry is not None:
                line, row, _ = entry
                self._record(line, row)

    # --- messages: events and signals ----------------------------------------------------

    def _message(self, msg: Any) -> None:
        if isinstance(msg, _Signal):
            self._signal(msg.signum)
            return
        self._event(msg)

    def _halt(self) -> None:
        """``--halt`` reached: start nothing more; ``now`` also kills the running items."""
        assert self.halt is not None
        self.halted = f"--halt {self.halt}: {self.failed_run} items failed in this run"
        if self.halt.now:
            # Unstarted tasks are cancelled; the workers of started ones are killed and
            # their futures fail naming this reason: those items stay pending.
            self.abort_reason = f"--halt {self.halt}"
            running = sum(1 for f in self.inflight if f.running())
            self.pool.abort(list(self.inflight), reason=self.abort_reason)
            self.view.note(f"halting ({self.halted}): {running} running items killed, nothing new starts")
            return
        for fut in list(self.inflight):
            fut.cancel()  # not started yet: never will
        running = sum(1 for f in self.inflight if not f.cancelled())
        self.view.note(f"halting ({self.halted}): nothing new starts; {running} running items finish")

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
            detail = f"attempt {ev.attempt} failed, retry in {ev.delay_s:.3f}s: {ev.error}"[:500]
            self.journal.add_event("retried", idx=None if item is None else item.index, reason=f"{ev.delay_s:.6f}", detail=detail)
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
        items = self.by_task.get(task_id) if self.task_ids_ok else None
        if not items:
            return f"task {task_id}"
        return f"item {items[0].index}" if len(items) == 1 else f"items {items[0].index}..{items[-1].index}"

    def _item_of(self, task_id: int | None) -> Item | None:
        """The item of a one-item task (a chunk's events name no single item)."""
        if task_id is None or not self.task_ids_ok:
            return None
        items = self.by_task.get(task_id)
        return items[0] if items and len(items) == 1 else None

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
                items = self.by_task.get(w.task_id) if w.task_id is not None else None
                if items:
                    started = now_wall - (now - w.running_since) if w.running_since is not None else now_wall
                    item = self._running_item(items, w.pid)
                    self.journal.add_running(item.index, item.line, w.pid, started)
        self.err.sync()
        self._commit_output()
        self.committed = (self.done_run, self.failed_run)
        if self.transit is not None:
            # The transit lines of generations no task or --ordered line waits on any more are
            # in the output, fsynced and committed: remove them; new tasks write a new generation.
            live = [gen for _, _, gen in self.inflight.values()]
            live += [entry[2] for entry in self.ready.values() if entry is not None]
            _clear_transit(self.transit, below=min(live, default=self.gen + 1))
            self.gen += 1

    def _running_item(self, items: list[Item], pid: int) -> Item:
        """The item of a task that worker ``pid`` is running: of a chunk, the first one not in its transit file.

        A worker runs a chunk's items in order and appends each one's line to its newest
        transit file (``gGEN-PID-TOKEN``) before the next starts; only the last lines can be
        the chunk's.
        """
        if len(items) == 1 or self.transit is None:
            return items[0]
        newest: tuple[int, str] | None = None
        with contextlib.suppress(OSError):
            for name in os.listdir(self.transit):
                parts = name[1:].split("-")
                if len(parts) == 3 and parts[1] == str(pid) and parts[0].isdigit() and (newest is None or int(parts[0]) > newest[0]):
                    newest = (int(parts[0]), name)
        finished: set[int] = set()
        if newest is not None:
            with contextlib.suppress(OSError), open(os.path.join(self.transit, newest[1]), "rb") as f:
                data = f.read()
                for raw in data.split(b"\0", 1)[0].split(b"\n")[:-1][-len(items) :]:
                    if raw.startswith(b'{"index": '):  # a result line or an error line: both start so
                        with contextlib.suppress(ValueError):
                            finished.add(int(raw[10 : raw.index(b",", 10)]))
        return next((item for item in items if item.index not in finished), items[-1])

    def _commit_output(self) -> None:
        offset = self.out.sync()
        tail = None
        if offset != self.committed_offset:
            tail = line_digest(self.out.last_line)
            self.committed_offset = offset
        self.journal.commit(offset, tail)

    def _abandon(self, view: View) -> None:
        """Cancel (a second signal) or a fatal error: record what is consistent, exit; the workers die with us."""
        cancel = self.cancelled
        try:
            if cancel:
                self._commit()  # every line written is whole: fsync, then record it (tail included)
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
        self.say(
            "run.end",
            f"resilpool run: {self.fatal}: {len(self.done_before) + self.committed[0]} of {self.total} items done,"
            f" {self.inflight_items} {what} abandoned; {resume}",
            level="ERROR",
            status="cancelled" if cancel else "broken",
        )
        self.journal.close()
        if self.transit is not None and self.opts.journal is None:
            _remove_transit(self.transit)
        # The workers (and what their items started) die with us: their lifeline pipe closes.
        os._exit(128 + self.draining if cancel and self.draining is not None else EXIT_BROKEN)

    def _write_report(self) -> None:
        assert self.opts.report is not None
        from ._report import build_report, write_report

        try:
            write_report(self.opts.report, build_report(self.journal.conn, self.opts.journal))
        except OSError as exc:
            self.say("error", f"resilpool run: cannot write report {self.opts.report}: {exc.strerror or exc}", level="ERROR")

    def _summary(self, status: str, elapsed: float) -> int:
        done = len(self.done_before) + self.done_run
        earlier = f", {len(self.done_before)} earlier" if self.done_before else ""
        s = self.stats_line()
        head = f"resilpool run: {done} of {self.total} items done ({self.done_run} in this run{earlier}), {self.failed_run} failed in {elapsed:.1f}s"
        self.say("run.summary", f"{head}; {s}", done=done, total=self.total, done_run=self.done_run, failed_run=self.failed_run, elapsed_s=round(elapsed, 3))
        code, text = self._verdict(status)
        self.say("run.end", text, level="INFO" if code == EXIT_OK else "WARNING", status=status, exit_status=code)
        return code

    def _verdict(self, status: str) -> tuple[int, str]:
        resume = f"rerun the same command to resume (journal {self.opts.journal})" if self.opts.journal else "no --journal: a rerun starts over"
        if status == "interrupted":
            assert self.draining is not None
            name = signal.Signals(self.draining).name
            return 128 + self.draining, f"resilpool run: interrupted by {name}: the running items finished, {self._not_done()} items not done; {resume}"
        if status == "halted":
            return EXIT_HALTED, f"resilpool run: halted ({self.halted}); {self._not_done()} items not done; details in {self._errors_shown()}; {resume}"
        if status == "broken":
            cause = f"{type(self.broken).__name__}: {_one_line(self.broken or Exception())}"
            return EXIT_BROKEN, f"resilpool run: the pool broke ({cause}); {self._not_done()} items not done; fix the cause and {resume}"
        if self.failed_run:
            retry = f"; {resume} and retry them" if self.opts.journal else ""
            return EXIT_FAILED, f"resilpool run: {self.failed_run} of {self.total} items failed; details in {self._errors_shown()}{retry}"
        if self.skipped:
            return EXIT_FAILED, f"resilpool run: {self.skipped} of {self.total} items failed earlier and were skipped ({self._skip_reason()})"
        return EXIT_OK, f"resilpool run: all {self.total} items done; results in {_shown(self.opts.output)}"

    def _errors_shown(self) -> str:
        return "the lines above (standard error)" if self.err.path == "-" else self.err.path

    def stats_line(self) -> str:
        s = self.pool.stats()
        recycled = ", ".join(f"{k} {v}" for k, v in sorted(s.recycled.items()) if k != "shutdown") or "none"
        # The report's figure: the larger of the workers' own peaks and the monitor's samples.
        top = max(s.peak_worker_rss or 0, self.peak_rss)
        peak = f"; peak worker RSS {human_bytes(top)}" if top else ""
        return f"retried {s.retried} attempts; crashes {s.worker_crashes}; recycled: {recycled}{peak}"


def _wait_exception(fut: cf.Future[Any]) -> BaseException | None:
    """The future's exception once it is done (a short timeout at a time, so Ctrl-C works)."""
    while True:
        try:
            return fut.exception(timeout=1.0)
        except cf.TimeoutError:
            continue


def setup_logging(stream: IO[str], *, live: bool, json_lines: bool, verbose: bool) -> None:
    """The pool's log records on ``stream`` (WARNING, INFO with -v); none under a live view.

    Dask's ``distributed`` logs at INFO by default (a line per worker and task
    event): it is kept at WARNING unless ``-v``.
    """
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("distributed").setLevel(level)
    if live:
        logging.getLogger("resilpool").setLevel(logging.CRITICAL)  # the live view shows the events
        return
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(LogFormatter(json_lines=json_lines))
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger("resilpool").setLevel(level)


def _stats_dict(stats: Any) -> dict[str, Any]:
    return dataclasses.asdict(stats)  # nested too: PoolStats.durations holds DurationHistograms


# --- dry run ------------------------------------------------------------------------


def dry_run(opts: RunOptions, *, stdout: IO[str], stderr: IO[str]) -> int:
    """Import the function and run the first item in a worker; print the result; write nothing."""
    _check_counts(opts)
    fn = resolve_target(opts.target)
    limits = make_limits(opts)
    with _run_input(opts) as (inp, _):
        return _dry_run(opts, fn, limits, inp, stdout=stdout, stderr=stderr)


def _dry_run(opts: RunOptions, fn: ChunkCall, limits: Limits, inp: InputFile, *, stdout: IO[str], stderr: IO[str]) -> int:
    if opts.output is not None:
        _check_paths(opts, inp)
    resume = ""
    if opts.journal is not None and os.path.exists(opts.journal):
        try:
            conn = open_readonly(opts.journal)
            try:
                meta = read_meta(conn)
                identity = {"function": opts.target, **inp.identity()}
                if opts.output is not None:
                    identity["output_path"] = os.path.abspath(opts.output)
                check_identity(opts.journal, meta, identity)
                done = done_count(conn)
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
    with ResilientPool(1, limits=limits, retry=retry_policy(opts), backend=_backend(opts)) as pool:
        fut = pool.submit(fn, [(0, item.value, item.input_json)], None, False)
        error = _wait_exception(fut)
    if error is not None:
        rec = _error_record(error)
        print(f"resilpool run --dry-run: item 0 failed: {rec['type']}: {_one_line(error)}", file=stderr)
        for note in rec["notes"]:
            print(f"  {note}", file=stderr)
        if "traceback" in rec:
            print(rec["traceback"], file=stderr)
        return EXIT_FAILED
    pid, peak, _, line, [elapsed], _ = fut.result()  # no capture: an error raised
    print(line.decode().rstrip("\n"), file=stdout, flush=True)
    print(f"resilpool run --dry-run: done in worker {pid} in {elapsed:.3f}s (peak RSS {human_bytes(peak)}); nothing written", file=stderr)
    return EXIT_OK


def _backend(opts: RunOptions) -> Any:
    """The Dask backend for ``--scheduler`` (an address, or ``local``), else None (local workers)."""
    if opts.scheduler is None:
        return None
    try:
        import distributed  # noqa: F401  (configures its logging at import: before the level below)

        from ..dask import DaskBackend
    except ImportError as exc:
        raise UsageError(f"--scheduler needs the Dask extra: pip install 'resilpool[dask]' ({exc})") from None
    # Importing distributed configures its logger at INFO (a line per worker and task
    # event): keep it at WARNING unless -v, now that it is imported.
    logging.getLogger("distributed").setLevel(logging.INFO if opts.verbose else logging.WARNING)
    try:
        return DaskBackend(None if opts.scheduler == "local" else opts.scheduler)
    except ImportError as exc:
        raise UsageError(f"--scheduler needs the Dask extra: pip install 'resilpool[dask]' ({exc})") from None
