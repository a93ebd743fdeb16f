"""Shared fixtures: start methods, pools that are always shut down, and leak checks.

Every test runs under an autouse check that it leaves no child process and no
thread behind (the long-lived forkserver and resource tracker excepted).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from waits import wait_for_line, wait_until  # noqa: F401 - re-exported: tests import them from here

from resilpool import ResilientPool

#: Start methods the pool supports on this platform.
START_METHODS = ["forkserver", "spawn", "fork"] if sys.platform.startswith("linux") else ["spawn"]

_SERVICE_MARKERS = ("forkserver", "resource_tracker")


def _service(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return True
    return any(m in cmd for m in _SERVICE_MARKERS)


def _children() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        if not _service(p):
            out.add(p.pid)
    return out


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a child process or a thread running."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 10.0
    while True:
        extra_children = _children() - children_before
        extra_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if not extra_children and not extra_threads:
            return
        if time.monotonic() > deadline:
            for pid in extra_children:
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
            pytest.fail(f"test leaked child processes {sorted(extra_children)} / threads {[t.name for t in extra_threads]}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _core_guard(resilpool_core_guard: list[Any]) -> None:
    """No ERROR from the core and no rebuild unless the test asks (resilpool.testing.plugin)."""


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ResilientPool]]:
    """Build pools that are shut down (and joined) at the end of the test, whatever happens."""
    pools: list[ResilientPool] = []

    def make(*args: Any, **kwargs: Any) -> ResilientPool:
        pool = ResilientPool(*args, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


RESULT_TIMEOUT = 30.0
