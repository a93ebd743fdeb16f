"""Helpers of the command-line tests (tests/test_cli*.py and chaos/test_cli_kills.py).

Kept apart from test_cli.py and from conftest.py so that chaos/ can import them too:
under ``pytest chaos/`` the module named ``conftest`` is chaos's own.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil
import pytest
from waits import wait_until  # noqa: F401 - re-exported for the CLI tests

TESTS = Path(__file__).resolve().parent
RUN_TIMEOUT = 60.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("COLUMNS", None)
    return env


def resilpool(*args: str, cwd: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``resilpool ARGS`` to the end; its stdout, stderr and exit status."""
    return subprocess.run(
        [sys.executable, "-m", "resilpool.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "resilpool.cli", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class StderrReader:
    """Reads a running process's stderr without blocking past a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.text = ""

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out waiting for {needle!r} on stderr; got:\n{self.text}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    pytest.fail(f"stderr closed before {needle!r}; got:\n{self.text}")
                self.text += chunk.decode()
        return self.text

    def finish(self, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)
            pytest.fail(f"resilpool did not exit within {timeout}s; stderr so far:\n{self.text}")
        self.text += err
        return self.proc.returncode, self.text


def write_items(path: Path, items: Iterable[Any]) -> Path:
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def logged_runs(path: Path) -> collections.Counter[int]:
    """How many times each item ran (the side-effect log written by workload.cli_square)."""
    if not path.exists():
        return collections.Counter()
    return collections.Counter(int(line.split()[0]) for line in path.read_text().splitlines())


def logged_pids(path: Path) -> set[int]:
    return {int(line.split()[1]) for line in path.read_text().splitlines()} if path.exists() else set()


def journal_query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def items_in_state(db: Path, state: str) -> set[int]:
    """Indices of the items the journal records in ``state`` (none before it exists)."""
    if not db.exists():
        return set()
    try:
        return {i for (i,) in journal_query(db, "SELECT idx FROM items WHERE state = ?", state)}
    except sqlite3.OperationalError:  # not created yet
        return set()


def done_in_journal(db: Path) -> set[int]:
    return items_in_state(db, "done")


def wait_gone(pids: Iterable[int], timeout: float = 20.0) -> None:
    """Wait until none of ``pids`` is a live process (orphaned workers die by their lifeline)."""

    def gone() -> bool:
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    wait_until(gone, timeout, "the killed run's workers to exit")


def kill_9_after(proc: subprocess.Popen[Any], journal: Path, done: int, running: int = 0) -> None:
    """SIGKILL ``proc`` once ``journal`` records ``done`` items done and ``running`` running.

    The journal commits periodically, so an item's start can land one commit after the
    done count a test waits for; a test that asserts what was running at the kill waits
    for it too. ``proc`` is killed anyway on failure.
    """
    try:
        wait_until(
            lambda: len(done_in_journal(journal)) >= done and len(items_in_state(journal, "running")) >= running,
            60,
            f"{done} items done and {running} running in the journal",
        )
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def squares(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"i": i, **extra} for i in range(n)]
