"""Bounded waiting for tests, importable from tests/ and chaos/ alike (each has its own
``conftest`` module, so a helper shared by both must not live in one)."""

from __future__ import annotations

import faulthandler
import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail (with all stacks dumped) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            faulthandler.dump_traceback(all_threads=True)
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
