"""Bounded waiting for tests, importable from tests/ and chaos/ alike (each has its own
``conftest`` module, so a helper shared by both must not live in one)."""

from __future__ import annotations

import faulthandler
import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail (with all stacks dumped) after ``timeout``.

    The default is a bound for a loaded CI machine (three interpreters' suites at once on
    two cores), not an expectation: what a test waits for takes milliseconds when idle.
    A pool that never gets there still fails, within the 60 s per-test limit.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            faulthandler.dump_traceback(all_threads=True)
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def wait_for_line(path: Any, timeout: float = 30.0, what: str = "a line") -> None:
    """Wait until the file ``path`` holds a complete line.

    A task that records its run with ``open(path, "a")`` creates the file before it writes
    the line: the file's existence alone does not say the line is there.
    """
    wait_until(lambda: path.exists() and path.read_text().endswith("\n"), timeout, what)
