"""The workload of ``resilpool demo``: leaky, crashing and hanging tasks (importable by workers)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

_LEAKED: list[bytearray] = []


def simulate(i: int, leak_mib: int = 6) -> float:
    """A leaky scientific step: some CPU work, and memory that is never given back."""
    block = bytearray(leak_mib * 2**20)
    for k in range(0, len(block), 4096):
        block[k] = 1
    _LEAKED.append(block)
    acc = 0.0
    for k in range(20_000 + (i % 7) * 5_000):
        acc += math.sin(k * 0.001 + i)
    return acc


def flaky_crash(i: int, marker_dir: str) -> float:
    """Crashes its worker on the first attempt (as a segfault would), succeeds on the retry."""
    marker = Path(marker_dir) / f"crashed-{i}"
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return simulate(i, 1)


def hang(i: int) -> None:
    """Deadlocks: waits on a lock nobody will release (no CPU used: a stall)."""
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


def slow(i: int) -> None:
    """Busy for longer than the task timeout."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        pass


def poison(i: int) -> None:
    """Kills every worker that runs it."""
    os._exit(139)
