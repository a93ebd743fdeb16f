"""The journal of ``resilpool run``: a SQLite file (WAL mode) that lets a run resume.

Tables::

    meta(key, value)    what the journal belongs to: input (path, format, size, sha256,
                        item count), function, output path; and output_offset, the length
                        of the output file that the done items account for
    items(idx, ...)     one row per item that has run or runs: state pending/running/done/
                        failed, attempts, run, worker pid, start, elapsed, finish, peak RSS,
                        error type and message (an item without a row is pending)
    runs(id, ...)       one row per invocation: start, end, status, argv, workers, stats
    events(...)         worker exits (recycles, crashes), retries, quarantines

Consistency with the output file (the rule that makes kill -9 harmless): a
result line is written (and flushed) to the output as soon as its item finishes;
every ``commit_interval`` the runner fsyncs the output and then commits, in one
transaction, the done rows of the lines written so far together with the new
``output_offset``.  So at any instant the journal's done items are exactly the
lines before ``output_offset``, and those lines are on disk.  A resumed run cuts
the output back to ``output_offset`` (dropping the lines of items the journal
does not count as done, and a half-written last line) and runs every item not
done.  No line is lost or duplicated; an item runs again only if its completion
was not committed.

A run holds an exclusive ``flock`` on the journal file for its whole life (released
by the kernel however the process ends), so two runs cannot share a journal.

Owners: one thread (the runner's main thread) uses a :class:`Journal`.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Final, final

__all__ = ["Journal", "JournalError", "SCHEMA_VERSION", "open_readonly"]

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    idx INTEGER PRIMARY KEY,
    state TEXT NOT NULL,            -- pending, running, done, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    run_id INTEGER,
    line INTEGER,                   -- 1-based line of the input, if any
    pid INTEGER,                    -- worker of the last attempt
    started REAL,                   -- time.time() when the last attempt started
    elapsed REAL,                   -- seconds the last attempt ran (in the worker)
    finished REAL,                  -- time.time() when the result was recorded
    peak_rss INTEGER,               -- bytes: the worker's peak RSS when the item finished
    error_type TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,           -- running, completed, failed, interrupted, cancelled, broken, killed
    pid INTEGER NOT NULL,
    argv TEXT,
    workers INTEGER,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    stats TEXT
);
CREATE TABLE IF NOT EXISTS events (
    run_id INTEGER NOT NULL,
    t REAL NOT NULL,
    kind TEXT NOT NULL,             -- worker_exited, retried, quarantined, rebuilt, crash_loop, paused, resumed
    pid INTEGER,
    reason TEXT,
    idx INTEGER,
    detail TEXT
);
"""

#: Columns of a resolved item row, in this order.
ITEM_COLUMNS: Final = ("idx", "state", "attempts", "run_id", "line", "pid", "started", "elapsed", "finished", "peak_rss", "error_type", "error")
_UPSERT: Final = (
    "INSERT INTO items (idx, state, attempts, run_id, line, pid, started, elapsed, finished, peak_rss, error_type, error)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(idx) DO UPDATE SET state = excluded.state, attempts = items.attempts + excluded.attempts,"
    " run_id = excluded.run_id, line = excluded.line, pid = excluded.pid, started = excluded.started,"
    " elapsed = excluded.elapsed, finished = excluded.finished, peak_rss = excluded.peak_rss,"
    " error_type = excluded.error_type, error = excluded.error"
)
# The common row, a first-attempt success, binds 5 parameters (binding dominates the cost of a
# row): state, attempts and run are literals, ``finished`` is computed from ``started + elapsed``.
_DONE: Final = (
    "INSERT INTO items (idx, state, attempts, run_id, line, pid, started, elapsed, finished, peak_rss, error_type, error)"
    " VALUES (?1, 'done', 1, {run_id}, NULL, ?2, ?3, ?4, ?3 + ?4, ?5, NULL, NULL)"
    " ON CONFLICT(idx) DO UPDATE SET state = excluded.state, attempts = items.attempts + excluded.attempts,"
    " run_id = excluded.run_id, line = excluded.line, pid = excluded.pid, started = excluded.started,"
    " elapsed = excluded.elapsed, finished = excluded.finished, peak_rss = excluded.peak_rss,"
    " error_type = NULL, error = NULL"
)
_RUNNING: Final = (
    "INSERT INTO items (idx, state, run_id, line, pid, started) VALUES (?, 'running', ?, ?, ?, ?)"
    " ON CONFLICT(idx) DO UPDATE SET state = 'running', run_id = excluded.run_id, pid = excluded.pid,"
    " started = excluded.started WHERE items.state = 'pending'"
)


class JournalError(Exception):
    """The journal cannot be used for this run: a one-line message."""


def _connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def open_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection to an existing journal; JournalError if it is none."""
    if not os.path.exists(path):
        raise JournalError(f"no journal at {path}")
    try:
        conn = _connect(path, readonly=True)
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.Error as exc:
        raise JournalError(f"{path} is not a resilpool journal ({exc})") from exc
    if version is None or int(version[0]) != SCHEMA_VERSION:
        conn.close()
        raise JournalError(f"{path} is not a resilpool journal of schema {SCHEMA_VERSION}")
    return conn


@final
class Journal:
    """A run's journal; ``path=None`` keeps it in memory (a run that cannot resume).

    Rows to write are queued with :meth:`add_resolved` / :meth:`add_event` and reach
    the file, in one transaction, at :meth:`commit`.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock_fd: int | None = None
        try:
            if path is not None:
                self._lock(path)
            self._conn = _connect(path or ":memory:")
            if path is not None:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":  # pragma: no cover - e.g. a filesystem without shared memory
                    raise JournalError(f"cannot use journal {path}: SQLite refused WAL mode ({mode})")
                # NORMAL: a commit may be lost on power failure, never half-applied; losing one only
                # means its items run again (their output lines lie past the recorded offset).
                self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._unlock()
            raise JournalError(f"cannot use journal {path}: {exc}") from exc
        except BaseException:
            self._unlock()
            raise
        self._resolved: list[tuple[Any, ...]] = []
        self._done: list[tuple[int, int, float, float, int]] = []
        self._done_sql = _DONE.format(run_id=0)
        self._running: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []
        self.run_id = 0

    # --- locking --------------------------------------------------------------------

    def _lock(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise JournalError(f"cannot open journal {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(f"journal {path} is in use by another resilpool run") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def close(self) -> None:
        self._conn.close()
        self._unlock()

    # --- meta: what the journal belongs to -----------------------------------------------

    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())

    def is_new(self) -> bool:
        return self._conn.execute("SELECT 1 FROM meta WHERE key = 'schema'").fetchone() is None

    def bind(self, identity: dict[str, str]) -> None:
        """Record (new journal) or check (existing one) what this journal belongs to.

        ``identity`` holds ``function``, ``output_path`` and the input's identity.
        Raises JournalError naming the first difference.
        """
        if self.is_new():
            rows = [("schema", str(SCHEMA_VERSION)), ("created", repr(time.time())), ("output_offset", "0"), *identity.items()]
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows)
            return
        meta = self.meta()
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise JournalError(f"{self.path} is not a resilpool journal of schema {SCHEMA_VERSION}")
        check_identity(str(self.path), meta, identity)

    # --- runs --------------------------------------------------------------------------

    def begin_run(self, argv: Sequence[str], workers: int) -> int:
        """Start a run: earlier runs left 'running' were killed; unfinished items are pending again."""
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("UPDATE runs SET status = 'killed' WHERE status = 'running'")
            self._conn.execute("UPDATE items SET state = 'pending' WHERE state != 'done'")
            cur = self._conn.execute(
                "INSERT INTO runs (started, status, pid, argv, workers) VALUES (?, 'running', ?, ?, ?)",
                (time.time(), os.getpid(), json.dumps(list(argv)), workers),
            )
        self.run_id = int(cur.lastrowid or 0)
        self._done_sql = _DONE.format(run_id=self.run_id)
        return self.run_id

    def end_run(self, status: str, done: int, failed: int, stats: dict[str, Any]) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "UPDATE runs SET finished = ?, status = ?, done = ?, failed = ?, stats = ? WHERE id = ?",
                (time.time(), status, done, failed, json.dumps(stats), self.run_id),
            )

    # --- items -------------------------------------------------------------------------

    def done_indices(self) -> set[int]:
        return {i for (i,) in self._conn.execute("SELECT idx FROM items WHERE state = 'done'")}

    def counts(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())

    def output_offset(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'output_offset'").fetchone()
        return int(row[0]) if row else 0

    def add_resolved(self, row: tuple[Any, ...]) -> None:
        """Queue a done/failed row (columns :data:`ITEM_COLUMNS`; ``attempts`` of this run)."""
        self._resolved.append(row)

    def add_done(self, row: tuple[int, int, float, float, int]) -> None:
        """Queue a first-attempt success: ``(idx, pid, started, elapsed, peak_rss)``."""
        self._done.append(row)

    def add_running(self, idx: int, line: int | None, pid: int, started: float) -> None:
        self._running.append((idx, self.run_id, line, pid, started))

    def add_event(self, kind: str, *, pid: int | None = None, reason: str | None = None, idx: int | None = None, detail: str | None = None) -> None:
        self._events.append((self.run_id, time.time(), kind, pid, reason, idx, detail))

    def discard(self) -> None:
        """Drop the queued rows (their output may not have been written)."""
        self._resolved = []
        self._done = []
        self._running = []
        self._events = []

    def pending_rows(self) -> int:
        return len(self._resolved) + len(self._done) + len(self._running) + len(self._events)

    def commit(self, output_offset: int | None) -> None:
        """Write the queued rows and ``output_offset`` (the output is durable up to it) in one transaction."""
        conn = self._conn
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            if self._running:
                conn.executemany(_RUNNING, self._running)
            if self._done:
                conn.executemany(self._done_sql, self._done)
            if self._resolved:
                conn.executemany(_UPSERT, self._resolved)
            if self._events:
                conn.executemany("INSERT INTO events (run_id, t, kind, pid, reason, idx, detail) VALUES (?, ?, ?, ?, ?, ?, ?)", self._events)
            if output_offset is not None:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'output_offset'", (str(output_offset),))
        self._resolved = []
        self._done = []
        self._running = []
        self._events = []


_IDENTITY_WORDS: Final = {
    "function": "function",
    "input_format": "input format",
    "input_size": "input size",
    "input_digest": "input content (SHA-256)",
    "output_path": "output file",
}


def check_identity(path: str, meta: dict[str, str], identity: dict[str, str]) -> None:
    """JournalError if ``identity`` differs from the journal's ``meta`` (the input's path may move)."""
    for key, words in _IDENTITY_WORDS.items():
        old, new = meta.get(key), identity.get(key)
        if key in identity and old != new:
            made_for = f"input {meta.get('input_path')} and function {meta.get('function')}"
            if key == "output_path":
                raise JournalError(
                    f"journal {path} writes its results to {old}, not {new}: pass --output {old}, or use a new journal to start over"
                )
            raise JournalError(
                f"journal {path} was made for {made_for}; this run's {words} differs ({_short(old)} != {_short(new)}):"
                " use a new journal (or delete it) to start over"
            )


def _short(value: str | None) -> str:
    if value is None:
        return "none"
    if value.startswith("sha256:"):
        return value[:19] + "…"
    return value
