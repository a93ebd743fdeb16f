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
by the kernel however the process ends), so two runs cannot share a journal; the
refusal names the holder's pid (``_locks``).

The output's identity: ``meta`` also holds ``output_file`` (``"dev:inode"``) and
``output_tail``, the SHA-256 of the output line that ends at ``output_offset``.  A
resume checks that the output still holds that line there: a run never appends to
an output its journal does not account for.

Owners: one thread (the runner's main thread) uses a :class:`Journal`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Final, final

from ._locks import InUseError, lock_exclusive

__all__ = [
    "Journal",
    "JournalError",
    "SCHEMA_VERSION",
    "check_identity",
    "done_count",
    "elapsed_totals",
    "event_counts",
    "quarantined_count",
    "run_item_counts",
    "failed_item_rows",
    "failure_counts",
    "finish_buckets",
    "finish_span",
    "open_readonly",
    "peak_item_row",
    "read_meta",
    "recycle_counts",
    "retried_item_count",
    "run_rows",
    "slowest_rows",
    "state_counts",
]

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

_TABLES: Final = frozenset({"meta", "items", "runs", "events"})

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
# The common row, a first-attempt success, binds 6 parameters (binding dominates the cost of a
# row): state, attempts and run are literals.  Only plain ``?`` placeholders: numbered ones
# (``?1``) count as named for Python's sqlite3, which 3.12 deprecates with a sequence of values.
_DONE: Final = (
    "INSERT INTO items (idx, state, attempts, run_id, line, pid, started, elapsed, finished, peak_rss, error_type, error)"
    " VALUES (?, 'done', 1, {run_id}, NULL, ?, ?, ?, ?, ?, NULL, NULL)"
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
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
    except BaseException:
        conn.close()
        raise
    return conn


def open_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection to an existing journal; JournalError if it is none."""
    if not os.path.exists(path):
        raise JournalError(f"no journal at {path}")
    try:
        conn = _connect(path, readonly=True)
    except sqlite3.Error as exc:
        raise JournalError(f"{path} is not a resilpool journal ({exc})") from exc
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise JournalError(f"{path} is not a resilpool journal of schema {SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        conn.close()  # on every error path: an open connection is a ResourceWarning on 3.13
        raise JournalError(f"{path} is not a resilpool journal ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _refuse_foreign(conn: sqlite3.Connection, path: str) -> None:
    """JournalError if ``path`` is a SQLite database that is not a resilpool journal (never extend it)."""
    tables = sorted(str(t) for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    if set(tables) <= _TABLES:
        return  # a new file, or a journal (perhaps made by a run refused before it began)
    shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
    raise JournalError(
        f"{path} is a SQLite database but not a resilpool journal (its tables: {shown}):"
        " give --journal a new file name; a journal is created on first use"
    )


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
        except sqlite3.Error as exc:
            self._unlock()
            raise JournalError(f"cannot use journal {path}: {exc}") from exc
        except BaseException:
            self._unlock()
            raise
        try:
            if path is not None:
                _refuse_foreign(self._conn, path)
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":  # pragma: no cover - e.g. a filesystem without shared memory
                    raise JournalError(f"cannot use journal {path}: SQLite refused WAL mode ({mode})")
                # NORMAL: a commit may be lost on power failure, never half-applied; losing one only
                # means its items run again (their output lines lie past the recorded offset).
                self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            self._unlock()
            raise JournalError(f"cannot use journal {path}: {exc}") from exc
        except BaseException:
            self._conn.close()
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
            lock_exclusive(fd, path)
        except InUseError as exc:
            os.close(fd)
            raise JournalError(f"journal {exc}: wait for it to end, or stop it (kill {exc.pid or 'PID'})") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def close(self) -> None:
        self._conn.close()
        self._unlock()

    # --- meta: what the journal belongs to -----------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection, for the read queries below (on the owner thread only)."""
        return self._conn

    def meta(self) -> dict[str, str]:
        return read_meta(self._conn)

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
            # Items left running by a killed run are pending again; failed ones stay failed (the
            # runner retries them, or not with --skip-failed).
            self._conn.execute("UPDATE items SET state = 'pending' WHERE state = 'running'")
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
        return state_counts(self._conn)

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

    def skipped_indices(self, *, failed: bool, quarantined: bool) -> set[int]:
        """Items a rerun does not run: done ones, and failed ones (``failed``) or quarantined ones (``quarantined``)."""
        rows = self._conn.execute("SELECT idx, state, error_type FROM items WHERE state IN ('done', 'failed')")
        return {
            i
            for i, state, error_type in rows
            if state == "done" or failed or (quarantined and error_type == "PoisonTaskError")
        }

    def output_tail(self) -> tuple[str | None, str | None]:
        """The recorded identity of the output: ``"dev:ino"`` and the SHA-256 of the line ending at ``output_offset``."""
        meta = self.meta()
        return meta.get("output_file"), meta.get("output_tail")

    def recover(self, indices: Sequence[int], output_offset: int, output_tail: str) -> None:
        """Record as done the items whose complete result lines a killed run wrote past ``output_offset``.

        Called before :meth:`begin_run`; the items count as done by the killed run.
        """
        now = time.time()
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            (run_id,) = self._conn.execute("SELECT MAX(id) FROM runs").fetchone()
            self._conn.executemany(
                "INSERT INTO items (idx, state, attempts, run_id, finished) VALUES (?, 'done', 1, ?, ?)"
                " ON CONFLICT(idx) DO UPDATE SET state = 'done', attempts = items.attempts + 1, run_id = excluded.run_id,"
                " finished = excluded.finished, error_type = NULL, error = NULL",
                [(i, run_id, now) for i in indices],
            )
            self._set_output(conn=self._conn, offset=output_offset, tail=output_tail)

    def set_output_file(self, file_id: str) -> None:
        """Record the output's ``"dev:inode"`` (a new journal, or a run that made a new output)."""
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES ('output_file', :v) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                {"v": file_id},
            )

    @staticmethod
    def _set_output(conn: sqlite3.Connection, offset: int, tail: str | None) -> None:
        conn.execute("UPDATE meta SET value = :v WHERE key = 'output_offset'", {"v": str(offset)})
        if tail is not None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('output_tail', :v) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                {"v": tail},
            )

    def commit(self, output_offset: int | None, output_tail: str | None = None) -> None:
        """Write the queued rows and ``output_offset`` (the output is durable up to it) in one transaction.

        ``output_tail`` is the SHA-256 of the output's line that ends at ``output_offset``
        (None: unchanged), by which a resume knows the output is the one this journal wrote.
        """
        conn = self._conn
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            if self._running:
                conn.executemany(_RUNNING, self._running)
            if self._done:
                conn.executemany(self._done_sql, [(i, pid, t, el, t + el, rss) for i, pid, t, el, rss in self._done])
            if self._resolved:
                conn.executemany(_UPSERT, self._resolved)
            if self._events:
                conn.executemany("INSERT INTO events (run_id, t, kind, pid, reason, idx, detail) VALUES (?, ?, ?, ?, ?, ?, ?)", self._events)
            if output_offset is not None:
                self._set_output(conn, output_offset, output_tail)
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


# --- read queries (the report, the dry run): every SQL statement lives in this module ------


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Items by state (an item without a row is pending and not counted)."""
    return dict(conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())


def done_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM items WHERE state = 'done'").fetchone()[0])


def run_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """``(id, started, finished, status, pid, workers, done, failed, stats)`` of every run, oldest first."""
    return conn.execute("SELECT id, started, finished, status, pid, workers, done, failed, stats FROM runs ORDER BY id").fetchall()


def recycle_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Worker exits by reason, shutdowns left out."""
    rows = conn.execute(
        "SELECT reason, COUNT(*) FROM events WHERE kind = 'worker_exited' AND reason != 'shutdown' GROUP BY reason ORDER BY reason"
    )
    return {str(reason): int(n) for reason, n in rows}


def run_item_counts(conn: sqlite3.Connection) -> dict[int, dict[str, int]]:
    """``{run id: {state: items}}``: what each run's items are now (a killed run keeps its done items)."""
    out: dict[int, dict[str, int]] = {}
    for run_id, state, n in conn.execute("SELECT run_id, state, COUNT(*) FROM items WHERE run_id IS NOT NULL GROUP BY run_id, state"):
        out.setdefault(int(run_id), {})[str(state)] = int(n)
    return out


def quarantined_count(conn: sqlite3.Connection) -> int:
    """Items failed now as poison (quarantined), not counting those a later run retried."""
    return int(conn.execute("SELECT COUNT(*) FROM items WHERE state = 'failed' AND error_type = 'PoisonTaskError'").fetchone()[0])


def event_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {str(k): int(n) for k, n in conn.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind")}


def retried_item_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM items WHERE attempts > 1").fetchone()[0])


def failure_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Failed items by error type, most frequent first."""
    rows = conn.execute("SELECT error_type, COUNT(*) FROM items WHERE state = 'failed' GROUP BY error_type ORDER BY COUNT(*) DESC, error_type")
    return {str(t): int(n) for t, n in rows}


def failed_item_rows(conn: sqlite3.Connection, limit: int) -> list[tuple[Any, ...]]:
    """``(idx, line, attempts, pid, error_type, error)`` of the first failed items."""
    return conn.execute(
        "SELECT idx, line, attempts, pid, error_type, error FROM items WHERE state = 'failed' ORDER BY idx LIMIT :limit", {"limit": limit}
    ).fetchall()


def slowest_rows(conn: sqlite3.Connection, limit: int) -> list[tuple[Any, ...]]:
    """``(idx, line, elapsed, pid, attempts, state)`` of the longest-running items."""
    return conn.execute(
        "SELECT idx, line, elapsed, pid, attempts, state FROM items WHERE elapsed IS NOT NULL ORDER BY elapsed DESC LIMIT :limit",
        {"limit": limit},
    ).fetchall()


def peak_item_row(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
    """``(idx, pid, peak_rss)`` of the item whose worker had the highest RSS when it finished."""
    row: tuple[Any, ...] | None = conn.execute(
        "SELECT idx, pid, peak_rss FROM items WHERE peak_rss IS NOT NULL ORDER BY peak_rss DESC LIMIT 1"
    ).fetchone()
    return row


def elapsed_totals(conn: sqlite3.Connection) -> tuple[float | None, float | None]:
    """Mean and sum of the done items' elapsed seconds (None without any)."""
    mean, total = conn.execute("SELECT AVG(elapsed), SUM(elapsed) FROM items WHERE state = 'done' AND elapsed IS NOT NULL").fetchone()
    return mean, total


def finish_span(conn: sqlite3.Connection) -> tuple[float | None, float | None]:
    """The first and last finish times of resolved items."""
    first, last = conn.execute(
        "SELECT MIN(finished), MAX(finished) FROM items WHERE finished IS NOT NULL AND state IN ('done', 'failed')"
    ).fetchone()
    return first, last


def finish_buckets(conn: sqlite3.Connection, first: float, bucket_s: float) -> list[tuple[int, str, int]]:
    """``(bucket, state, count)``: resolved items per ``bucket_s`` seconds from ``first``."""
    rows = conn.execute(
        "SELECT CAST((finished - :first) / :bucket AS INTEGER) AS b, state, COUNT(*) FROM items"
        " WHERE finished IS NOT NULL AND state IN ('done', 'failed') GROUP BY b, state",
        {"first": first, "bucket": bucket_s},
    )
    return [(int(b), str(state), int(n)) for b, state, n in rows]
